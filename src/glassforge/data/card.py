"""DATA_CARD.md: what the model was trained on, from the data manifest alone.

The card is generated, never hand-written, so it cannot drift from the data:
sources with their licences, counts and bytes; every reason a document was
dropped with its count (bad input included: nothing is dropped silently);
deduplication and decontamination figures; the Merkle roots, seed and order
hash that bind the training order; and a histogram of kept documents' lengths
(`data_lengths.png`, log-spaced bins, drawn with matplotlib's Agg backend so
no display is needed). The same figures go, as JSON, into `data_summary.json`,
so that a program (the web page, the report) reads them without parsing the
Markdown back. The card is `templates/data_card.md.j2`. The release stage
calls `write_data_card(run, folder)`.
"""

from __future__ import annotations

from pathlib import Path

from glassforge.core.files import AtomicFile, atomic_write_json, atomic_write_text
from glassforge.core.manifest import iter_manifest_entries, read_manifest_head
from glassforge.core.runfolder import Release, Run
from glassforge.core.templates import render


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else ("n/a" if n is None else str(n))


def _histogram(lengths: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    everything = [n for v in lengths.values() for n in v if n > 0]
    if everything:
        lo, hi = max(1, min(everything)), max(everything)
        bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 1.01)), 40)
        names = [k for k, v in lengths.items() if v]
        ax.hist([lengths[k] for k in names], bins=bins, stacked=True, label=names)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("document length (bytes of cleaned UTF-8 text)")
    ax.set_ylabel("kept documents")
    ax.set_title("Kept document lengths by source")
    fig.tight_layout()
    with AtomicFile(path) as f:
        fig.savefig(f, format="png", metadata={"Software": None})
    plt.close(fig)


def data_summary(run: Run) -> dict:
    """The data card's figures as JSON (data_summary.json): per source, totals, drops, order and binding."""
    head = read_manifest_head(run)
    summary = head["summary"]
    recipe = run.load_recipe()
    tokens: dict[str, int] = {}
    for d in iter_manifest_entries(run):
        if d.get("status") == "kept" and d.get("tokens") is not None:
            tokens[d["source_name"]] = tokens.get(d["source_name"], 0) + d["tokens"]
    per = summary.get("sources", {})
    merkle = head.get("merkle") or {}
    return {
        "sources": [{"name": src.name, "kind": src.kind, "license": src.license, "weight": src.weight,
                     **{k: per.get(src.name, {}).get(k) for k in ("seen", "kept", "train", "val", "bytes_kept")},
                     "tokens_kept": tokens.get(src.name) if tokens else None,
                     "dropped": per.get(src.name, {}).get("dropped", {})} for src in recipe.data.sources],
        **{k: summary.get(k) for k in ("documents_seen", "documents_kept", "train_documents", "val_documents",
                                       "bytes_seen", "bytes_kept")},
        "dropped": summary.get("dropped", {}),
        "reasons": head.get("reasons") or {},
        "order_entries": (summary.get("order") or {}).get("entries"),
        "merkle": {"mix": merkle.get("mix"), "sources": merkle.get("sources", {})},
        "order_sha256": head.get("order_sha256"),
        "tokenizer_sha256": head.get("tokenizer_sha256"),
    }


def write_data_card(run: Run, out_dir: Path) -> Path:
    """DATA_CARD.md, data_lengths.png and data_summary.json into out_dir (a release); return the card's path."""
    out = Release(out_dir)
    head = read_manifest_head(run)
    summary = head["summary"]
    d = data_summary(run)
    lengths: dict[str, list[int]] = {s["name"]: [] for s in d["sources"]}
    for e in iter_manifest_entries(run):
        if e.get("status") == "kept":
            lengths.setdefault(e["source_name"], []).append(e["bytes"])
    dedup = summary.get("dedup", {})
    merkle = head.get("merkle") or {}
    card = render("glassforge.data", "data_card.md.j2", recipe_name=run.load_recipe().name, d=d, n=_fmt,
                  weights_rule=(summary.get("order") or {}).get("weights", ""),
                  dropped_by_count=sorted(d["dropped"].items(), key=lambda t: (-t[1], t[0])),
                  dedup=dedup, near=dedup.get("near_dedup", {}), decontamination=summary.get("decontamination", {}),
                  construction=merkle.get("construction", ""), leaves=merkle.get("leaves", ""),
                  seed=head.get("seed"), histogram=out.data_lengths_plot.name)
    _histogram(lengths, out.data_lengths_plot)
    atomic_write_json(out.data_summary, d)
    atomic_write_text(out.data_card, card)
    return out.data_card
