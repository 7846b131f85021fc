"""Manifests: the data manifest (every document seen) and a release's file manifest (every file's hash).

The data manifest is two files. `data/manifest.json` is the head: a JSON object
with the summary, Merkle roots, seed, order and tokenizer hashes, and the name,
count and sha256 of the entries file. `data/manifest.jsonl` holds one entry per
document seen, kept or dropped, one JSON object a line with sorted keys, in
stage order. A reader takes the head without touching the entries, and the
entries one line at a time, so neither needs the corpus in memory; the head's
sha256 of the entries tells a reader whether the two belong together (they are
written one after the other, entries first).

A file manifest maps each file's path (relative, posix) to its sha256 and size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_text
from glassforge.core.hashing import canonical_json, sha256_bytes, sha256_file
from glassforge.core.runfolder import Run

DATA_MANIFEST_FORMAT = "glassforge-data-manifest/2"


def write_data_manifest(run: Run, head: dict, entry_lines: Iterable[str]) -> None:
    """The entries file (streamed, one JSON object a line), then the head, which records its hash."""
    h, count = hashlib.sha256(), 0
    with AtomicFile(run.manifest_entries, "w") as f:
        for line in entry_lines:
            data = line + "\n"
            f.write(data)
            h.update(data.encode("utf-8"))
            count += 1
    head = {**head, "format": DATA_MANIFEST_FORMAT,
            "entries": {"file": run.manifest_entries.name, "count": count, "sha256": h.hexdigest()}}
    atomic_write_text(run.data_manifest, json.dumps(head, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def read_manifest_head(run: Run) -> dict:
    path = run.data_manifest
    if not path.is_file():
        raise UserError(f"{path}: missing; run `glassforge data {run.root}` first")
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if head.get("format") != DATA_MANIFEST_FORMAT:
        raise UserError(f"{path}: format {head.get('format')!r}, not {DATA_MANIFEST_FORMAT} (made by another "
                        f"glassforge); run `glassforge data {run.root}` again")
    return head


def iter_manifest_lines(run: Run) -> Iterator[tuple[str, dict]]:
    """(the line as written, the entry) of every document entry, in stage order."""
    with open(run.manifest_entries, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                yield line, json.loads(line)


def iter_manifest_entries(run: Run) -> Iterator[dict]:
    for _, entry in iter_manifest_lines(run):
        yield entry


def entry_line(entry: dict) -> str:
    """How an entry is written: sorted keys, no ASCII escaping, json's default separators."""
    return json.dumps(entry, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- file manifests


def file_manifest(folder: Path, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """sha256 and size of every file under folder, by relative path, except the top-level names in exclude."""
    skip = set(exclude)
    files = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def folder_sha256(folder: Path) -> str | None:
    """One hash for a folder: of the sorted map of its files' relative paths to their sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return sha256_bytes(canonical_json({p.relative_to(folder).as_posix(): sha256_file(p)
                                        for p in sorted(folder.rglob("*")) if p.is_file()}))
