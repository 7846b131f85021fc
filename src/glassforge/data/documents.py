"""The kept documents of a run (data/documents.jsonl) and their manifest entries, read one at a time."""

from __future__ import annotations

import json
from typing import Iterator

from glassforge.core.hashing import canonical_json
from glassforge.core.manifest import iter_manifest_entries
from glassforge.core.runfolder import Run


def iter_documents(run: Run, split: str | None = None) -> Iterator[dict]:
    """Kept documents ({id, split, text}) in the order the data stage wrote them."""
    with open(run.documents, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if split is None or doc["split"] == split:
                yield doc


def find_document(run: Run, doc_id: str) -> dict | None:
    needle = canonical_json(doc_id).decode("utf-8")
    with open(run.documents, encoding="utf-8") as f:
        for line in f:
            if needle in line:
                doc = json.loads(line)
                if doc["id"] == doc_id:
                    return doc
    return None


def find_entry(run: Run, doc: str) -> dict | None:
    """The manifest entry of a document, by its id or its name (`pystdlib:json.dumps`, `files:a.jsonl#L7`)."""
    for d in iter_manifest_entries(run):
        if d["id"] == doc or d.get("name") == doc:
            return d
    return None

