"""The trace index: a suffix array over the training token stream, built once per release.

The release carries `trace/`, a self-contained index over the training token
stream (the run folder is not needed to query it; file names in
core.runfolder.TraceFolder):

    trace/tokens.bin         the training tokens, stream order, big-endian
                             (uint16 or uint32, as in data/train.bin)
    trace/sa.bin             suffix array: the start of every suffix of the
                             stream in sorted order, 4 bytes per token
                             (little-endian uint32) while the stream has at
                             most 2**32 tokens, else 5 bytes (40-bit)
    trace/buckets.npy        int64, vocab+1: suffixes starting with token t are
                             sa[buckets[t]:buckets[t+1]]
    trace/doc_offsets.npy    int64, n_docs+1: document i is tokens[off[i]:off[i+1]]
                             (its trailing <|endoftext|> included)
    trace/documents.jsonl    one line per document, stream order: id, source,
                             license, sha256
    trace/documents.idx.npy  int64, n_docs+1: byte offset of each line above
    trace/index.json         format, sizes, eot id, tokenizer hash, and the
                             sha256 and size of every file above

Tokens are stored big-endian so that comparing raw bytes compares token
sequences lexicographically. Sorting is then byte-level suffix sorting with
pydivsufsort (libdivsufsort, a well-kept SA-IS-class sorter); we keep the
suffixes that start on a token boundary, and their relative order is exactly
token order. index.json holds no timings: the same training stream gives the
same index, byte for byte (build times are returned, not stored).

Build limits: pydivsufsort sorts the stream as bytes, 4 bytes of working memory
per byte (8 past 2**31 bytes), so a single index is practical up to about a
billion tokens on a machine with tens of GiB.

Past that, the index is sharded (`[release] trace_shards = K`): the training
stream is cut at document ends into K runs of about equal tokens, each run
gets an index of its own in `trace/shard-NNN/` (the layout above, built by its
own task on the data stage's executor: in this process, local processes or
Ray tasks, since shards share nothing), and `trace/index.json` becomes the
list of shards (format `glassforge-trace-sharded/1`): for each, its folder,
first token and first document in the whole stream, and the sha256 of its own
index.json, which holds the sha256 of every file of the shard. A query fans
out to every shard and merges (`release/trace.py`); since no document
straddles two shards and no match crosses a document's end, the answers are
those of one index over the whole stream (tested).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_json
from glassforge.core.hashing import sha256_file
from glassforge.core.manifest import iter_manifest_entries
from glassforge.core.runfolder import Run, TraceFolder
from glassforge.data.executor import Executor
from glassforge.tokenizer.shards import TokenStream

FORMAT = "glassforge-trace/1"
SHARDED_FORMAT = "glassforge-trace-sharded/1"


def _sa_width(n_tokens: int) -> int:
    return 4 if n_tokens <= 2**32 else 5


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Token-level suffix array of a uint16/uint32 token array, by byte-level divsufsort.

    int32 while the stream has under 2**31 bytes, else int64 (as libdivsufsort returns them).
    """
    from pydivsufsort import divsufsort

    width = tokens.dtype.itemsize
    data = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder(">")).view(np.uint8)
    sa = divsufsort(data)
    # Keep suffixes that start on a token boundary, in place to spare memory.
    keep = sa[sa % width == 0] if width > 1 else sa
    del sa
    if width > 1:
        keep //= width
    return keep


def _write_sa(path: Path, sa: np.ndarray, width: int, chunk: int = 1 << 24) -> None:
    with AtomicFile(path) as f:
        for start in range(0, len(sa), chunk):
            part = sa[start:start + chunk]
            if width == 4:
                f.write(part.astype("<u4").tobytes())
            else:
                f.write(part.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width].tobytes())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with AtomicFile(path) as f:
        np.save(f, arr, allow_pickle=False)


def _bincount_chunked(tokens: np.ndarray, minlength: int, chunk: int = 1 << 24) -> np.ndarray:
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        c = np.bincount(np.asarray(tokens[start:start + chunk]), minlength=minlength)
        counts[:len(c)] += c
    return counts


