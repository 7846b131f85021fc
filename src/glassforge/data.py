"""The `data` stage: documents in, a clean, deduplicated, split and documented set out.

Reads the recipe's sources, normalises every document (Unicode NFC, whitespace),
drops exact duplicates (sha256 of the normalised text; the first in source
order is kept), and splits train/validation by each document's hash, so a
document's split never depends on what else is in the corpus.

Writes `data/documents.jsonl` (id and text of every kept document) and
`data/manifest.json` (every document seen: id, source, licence, sha256, bytes,
split or the reason it was dropped). Token shards come from `shards.py` once
the tokenizer exists.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from tqdm import tqdm

from glassforge.errors import UserError
from glassforge.recipe import DataConfig, SourceConfig
from glassforge.runfolder import AtomicFile, Run, atomic_write_json, canonical_json, sha256_bytes


@dataclass
class RawDocument:
    id: str
    source: str  # URI of where the text came from
    license: str
    text: str
    source_name: str


def iter_source(src: SourceConfig) -> Iterator[RawDocument]:
    if src.kind == "pystdlib":
        from glassforge import pystdlib

        for i, doc in enumerate(pystdlib.iter_documents(src.modules or None)):
            if src.max_documents and i >= src.max_documents:
                return
            yield RawDocument(f"{src.name}:{doc.name}", doc.source, src.license, doc.text, src.name)
    else:
        raise UserError(f"data.sources '{src.name}': unknown kind '{src.kind}' (known: pystdlib)")


_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, no control characters, unix newlines, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub("", text).replace("\t", "    ")
    text = _TRAILING_WS.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def split_of(sha256: str, val_fraction: float) -> str:
    """Deterministic split from the document's own hash."""
    return "val" if int(sha256[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def run_data(run: Run) -> dict:
    """Collect, clean, deduplicate and split the recipe's sources into the run folder."""
    recipe = run.load_recipe()
    cfg: DataConfig = recipe.data
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise UserError(f"data.sources: duplicate source name in {names}")
    seen: dict[str, str] = {}
    entries: list[dict] = []
    reasons: Counter = Counter()
    with AtomicFile(run.data / "documents.jsonl", "w") as out:
        for src in cfg.sources:
            for raw in tqdm(iter_source(src), desc=f"data {src.name}", unit="doc", leave=False):
                text = normalize(raw.text)
                digest = sha256_bytes(text.encode("utf-8"))
                entry = {"id": raw.id, "source": raw.source, "license": raw.license, "sha256": digest,
                         "bytes": len(text.encode("utf-8")), "source_name": raw.source_name}
                if len(text) < cfg.min_chars:
                    entry.update(status="dropped", reason="too_short")
                elif len(text) > cfg.max_chars:
                    entry.update(status="dropped", reason="too_long")
                elif digest in seen:
                    entry.update(status="dropped", reason="exact_duplicate", duplicate_of=seen[digest])
                else:
                    seen[digest] = raw.id
                    entry.update(status="kept", split=split_of(digest, cfg.val_fraction))
                    out.write(canonical_json({"id": raw.id, "split": entry["split"], "text": text}).decode() + "\n")
                if entry["status"] == "dropped":
                    reasons[entry["reason"]] += 1
                entries.append(entry)
    kept = [e for e in entries if e["status"] == "kept"]
    if not kept:
        raise UserError("data: no document survived cleaning; check data.sources and the filters")
    summary = {
        "documents_seen": len(entries),
        "documents_kept": len(kept),
        "train_documents": sum(e["split"] == "train" for e in kept),
        "val_documents": sum(e["split"] == "val" for e in kept),
        "bytes_kept": sum(e["bytes"] for e in kept),
        "dropped": dict(sorted(reasons.items())),
    }
    atomic_write_json(run.data / "manifest.json", {"summary": summary, "documents": entries})
    return summary


def iter_documents(run: Run, split: str | None = None) -> Iterator[dict]:
    """Kept documents ({id, split, text}) in the order the data stage wrote them."""
    import json

    with open(run.data / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if split is None or doc["split"] == split:
                yield doc
