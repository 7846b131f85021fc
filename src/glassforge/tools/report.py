"""`glassforge report RUN`: one self-contained HTML file that tells how a run went, for sharing.

The report holds, for a run folder: loss, learning-rate and throughput curves of
pretraining and chat fine-tuning (from each stage's `metrics.jsonl`), data
statistics (the data manifest's summary and the release's data card), the
evaluation table (`eval/eval.json`), and a summary of the release's attestation
with the result of checking its file hashes now.

Why a single file: it is meant to be mailed, attached to an issue or put on a
web page as it is. Styles are inline and every plot is a PNG embedded as a
base64 data URI, drawn with matplotlib's Agg backend through `Figure` directly
(no pyplot global state, no display), so the file opens offline and nothing
it shows can change under it. The page is `templates/report.html.j2`, rendered
with autoescape: all text taken from the run is HTML-escaped.

A release folder on its own (no run around it) also works: its combined
`metrics.jsonl` (rows tagged by stage) and its cards stand in for the run's.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

from glassforge import __version__
from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_text
from glassforge.core.manifest import read_manifest_head
from glassforge.core.recipe import parse_recipe
from glassforge.core.runfolder import TRAINING_STAGES, Release, Run
from glassforge.core.templates import png_data_uri, render
from glassforge.data.card import data_summary
from glassforge.evaluate.stage import results_rows
from glassforge.release.attest import attestation_summary
from glassforge.release.verify import check_summary
from glassforge.train.metrics import read_metrics

STAGE_TITLES = {"pretrain": "Pretraining", "sft": "Chat fine-tuning"}


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def metric_plots(rows: list[dict], stage: str) -> list[dict]:
    """Loss (train and validation), learning-rate and throughput plots of one stage: [{title, alt, src}]."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
    if not rows:
        return []
    title = STAGE_TITLES.get(stage, stage)
    plots = []

    def series(key: str) -> tuple[list, list]:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    specs = [
        ("loss", "loss (nats/token)", [("loss", "train", "-"), ("val_loss", "validation", "o-")]),
        ("learning rate", "learning rate", [("lr", None, "-")]),
        ("throughput", "tokens/s", [("tokens_per_s", None, "-")]),
    ]
    for name, ylabel, lines in specs:
        drawn = [(series(key), label, style) for key, label, style in lines]
        drawn = [d for d in drawn if d[0][0]]
        if not drawn:
            continue
        fig = Figure(figsize=(3.9, 2.8))
        ax = fig.subplots()
        for (xs, ys), label, style in drawn:
            ax.plot(xs, ys, style, label=label, lw=1.2, ms=3)
        ax.set(xlabel="step", ylabel=ylabel, title=f"{title}: {name}")
        ax.grid(alpha=0.3)
        if any(label for _, label, _ in drawn):
            ax.legend(fontsize=8)
        fig.tight_layout()
        plots.append({"title": f"{title}: {name}", "alt": f"{title} {name} against training step",
                      "src": _png(fig)})
    return plots


# --------------------------------------------------------------------------------------- inputs