def build_index_arrays(tokens: np.ndarray, doc_offsets: np.ndarray, documents: Sequence[dict], out_dir: Path, *,
                       eot_id: int, tokenizer_sha256: str | None = None, extra: dict | None = None,
                       sa_width: int | None = None) -> dict:
    """Write a trace index for a token stream split into documents; return index.json's content and timings.

    tokens: uint16 or uint32, each document followed by eot_id. doc_offsets: n_docs+1 starts.
    documents: one dict per document (id, source, license, sha256). sa_width forces 4 or 5 bytes
    per suffix-array entry (tests use 5 to exercise the 40-bit layout on small data).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"tokens must be uint16 or uint32, not {tokens.dtype}")
    n = len(tokens)
    if n == 0:
        raise UserError("trace: the training token stream is empty; nothing to index")
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    if len(doc_offsets) != len(documents) + 1 or doc_offsets[0] != 0 or doc_offsets[-1] != n \
            or np.any(np.diff(doc_offsets) <= 0):
        raise ValueError("doc_offsets must rise strictly from 0 to len(tokens), one more than documents")
    width = sa_width or _sa_width(n)
    if width not in (4, 5) or (width == 4 and n > 2**32):
        raise ValueError(f"sa_width {width} cannot address {n} tokens")

    folder = TraceFolder(out_dir)
    # Tokens, big-endian.
    be = np.dtype(tokens.dtype).newbyteorder(">")
    with AtomicFile(folder.tokens) as f:
        for start in range(0, n, 1 << 24):
            f.write(tokens[start:start + (1 << 24)].astype(be).tobytes())
    t_sort = time.perf_counter()
    sa = suffix_array(tokens)
    sort_seconds = time.perf_counter() - t_sort
    _write_sa(folder.suffix_array, sa, width)
    del sa
    vocab = int(max(int(tokens.max()), eot_id)) + 1
    buckets = np.zeros(vocab + 1, dtype=np.int64)
    np.cumsum(_bincount_chunked(tokens, vocab), out=buckets[1:])
    _save_npy(folder.buckets, buckets)
    _save_npy(folder.doc_offsets, doc_offsets)
    line_offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    with AtomicFile(folder.documents) as f:
        for i, d in enumerate(documents):
            row = {k: d.get(k) for k in ("id", "source", "license", "sha256")}
            line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            f.write(line)
            line_offsets[i + 1] = line_offsets[i] + len(line)
    _save_npy(folder.documents_index, line_offsets)
    info = {
        "format": FORMAT,
        "token_dtype": np.dtype(tokens.dtype).name,
        "token_byteorder": "big",
        "token_bytes": int(tokens.dtype.itemsize),
        "sa_bytes": width,
        "tokens": n,
        "documents": len(documents),
        "eot_id": int(eot_id),
        "tokenizer_sha256": tokenizer_sha256,
        **(extra or {}),
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in folder.files},
    }
    atomic_write_json(folder.index, info)
    return {**info, "build_seconds": round(time.perf_counter() - t0, 3), "sort_seconds": round(sort_seconds, 3)}


def _training_stream(run: Run) -> tuple[TokenStream, int, list[dict], dict]:
    """The run's training stream, its <|endoftext|> id, each document's row (id, source, license, sha256), and
    the shards' description."""
    stream = TokenStream(run, "train")
    tokens, offsets, ids = stream.tokens, stream.offsets, stream.doc_ids
    if len(offsets) != len(ids) + 1 or int(offsets[-1]) != len(tokens):
        raise UserError(f"{run.data}: the training stream's offsets do not match its tokens and {run.shards.name}")
    ends = np.asarray(tokens[offsets[1:] - 1]) if len(ids) else np.zeros(0, tokens.dtype)
    if len(ends) == 0 or np.any(ends != ends[0]):
        raise UserError(f"{run.data}: the training documents do not all end with the same <|endoftext|> token")
    wanted = set(ids)
    by_id: dict[str, dict] = {}
    for entry in iter_manifest_entries(run):
        if entry["id"] in wanted and entry.get("status", "kept") == "kept":
            by_id.setdefault(entry["id"], {k: entry.get(k) for k in ("id", "source", "license", "sha256")})
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"{run.data}: {len(missing)} training documents are not in the data manifest "
                        f"(first: {missing[0]})")
    return stream, int(ends[0]), [by_id[i] for i in ids], json.loads(run.shards.read_text())


