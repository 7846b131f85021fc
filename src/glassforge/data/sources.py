"""Reading the recipe's `[[data.sources]]`: every document, or the reason there is none.

Three kinds of source:

- `pystdlib`: the embedded corpus (see `pystdlib.py`).
- `files`: a file or a folder (walked recursively, in sorted order of relative
  path, so the order never depends on the file system). `.txt`, `.md`, `.rst`:
  one document per file. `.jsonl`: one document per line, text in
  `text_field`. `.json`: a list of records (one document each), one record, or
  (if it does not parse as one JSON value) JSON lines. `.parquet`: one document
  per row, read in record batches with pyarrow, only the `text_field` column.
- `hf`: a Hugging Face dataset by name (or a local folder in the same layout)
  through `datasets.load_dataset(path, split=..., streaming=True)`, or a folder
  written by `Dataset.save_to_disk` through `datasets.load_from_disk`. Streaming
  keeps memory bounded whatever the dataset's size.

Bad input is never fatal and never silent: a reader yields a `RawDocument`
with `text=None` and a reason code (`READ_REASONS`) for every file, line, record
or row it could not turn into text, and the data stage records it in the
manifest. Only problems with the recipe itself (a path that does not exist, an
unknown kind, a file type we cannot read named directly) are `UserError`s, and
`check_sources` raises them before any work starts.

Document ids: `{source name}:{module.qualname}` (pystdlib), `{source
name}:{relative path}` with `#L{line}` (JSON lines) or `#{index}` (JSON
arrays, Parquet rows) for files, `{source name}:{split}#{index}` for hf.

Memory is bounded per item: a line or file is read whole only below
`MAX_ITEM_BYTES` (64 MiB); above that it is skipped in 1 MiB chunks and
recorded as `too_large`. Parquet and Hugging Face datasets stream in batches.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from glassforge.core.errors import UserError
from glassforge.core.recipe import DataConfig, SourceConfig
from glassforge.data import pystdlib as pystdlib

KINDS = ("pystdlib", "files", "hf")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
MAX_ITEM_BYTES = 64 << 20  # a single file or line larger than this is recorded, not read
_BINARY_SNIFF = 8192

# Reason codes a reader can give for an item that yields no text (the filters add their own in data.py).
READ_REASONS = {
    "unreadable": "the file could not be opened or read (permissions, broken link, not a regular file)",
    "empty_file": "the file has no bytes",
    "binary": "the bytes contain NUL characters: not text",
    "invalid_utf8": "the bytes are not valid UTF-8",
    "too_large": f"a single file or line over {MAX_ITEM_BYTES >> 20} MiB, skipped without reading it whole",
    "malformed_json": "a JSON line or file that does not parse, or is not an object",
    "missing_text_field": "the record has no string in the configured text_field",
    "corrupt_parquet": "pyarrow could not read the Parquet file (or a batch of it)",
    "unsupported_file_type": "a file in a source folder whose suffix is not .txt .md .rst .jsonl .json .parquet",
    "hf_error": "the datasets library failed while streaming the dataset",
}


@dataclass
class RawDocument:
    """One item from a source: its text, or (text None) the reason it has none."""

    id: str
    source: str  # URI of where the text came from
    license: str
    text: str | None
    source_name: str
    reason: str | None = None  # set when text is None
    detail: str = ""  # a short human explanation of the reason


# --------------------------------------------------------------------------- checks before work


def check_sources(cfg: DataConfig) -> None:
    """Every mistake in `[data]` that we can see without reading the data, as a `UserError`."""
    if not cfg.sources:
        raise UserError("data.sources: no sources; add at least one [[data.sources]]")
    names = [s.name for s in cfg.sources]
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}] '{src.name}'"
        if not src.name or any(c in src.name for c in ":/\\\n"):
            raise UserError(f"data.sources[{i}].name: '{src.name}' must be non-empty without ':', '/' or newlines")
        if names.count(src.name) > 1:
            raise UserError(f"data.sources[{i}].name: duplicate source name '{src.name}'")
        if src.kind not in KINDS:
            raise UserError(f"{where}: unknown kind '{src.kind}' (known: {', '.join(KINDS)})")
        if not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight) and src.weight >= 0):
            raise UserError(f"{where}: weight must be a finite number >= 0, got {src.weight!r}")
        if src.max_documents < 0:
            raise UserError(f"{where}: max_documents must be >= 0, got {src.max_documents}")
        if src.kind in ("files", "hf") and not src.text_field:
            raise UserError(f"{where}: text_field must not be empty")
        if src.kind == "files":
            if not src.path:
                raise UserError(f"{where}: kind 'files' needs a path (a file or folder)")
            p = Path(src.path)
            if not p.exists():
                raise UserError(f"{where}: path '{src.path}' does not exist")
            if p.is_file() and p.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise UserError(f"{where}: path '{src.path}': cannot read '{p.suffix}' files "
                                f"(known: {' '.join(SUPPORTED_SUFFIXES)})")
        if src.kind == "hf":
            if not src.path:
                raise UserError(f"{where}: kind 'hf' needs a path (a dataset name or a local dataset folder)")
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise UserError(f"{where}: kind 'hf' needs the `datasets` library: pip install datasets") from None
            # A hub name is "owner/name"; a local folder starts with / . or ~ and must exist.
            if src.path.startswith(("/", ".", "~")) and not Path(src.path).expanduser().exists():
                raise UserError(f"{where}: path '{src.path}' does not exist")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction: must be in [0, 1), got {cfg.val_fraction}")
    if cfg.min_chars < 0 or cfg.max_chars < max(1, cfg.min_chars):
        raise UserError(f"data.max_chars: must be >= min_chars ({cfg.min_chars}) and >= 1, got {cfg.max_chars}")
    for field_ in ("max_non_text_fraction", "max_repeated_line_fraction", "near_dedup_threshold"):
        v = getattr(cfg, field_)
        if not 0 <= v <= 1:
            raise UserError(f"data.{field_}: must be in [0, 1], got {v}")
    if cfg.near_dedup_shingle < 1 or cfg.near_dedup_bands < 1 or cfg.near_dedup_rows < 1:
        raise UserError("data.near_dedup_shingle, near_dedup_bands, near_dedup_rows: must be >= 1")
    if cfg.near_dedup_bands * cfg.near_dedup_rows > 1024:
        raise UserError(f"data.near_dedup_bands * near_dedup_rows: at most 1024 permutations, got "
                        f"{cfg.near_dedup_bands * cfg.near_dedup_rows}")
    if cfg.decontaminate_ngram < 1:
        raise UserError(f"data.decontaminate_ngram: must be >= 1, got {cfg.decontaminate_ngram}")
    for i, name in enumerate(cfg.decontaminate):
        if not Path(name).is_file():
            raise UserError(f"data.decontaminate[{i}]: '{name}' is not a file (give a .jsonl, .json or .txt "
                            "evaluation set)")


# --------------------------------------------------------------------------- fingerprints


def source_fingerprint(src: SourceConfig) -> dict:
    """Cheap identity of a source's input: paths, sizes and mtimes, never the content."""
    if src.kind == "pystdlib":
        import platform


        return {"kind": "pystdlib", "python": platform.python_version(), "stdlib": str(pystdlib.stdlib_root())}
    if src.kind == "files":
        files = []
        for rel, path in walk_files(Path(src.path)):
            try:
                st = path.stat()
                files.append([rel, st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([rel, None, None])
        return {"kind": "files", "path": str(Path(src.path).resolve()), "files": files}
    entry: dict = {"kind": src.kind, "path": src.path, "split": src.split}
    local = Path(src.path)
    if local.exists():
        entry["files"] = [[rel, p.stat().st_size, p.stat().st_mtime_ns] for rel, p in walk_files(local)
                          if p.is_file()]
    return entry


# --------------------------------------------------------------------------- readers


def iter_source(src: SourceConfig, cfg: DataConfig | None = None) -> Iterator[RawDocument]:
    """Every item of one source in a fixed order (at most max_documents of them)."""
    if src.kind == "pystdlib":
        items = _iter_pystdlib(src)
    elif src.kind == "files":
        items = iter_files(src)
    elif src.kind == "hf":
        items = _iter_hf(src)
    else:
        raise UserError(f"data.sources '{src.name}': unknown kind '{src.kind}' (known: {', '.join(KINDS)})")
    for i, item in enumerate(items):
        if src.max_documents and i >= src.max_documents:
            return
        yield item


def _iter_pystdlib(src: SourceConfig) -> Iterator[RawDocument]:
    for doc in pystdlib.iter_documents(src.modules or None):
        yield RawDocument(f"{src.name}:{doc.name}", doc.source, src.license, doc.text, src.name)


def walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every non-directory under root, sorted; root itself if a file."""
    if not root.is_dir():
        yield root.name, root
        return
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
        # Symlinks to folders are listed in dirnames but not followed: treat them as files (read error).
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                found.append(((Path(dirpath) / name).relative_to(root).as_posix(), Path(dirpath) / name))
                dirnames.remove(name)
    found.sort(key=lambda t: t[0])
    yield from found


_UNSAFE_IN_ID = re.compile(r"[\s%#]")


def id_path(rel: str) -> str:
    """A relative path as it appears in a document id: whitespace, '%' and '#' percent-encoded (UTF-8),
    so that ids never contain whitespace (order.txt is one id a line) and '#' only starts a record."""
    return _UNSAFE_IN_ID.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), rel)


def iter_files(src: SourceConfig, listing=None) -> Iterator[RawDocument]:
    """Every item of a files source, or of `listing`: (relative path, path, span) entries, span being
    None for a whole file or (start byte, end byte, number of the first line) for a part of a JSON-lines file."""
    root = Path(src.path)
    if listing is None:
        listing = ((rel, path, None) for rel, path in walk_files(root))
    for rel, path, span in listing:
        path = Path(path)
        base_id = f"{src.name}:{id_path(rel)}"
        uri = path.resolve().as_uri() if path.exists() else "file://" + str(path.absolute())
        suffix = path.suffix.lower()

        def bad(reason: str, detail: str = "", suffix_id: str = "", suffix_uri: str = "") -> RawDocument:
            return RawDocument(base_id + suffix_id, uri + suffix_uri, src.license, None, src.name, reason, detail)

        if suffix not in SUPPORTED_SUFFIXES:
            yield bad("unsupported_file_type", f"suffix '{suffix}'")
            continue
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                yield bad("unreadable", "not a regular file")
                continue
            if suffix == ".parquet":
                yield from _iter_parquet(src, path, base_id, uri)
                continue
            if suffix == ".jsonl":
                yield from _iter_jsonl(src, path, base_id, uri, span)
                continue
            if st.st_size > MAX_ITEM_BYTES:
                yield bad("too_large", f"{st.st_size} bytes")
                continue
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            yield bad("unreadable", f"{type(e).__name__}: {e.strerror or e}")
            continue
        if not data:
            yield bad("empty_file")
            continue
        if b"\x00" in data[:_BINARY_SNIFF] or b"\x00" in data:
            yield bad("binary", "contains NUL bytes")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield bad("invalid_utf8", f"at byte {e.start}")
            continue
        del data
        if suffix == ".json":
            yield from _json_records(src, text, base_id, uri)
        else:
            yield RawDocument(base_id, uri, src.license, text, src.name)


def _record_text(src: SourceConfig, record, doc_id: str, uri: str) -> RawDocument:
    if not isinstance(record, dict):
        return RawDocument(doc_id, uri, src.license, None, src.name, "malformed_json",
                           f"a {type(record).__name__}, not an object")
    value = record.get(src.text_field)
    if not isinstance(value, str):
        what = "absent" if value is None else f"a {type(value).__name__}"
        return RawDocument(doc_id, uri, src.license, None, src.name, "missing_text_field",
                           f"field '{src.text_field}' is {what}")
    return RawDocument(doc_id, uri, src.license, value, src.name)


def _json_records(src: SourceConfig, text: str, base_id: str, uri: str) -> Iterator[RawDocument]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        # Not one JSON value: read it as JSON lines (many `.json` files are).
        yield from _jsonl_lines(src, (line.encode("utf-8") for line in text.splitlines()), base_id, uri)
        return
    if isinstance(value, list):
        for i, record in enumerate(value):
            yield _record_text(src, record, f"{base_id}#{i}", f"{uri}#{i}")
    else:
        yield _record_text(src, value, base_id, uri)


def _read_lines_bounded(f, end: int | None = None) -> Iterator[bytes | None]:
    """Lines of a binary file that start before byte `end`; None for a line longer than MAX_ITEM_BYTES
    (skipped in chunks)."""
    pos = f.tell()
    while end is None or pos < end:
        line = f.readline(MAX_ITEM_BYTES + 1)
        if not line:
            return
        pos += len(line)
        if len(line) > MAX_ITEM_BYTES and not line.endswith(b"\n"):
            while True:
                chunk = f.readline(1 << 20)
                pos += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


def _iter_jsonl(src: SourceConfig, path: Path, base_id: str, uri: str,
                span: tuple[int, int, int] | None = None) -> Iterator[RawDocument]:
    start, end, first_line = span or (0, None, 1)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield RawDocument(base_id, uri, src.license, None, src.name, "empty_file")
            return
        f.seek(start)
        yield from _jsonl_lines(src, _read_lines_bounded(f, end), base_id, uri, first_line)


def jsonl_spans(path: Path, part_bytes: int) -> list[tuple[int, int, int]]:
    """A JSON-lines file cut at line ends about every `part_bytes`: (start, end, first line number) each.

    Reads the file once, counting newlines, so that every part knows the line numbers in its ids."""
    size = path.stat().st_size
    spans, start, first_line, newlines, pos, target = [], 0, 1, 0, 0, part_bytes
    with open(path, "rb") as f:
        while target < size:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            while target < pos + len(chunk):
                i = chunk.find(b"\n", max(target - pos, 0))
                if i < 0:
                    break
                cut = pos + i + 1
                if cut >= size:
                    target = size
                    break
                spans.append((start, cut, first_line))
                start, first_line = cut, newlines + chunk.count(b"\n", 0, i + 1) + 1
                target = cut + part_bytes
            newlines += chunk.count(b"\n")
            pos += len(chunk)
    spans.append((start, size, first_line))
    return spans


def _jsonl_lines(src: SourceConfig, lines, base_id: str, uri: str, first_line: int = 1) -> Iterator[RawDocument]:
    for lineno, line in enumerate(lines, first_line):
        doc_id, line_uri = f"{base_id}#L{lineno}", f"{uri}#L{lineno}"
        if line is None:
            yield RawDocument(doc_id, line_uri, src.license, None, src.name, "too_large",
                              f"line over {MAX_ITEM_BYTES} bytes")
            continue
        if not line.strip():
            continue  # blank lines separate nothing and hold nothing
        if b"\x00" in line:
            yield RawDocument(doc_id, line_uri, src.license, None, src.name, "binary", "contains NUL bytes")
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield RawDocument(doc_id, line_uri, src.license, None, src.name, "invalid_utf8", f"at byte {e.start}")
            continue
        except json.JSONDecodeError as e:
            yield RawDocument(doc_id, line_uri, src.license, None, src.name, "malformed_json", e.msg)
            continue
        yield _record_text(src, record, doc_id, line_uri)


def _iter_parquet(src: SourceConfig, path: Path, base_id: str, uri: str) -> Iterator[RawDocument]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as e:
        yield RawDocument(base_id, uri, src.license, None, src.name, "corrupt_parquet", str(e).splitlines()[0][:200])
        return
    if src.text_field not in names:
        yield RawDocument(base_id, uri, src.license, None, src.name, "missing_text_field",
                          f"no column '{src.text_field}' (columns: {', '.join(names[:10])})")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[src.text_field]):
            for value in batch.column(0).to_pylist():
                doc_id, row_uri = f"{base_id}#{row}", f"{uri}#{row}"
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield RawDocument(doc_id, row_uri, src.license, None, src.name, "invalid_utf8",
                                          f"at byte {e.start}")
                        row += 1
                        continue
                if isinstance(value, str):
                    yield RawDocument(doc_id, row_uri, src.license, value, src.name)
                else:
                    what = "null" if value is None else f"a {type(value).__name__}"
                    yield RawDocument(doc_id, row_uri, src.license, None, src.name, "missing_text_field",
                                      f"column '{src.text_field}' is {what}")
                row += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        yield RawDocument(f"{base_id}#{row}-", f"{uri}#{row}-", src.license, None, src.name, "corrupt_parquet",
                          f"after row {row}: {str(e).splitlines()[0][:200]}")


def _iter_hf(src: SourceConfig) -> Iterator[RawDocument]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.sources '{src.name}': kind 'hf' needs the `datasets` library: "
                        "pip install datasets") from None
    local = Path(src.path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))  # written by save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise UserError(f"data.sources '{src.name}': no split '{src.split}' in {src.path} "
                                    f"(splits: {', '.join(ds)})")
                ds = ds[src.split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(src.path, split=src.split, streaming=True)
    except UserError:
        raise
    except Exception as e:  # the library raises many types; name the source and the cause
        raise UserError(f"data.sources '{src.name}': cannot load dataset '{src.path}' split '{src.split}': "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    uri_base = f"hf://datasets/{src.path}/{src.split}" if not local.exists() else \
        f"{local.resolve().as_uri()}?split={src.split}"
    index = 0
    it = iter(ds)
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as e:  # a corrupt shard mid-stream: record it and stop this source
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            yield RawDocument(f"{src.name}:{src.split}#{index}-", f"{uri_base}#{index}-", src.license, None,
                              src.name, "hf_error", f"{type(e).__name__}: {first_line}")
            return
        yield _record_text(src, record, f"{src.name}:{src.split}#{index}", f"{uri_base}#{index}")
        index += 1