def _locate(path: Path) -> tuple[Path | None, Path | None]:
    """(run folder or None, release folder or None) for a run folder or a bare release folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    run = Run(path)
    if Release(path).config.is_file() and Release(path).manifest.is_file():  # a release (it has data/ too)
        above = Run(path.parent)
        return (above.root if path.name == "release" and above.recipe.is_file() else None), path
    if run.recipe.is_file() and any(d.is_dir() for d in (run.data, run.pretrain, run.release)):
        return path, run.release if Release(run.release).config.is_file() else None
    raise UserError(f"{path}: neither a run folder (recipe.toml with data/, pretrain/ or release/) nor a release "
                    f"(config.json and manifest.json); build one with `glassforge build`")


def _stages(run: Path | None, release: Path | None) -> list[dict]:
    """Per training stage: its last figures and its plots, from the run's logs or else the release's."""
    metrics: dict[str, list[dict]] = {}
    if run is not None:
        for stage in TRAINING_STAGES:
            rows = read_metrics(Run(run).metrics(stage))
            if rows:
                metrics[stage] = rows
    if not metrics and release is not None:
        for row in read_metrics(Release(release).metrics):
            metrics.setdefault(row.get("stage", "pretrain"), []).append(row)
    out = []
    for stage, rows in metrics.items():
        vals = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
        tps = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
        out.append({"title": STAGE_TITLES.get(stage, stage), "steps": rows[-1].get("step"),
                    "tokens": rows[-1].get("tokens"), "loss": rows[-1].get("loss"),
                    "val_loss": vals[-1] if vals else None, "tokens_per_s": sum(tps) / len(tps) if tps else None,
                    "plots": metric_plots(rows, stage)})
    return out


def _data(run: Path | None, release: Path | None) -> dict | None:
    """The data summary: computed from the run's manifest, else the release's data_summary.json."""
    if run is not None and Run(run).data_manifest.is_file():
        try:
            read_manifest_head(Run(run))
            return data_summary(Run(run))
        except UserError:
            pass
    return _read_json(Release(release).data_summary) if release is not None else None


def _attestation(release: Path) -> list[tuple[str, str, bool]] | None:
    """(label, value, is code) rows of the attestation's summary."""
    a = attestation_summary(release)
    if a is None:
        return None
    code, plat, training = a["code"], a["platform"] or {}, a["training"] or {}
    return [
        ("subject", f"{a['subject']} sha256 {a['weights_sha256']}", True),
        ("predicate type", str(a["predicate_type"]), True),
        ("recipe", f"{a['recipe_name']}, sha256 {a['recipe_sha256']}", False),
        ("data Merkle root", str(a["mix_merkle_root"]), True),
        ("data order sha256", str(a["order_sha256"]), True),
        ("training tokens", _num(a["train_tokens"]), False),
        ("tokenizer sha256", str(a["tokenizer_sha256"]), True),
        ("code", f"glassforge {code.get('version')}, commit {code.get('git_commit') or 'unknown'}"
                 + (" (with uncommitted changes)" if code.get("git_dirty") else ""), False),
        ("dependency lock", str(a["dependency_lock_sha256"]), True),
        ("platform", ", ".join(f"{k} {v}" for k, v in plat.items()) if isinstance(plat, dict) else str(plat), False),
        ("training", "; ".join(f"{STAGE_TITLES.get(s, s)}: {i.get('steps')} steps, {i.get('tokens') or 0:,} tokens"
                               for s, i in training.items() if isinstance(i, dict)), False),
        ("checkpoint chain", f"{a['checkpoints']} checkpoints written in training", False),
        ("trace index", str(a["trace_index_sha256"]), True),
        ("signed", "yes" if a["signed"] else "no", False),
    ]


# --------------------------------------------------------------------------------------- entry


def render_report(run: Path | str, check: bool = True) -> str:
    """The report's HTML for a run folder (or a release folder)."""
    run_dir, release = _locate(Path(run))
    results = _read_json(Run(run_dir).eval_results) if run_dir is not None else None
    recipe_path = Run(run_dir).recipe if run_dir is not None else Release(release).recipe
    recipe_name, description = None, ""
    if recipe_path.is_file():
        try:
            recipe = parse_recipe(recipe_path.read_bytes(), str(recipe_path))
            recipe_name, description = recipe.name, recipe.description
        except UserError:
            pass
    title = f"glassforge report: {Path(run).resolve().name}" + (f" (recipe {recipe_name})" if recipe_name else "")
    data = _data(run_dir, release)
    decontamination = (results or {}).get("decontamination") or {}
    return render("glassforge.tools", "report.html.j2", title=title, description=description, version=__version__,
                  made_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), source=str(Path(run).resolve()),
                  num=_num, stages=_stages(run_dir, release), data=data,
                  dropped=sorted((data or {}).get("dropped", {}).items(), key=lambda t: -t[1]),
                  histogram=png_data_uri(Release(release).data_lengths_plot) if release is not None else None,
                  eval_rows=results_rows(results) if results else [], removed=decontamination.get("removed"),
                  ngram=decontamination.get("ngram"), has_release=release is not None,
                  attestation=_attestation(release) if release is not None else None,
                  check=check_summary(release) if check and release is not None else None)


def write_report(run: Path, out: Path | None = None) -> Path:
    """Write the report of a run folder to out (default RUN/report.html), atomically; return its path."""
    run = Path(run)
    html_text = render_report(run)
    path = Path(out) if out is not None else run / "report.html"
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; give a file name such as {path / 'report.html'}")
    atomic_write_text(path, html_text)  # with the usual 0666 & ~umask mode: a report is for sharing
    return path
