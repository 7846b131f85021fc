"""The training log: one JSON line per step (metrics.jsonl), and its plot (loss.png).

The log is fsynced before each checkpoint, so it is never behind the
checkpoint it describes; on resume the lines past that checkpoint (and a last
line cut short by a kill) are dropped and written again.
"""

from __future__ import annotations

import json
from pathlib import Path

from glassforge.core.files import AtomicFile


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again),
    and a last line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    with AtomicFile(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """loss.png: training and validation loss, learning rate and throughput against step."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows], label="train", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        axes[0].plot(*zip(*val), "o-", label="validation", ms=3)
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title=f"{title} loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows])
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    axes[2].plot(steps, [r["tokens_per_s"] for r in rows], lw=1)
    axes[2].set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    with AtomicFile(out_png) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return out_png

