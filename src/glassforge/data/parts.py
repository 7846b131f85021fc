"""The data stage's units of work: parts of the sources, cut by the data, never by the worker count.

A part is a run of consecutive items of one source in the source's own fixed
order: for `files`, consecutive files of the sorted listing until they hold
`PART_BYTES`, a JSON-lines file larger than that cut at line ends every
`PART_BYTES`; for `pystdlib`, consecutive module files holding
`PYSTDLIB_PART_BYTES` of source (parsing, not reading, is the work there, so
parts are smaller); a Hugging Face dataset, or a source with `max_documents`,
is one part. The same sources give the same parts on every machine, whatever
runs them, so the parts' results merged in part order are the same bytes at
every scale.

A part is a small frozen value (paths and byte ranges, no text), cheap to send
to another process or a Ray worker, which reads it with `iter_part`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from glassforge.core.recipe import DataConfig
from glassforge.data import pystdlib
from glassforge.data.sources import RawDocument, iter_files, iter_source, jsonl_spans, walk_files

PART_BYTES = 32 << 20
PYSTDLIB_PART_BYTES = 1 << 20


@dataclass(frozen=True)
class Part:
    """Items of source number `source`: `files` entries (relative path, path, span or None) for a files
    source, (module, path) for pystdlib; `whole` for a source read in one piece."""

    source: int
    files: tuple = ()
    whole: bool = False

    def describe(self) -> list:
        return [self.source, self.whole, [list(f) for f in self.files]]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def plan_parts(cfg: DataConfig, part_bytes: int | None = None, pystdlib_part_bytes: int | None = None) -> list[Part]:
    """Every part of every source, sources in recipe order (sizes default to PART_BYTES, PYSTDLIB_PART_BYTES)."""
    part_bytes = part_bytes or PART_BYTES
    pystdlib_part_bytes = pystdlib_part_bytes or PYSTDLIB_PART_BYTES
    parts: list[Part] = []
    for i, src in enumerate(cfg.sources):
        if src.kind == "hf" or src.max_documents:
            parts.append(Part(i, whole=True))
            continue
        if src.kind == "pystdlib":
            listing = [((module, str(path)), _size(path)) for module, path in
                       pystdlib.module_files(pystdlib.stdlib_root(), src.modules or None)]
            limit = pystdlib_part_bytes
        else:
            listing = []
            for rel, path in walk_files(Path(src.path)):
                size = _size(path)
                if path.suffix.lower() == ".jsonl" and size > part_bytes and path.is_file():
                    listing.extend(((rel, str(path), span), span[1] - span[0]) for span in jsonl_spans(path, part_bytes))
                else:
                    listing.append(((rel, str(path), None), size))
            limit = part_bytes
        group: list = []
        held = 0
        for item, size in listing:
            if group and held + size > limit:
                parts.append(Part(i, tuple(group)))
                group, held = [], 0
            group.append(item)
            held += size
        if group or not parts or parts[-1].source != i:
            parts.append(Part(i, tuple(group)))
    return parts


def iter_part(part: Part, cfg: DataConfig) -> Iterator[RawDocument]:
    """The items of one part, in the source's order."""
    src = cfg.sources[part.source]
    if part.whole:
        yield from iter_source(src, cfg)
    elif src.kind == "pystdlib":
        root = pystdlib.stdlib_root()
        for doc in pystdlib.iter_documents(files=[(m, Path(p)) for m, p in part.files], root=root):
            yield RawDocument(f"{src.name}:{doc.name}", doc.source, src.license, doc.text, src.name)
    else:
        yield from iter_files(src, part.files)