@dataclass(frozen=True)
class ShardTask:
    """Documents [first, end) of a run's training stream, to index into folder `out` (a task of the executor)."""

    run_root: str
    shard: int
    first: int
    end: int
    out: str


def build_shard(task: ShardTask) -> dict:
    """Index one shard: its documents' tokens, offsets and rows, read from the run folder (shared storage)."""
    run = Run(Path(task.run_root))
    stream, eot, rows, info = _training_stream(run)
    a, b = int(stream.offsets[task.first]), int(stream.offsets[task.end])
    offsets = np.asarray(stream.offsets[task.first:task.end + 1], dtype=np.int64) - a
    return build_index_arrays(np.asarray(stream.tokens[a:b]), offsets, rows[task.first:task.end], Path(task.out),
                              eot_id=eot, tokenizer_sha256=info.get("tokenizer_sha256"),
                              extra={"shard": task.shard, "first_token": a, "first_document": task.first})


def shard_bounds(offsets: np.ndarray, shards: int) -> list[int]:
    """Document numbers where K shards of about equal tokens begin (and the end): cut only at document ends."""
    n_docs = len(offsets) - 1
    shards = max(1, min(shards, n_docs))
    targets = np.asarray(offsets[-1], dtype=np.float64) * np.arange(1, shards) / shards
    cuts = np.searchsorted(offsets, targets, side="left").tolist()
    bounds = [0]
    for c in cuts:
        if bounds[-1] < c < n_docs:
            bounds.append(int(c))
    return bounds + [n_docs]


def write_sharded_index(out_dir: Path, built: list[dict], *, eot_id: int, tokenizer_sha256: str | None,
                        extra: dict | None = None) -> dict:
    """trace/index.json of a sharded index over the shard folders out_dir/shard-NNN already built (`built`: their
    index.json contents, in stream order, each with its first_token and first_document)."""
    folder = TraceFolder(Path(out_dir))
    info = {
        "format": SHARDED_FORMAT,
        "tokens": sum(int(b["tokens"]) for b in built),
        "documents": sum(int(b["documents"]) for b in built),
        "eot_id": int(eot_id),
        "tokenizer_sha256": tokenizer_sha256,
        **(extra or {}),
        "shards": [{"folder": folder.shard(k).name, "first_token": int(b["first_token"]),
                    "first_document": int(b["first_document"]), "tokens": int(b["tokens"]),
                    "documents": int(b["documents"]), "index_sha256": sha256_file(TraceFolder(folder.shard(k)).index)}
                   for k, b in enumerate(built)],
    }
    atomic_write_json(folder.index, info)
    return info


def build_index(run: Run, out_dir: Path, shards: int = 1, executor=None) -> dict:
    """Index the training split of a run's token shards into out_dir (e.g. release/trace).

    Reads the shards (train.bin, its offsets, shards.json) and the data manifest's entries; writes
    a folder that needs nothing else at query time but the release's tokenizer.json. With shards > 1,
    a sharded index whose shards are built by `executor` (a `data.executor.Executor`; in order here if None).
    """
    stream, eot, rows, info = _training_stream(run)
    extra = {"order_sha256": info.get("order_sha256"), "shards_sha256": sha256_file(run.shards)}
    if shards <= 1:
        return build_index_arrays(stream.tokens, stream.offsets, rows, Path(out_dir), eot_id=eot,
                                  tokenizer_sha256=info.get("tokenizer_sha256"), extra=extra)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    folder = TraceFolder(out_dir)
    bounds = shard_bounds(stream.offsets, shards)
    tasks = [ShardTask(str(run.root), k, bounds[k], bounds[k + 1], str(folder.shard(k)))
             for k in range(len(bounds) - 1)]
    built = list((executor or Executor()).map(build_shard, tasks))
    info_out = write_sharded_index(out_dir, built, eot_id=eot, tokenizer_sha256=info.get("tokenizer_sha256"),
                                   extra=extra)
    return {**info_out, "build_seconds": round(time.perf_counter() - t0, 3),
            "sort_seconds": round(sum(b["sort_seconds"] for b in built), 3)}
