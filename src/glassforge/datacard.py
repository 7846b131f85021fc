"""DATA_CARD.md: what the model was trained on, from the data manifest alone.

The card is generated, never hand-written, so it cannot drift from the data:
sources with their licences, counts and bytes; every reason a document was
dropped with its count (bad input included: nothing is dropped silently);
deduplication and decontamination figures; the Merkle roots, seed and order
hash that bind the training order; and a histogram of kept documents' lengths
(`data_lengths.png`, log-spaced bins, drawn with matplotlib's Agg backend so
no display is needed). The release stage calls `write_data_card(run, folder)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from glassforge.runfolder import AtomicFile, Run, atomic_write_text

HISTOGRAM = "data_lengths.png"


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


def write_data_card(run: Run, out_dir: Path) -> Path:
    """Write DATA_CARD.md and data_lengths.png into out_dir; return the card's path."""
    from glassforge.data import REASONS, _manifest_head, iter_manifest_documents

    out_dir = Path(out_dir)
    head = json.loads(_manifest_head(run))
    summary = head["summary"]
    recipe = run.load_recipe()
    lengths: dict[str, list[int]] = {s.name: [] for s in recipe.data.sources}
    tokens: dict[str, int] = {}
    tokens_known = False
    for d in iter_manifest_documents(run):
        if d.get("status") == "kept":
            lengths.setdefault(d["source_name"], []).append(d["bytes"])
            if d.get("tokens") is not None:
                tokens_known = True
                tokens[d["source_name"]] = tokens.get(d["source_name"], 0) + d["tokens"]
    shards = run.data / "shards.json"
    if not tokens_known and shards.is_file():
        info = json.loads(shards.read_text())
        per_doc = info.get("tokens_per_document") or {}
        if per_doc:
            tokens_known = True
            for d in iter_manifest_documents(run):
                if d["id"] in per_doc and d.get("status") == "kept":
                    tokens[d["source_name"]] = tokens.get(d["source_name"], 0) + per_doc[d["id"]]
    else:
        info = json.loads(shards.read_text()) if shards.is_file() else {}

    sources = summary.get("sources", {})
    lines = [f"# Data card: glassforge `{recipe.name}`", "",
             "Generated from the run's `data/manifest.json`, which lists every document seen (kept or "
             "dropped) with its id, source URI, licence, sha256, bytes, split and reason.", "",
             "## Sources", "",
             "| source | kind | licence | weight | seen | kept | train | val | bytes kept | tokens kept |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for src in recipe.data.sources:
        s = sources.get(src.name, {})
        lines.append(f"| {src.name} | {src.kind} | {src.license} | {src.weight:g} | {_fmt(s.get('seen'))} | "
                     f"{_fmt(s.get('kept'))} | {_fmt(s.get('train'))} | {_fmt(s.get('val'))} | "
                     f"{_fmt(s.get('bytes_kept'))} | {_fmt(tokens.get(src.name) if tokens_known else None)} |")
    lines += ["", f"Kept {_fmt(summary['documents_kept'])} of {_fmt(summary['documents_seen'])} documents "
              f"({_fmt(summary['train_documents'])} training, {_fmt(summary['val_documents'])} validation; "
              f"{_fmt(summary['bytes_kept'])} of {_fmt(summary.get('bytes_seen'))} bytes).", "",
              f"Sampling weights: {summary.get('order', {}).get('weights', '')}. The training order has "
              f"{_fmt(summary.get('order', {}).get('entries'))} entries.", "",
              "## What was dropped and why", ""]
    dropped = summary.get("dropped", {})
    if dropped:
        names = [s.name for s in recipe.data.sources]
        lines += ["| reason | meaning | " + " | ".join(names) + " | total |",
                  "|---|---|" + "---:|" * (len(names) + 1)]
        for reason, total in sorted(dropped.items(), key=lambda t: (-t[1], t[0])):
            per = [_fmt(sources.get(n, {}).get("dropped", {}).get(reason, 0)) for n in names]
            lines.append(f"| `{reason}` | {REASONS.get(reason, '')} | " + " | ".join(per) + f" | {_fmt(total)} |")
    else:
        lines.append("Nothing was dropped.")
    dd = summary.get("dedup", {})
    nd = dd.get("near_dedup", {})
    lines += ["", "## Deduplication", "",
              f"- Exact (sha256 of the cleaned text): {_fmt(dd.get('exact_duplicates'))} documents dropped.",
              f"- Near-duplicate ({'on' if nd.get('enabled') else 'off'}; {nd.get('method', '')}; "
              f"{nd.get('shingle_words')}-word shingles, {nd.get('bands')} bands x {nd.get('rows')} rows, "
              f"Jaccard >= {nd.get('threshold')}): {_fmt(dd.get('near_duplicates'))} documents dropped"
              + (f", mean estimated similarity {nd['mean_similarity_of_dropped']}"
                 if nd.get("mean_similarity_of_dropped") is not None else "") + ".",
              "- The first document in stage order is kept; each dropped one names it in `duplicate_of`.", "",
              "## Decontamination", ""]
    dc = summary.get("decontamination", {})
    if dc.get("sets"):
        lines += [f"Training documents sharing a {dc.get('ngram')}-word n-gram with an evaluation set are dropped.",
                  "", "| evaluation set | items | items shorter than n | n-grams | documents matched | dropped |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in dc["sets"].items():
            lines.append(f"| `{name}` | {_fmt(s['items'])} | {_fmt(s['items_shorter_than_n'])} | "
                         f"{_fmt(s['ngrams'])} | {_fmt(s['documents_matched'])} | {_fmt(s['documents_dropped'])} |")
    else:
        lines.append("No evaluation set was named in `data.decontaminate`; nothing was checked.")
    merkle = head.get("merkle", {})
    lines += ["", "## Binding", "",
              f"- Mix Merkle root (training order): `{merkle.get('mix')}`"]
    for name, root in merkle.get("sources", {}).items():
        lines.append(f"- Merkle root of `{name}`: `{root}`")
    lines += [f"- Construction: {merkle.get('construction', '')}; leaves: {merkle.get('leaves', '')}.",
              f"- Shuffle seed: {head.get('seed')}; `order.txt` sha256: `{head.get('order_sha256')}`",
              f"- Tokenizer sha256: `{head.get('tokenizer_sha256') or info.get('tokenizer_sha256') or 'n/a'}`", "",
              "## Document lengths", "", f"![kept document lengths]({HISTOGRAM})", ""]
    _histogram(lengths, out_dir / HISTOGRAM)
    path = out_dir / "DATA_CARD.md"
    atomic_write_text(path, "\n".join(lines))
    return path
