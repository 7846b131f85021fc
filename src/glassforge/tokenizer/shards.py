"""Token shards: the training stream on disk, every token traceable to its document.

After the tokenizer exists, every kept document is tokenized and written, with
`<|endoftext|>` after each, into one flat file per split: `data/train.bin` and
`data/val.bin` (uint16 while the vocabulary fits, uint32 above). Beside each,
`*.offsets.npy` holds the start of every document in the stream (n + 1
entries), and `shards.json` names the documents in stream order, so token N
maps back to its document by a binary search.

The training stream follows `data/order.txt`, the seeded, weighted order the
data stage wrote (a document of a source with weight 2 appears twice);
validation documents follow `documents.jsonl`. `shards.json` records the
tokenizer's sha256, the seed and the order file's sha256.

Tokenizing is most of this stage's time. ASCII documents go through
`FastAsciiEncoder` (`fast.py`), a batch at a time in numpy and pyarrow (the
same ids as `tokenizers`, checked at the start of every run), the rest through
`tokenizers`' `encode_batch_fast`.

Memory stays bounded whatever the corpus size: documents are tokenized once,
streaming, in `documents.jsonl` order into a temporary token file (with each
document's offset); the training stream is then gathered from it in
`order.txt` order through a memory map.

The data manifest gets each document's `tokens` and the tokenizer's hash (the
build leaves the manifest out of the data stage's fingerprint for this reason,
see `core.stages`).

Files are memory-mapped by readers; `np.load` never unpickles (allow_pickle=False).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_json
from glassforge.core.hashing import sha256_file
from glassforge.core.manifest import (
    entry_line,
    iter_manifest_entries,
    iter_manifest_lines,
    read_manifest_head,
    write_data_manifest,
)
from glassforge.core.runfolder import Run
from glassforge.tokenizer.bpe import ENDOFTEXT, load_tokenizer
from glassforge.tokenizer.fast import ChunkTokenizer


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass
class _Part:
    """What tokenizing one byte range of documents.jsonl gave, in file order."""

    tmp_path: Path  # the documents' tokens, each followed by the separator
    ids: list[str]
    is_val: list[bool]
    nbytes: list[int]  # UTF-8 bytes of each text
    lengths: np.ndarray  # tokens of each document, separator included


def _tokenize_part(docs_path: Path, tokenizer_dir: Path, dtype: np.dtype, begin: int, end: int,
                   tmp_path: Path, progress: bool) -> _Part:
    """Tokenize the documents.jsonl lines that start in [begin, end) into tmp_path."""
    tok = load_tokenizer(tokenizer_dir)
    tokenize = ChunkTokenizer(tok, dtype, tok.token_to_id(ENDOFTEXT))
    part = _Part(tmp_path, [], [], [], np.empty(0, dtype=np.int64))
    lengths: list[np.ndarray] = []
    chunk: list[str] = []
    bar = tqdm(desc="tokenize", unit="doc", leave=False, mininterval=1.0, disable=not progress)
    with open(docs_path, "rb") as f, open(tmp_path, "wb") as tmp:
        f.seek(begin)
        at, size = begin, 0
        for line in f:
            if at >= end:
                break
            at += len(line)
            doc = json.loads(line)
            text = doc["text"]
            part.ids.append(doc["id"])
            part.is_val.append(doc["split"] == "val")
            part.nbytes.append(len(text) if text.isascii() else len(text.encode("utf-8")))
            chunk.append(text)
            size += part.nbytes[-1]
            if len(chunk) >= 1024 or size >= (4 << 20):
                stream, n = tokenize(chunk)
                tmp.write(memoryview(stream))
                lengths.append(n)
                bar.update(len(chunk))
                chunk, size = [], 0
        if chunk:
            stream, n = tokenize(chunk)
            tmp.write(memoryview(stream))
            lengths.append(n)
    bar.close()
    if lengths:
        part.lengths = np.concatenate(lengths)
    return part


_PARALLEL_MIN_BYTES = 16 << 20


def _tokenize_in_parts(docs_path: Path, tokenizer_dir: Path, dtype: np.dtype, tmp_paths: list[Path]) -> list[_Part]:
    """Tokenize documents.jsonl, its second half in a forked process while this one does the first.

    Each process reads its own byte range of the file (split at a line end), so
    no text crosses between processes, only ids and lengths come back: the
    pickling that made forked tokenizing workers lose earlier is gone. Reading
    and tokenizing are about 70% of this stage's CPU time; on 216 MB the stage
    took 2.7 s instead of 4.0 s with the second core free. Small files (tests,
    tiny recipes), single-core machines and GLASSFORGE_SHARDS_PROCESSES=1 stay
    in one process.
    """
    import multiprocessing as mp
    import os

    size = docs_path.stat().st_size
    env = os.environ.get("GLASSFORGE_SHARDS_PROCESSES", "2")
    if env not in ("1", "2"):
        raise UserError(f"GLASSFORGE_SHARDS_PROCESSES: expected 1 or 2, got '{env}'")
    if (env == "1" or size < _PARALLEL_MIN_BYTES or (os.cpu_count() or 1) < 2
            or "fork" not in mp.get_all_start_methods()):
        return [_tokenize_part(docs_path, tokenizer_dir, dtype, 0, size, tmp_paths[0], True)]
    with open(docs_path, "rb") as f:
        f.seek(size // 2)
        f.readline()
        mid = f.tell()
    with mp.get_context("fork").Pool(1) as pool:
        second = pool.apply_async(_tokenize_part, (docs_path, tokenizer_dir, dtype, mid, size, tmp_paths[1], False))
        first = _tokenize_part(docs_path, tokenizer_dir, dtype, 0, mid, tmp_paths[0], True)
        return [first, second.get()]


def run_shards(run: Run) -> dict:
    """The shards stage: tokenize the run's documents into the training and validation streams, and add each
    document's token count and the tokenizer's hash to the data manifest."""
    info, tokens_per_document = write_shards(run)
    _annotate_manifest(run, tokens_per_document, info["tokenizer_sha256"])
    return {"train_tokens": info["train"]["tokens"], "val_tokens": info["val"]["tokens"]}


def write_shards(run: Run) -> tuple[dict, dict[str, int]]:
    """train.bin, val.bin, their offsets and shards.json from documents.jsonl and order.txt (no manifest
    needed: `verify --replay` tokenizes a release's data pack with this); (shards.json, tokens per document)."""
    recipe = run.load_recipe()
    if not run.documents.is_file() or not run.order.is_file():
        raise UserError(f"{run.root}: no data (documents.jsonl, order.txt); run `glassforge data {run.root}` first")
    tok = load_tokenizer(run.tokenizer)
    dtype = np.dtype(token_dtype(tok.get_vocab_size()))
    tokenizer_sha = sha256_file(run.tokenizer_json)
    order_sha = sha256_file(run.order)
    info: dict = {"dtype": dtype.name, "tokenizer_sha256": tokenizer_sha, "seed": recipe.seed,
                  "order_sha256": order_sha}

    # Pass 1: tokenize every kept document once, in documents.jsonl order, into a temporary file.
    tmp_path = run.data / ".tokens_by_document.tmp"
    part_path = run.data / ".tokens_by_document.part.tmp"
    docs_path = run.documents
    try:
        parts = _tokenize_in_parts(docs_path, run.tokenizer, dtype, [tmp_path, part_path])
        with open(tmp_path, "ab") as tmp:  # the second part's tokens after the first's
            for part in parts[1:]:
                with open(part.tmp_path, "rb") as f:
                    shutil.copyfileobj(f, tmp, 1 << 22)
        part_path.unlink(missing_ok=True)
        index: dict[str, int] = {}  # id -> position in documents.jsonl
        for doc_id in (d for part in parts for d in part.ids):
            if doc_id in index:
                raise UserError(f"{docs_path}: id '{doc_id}' appears twice; run `glassforge data {run.root}` again")
            index[doc_id] = len(index)
        nbytes = [n for part in parts for n in part.nbytes]
        val_positions = np.flatnonzero(np.concatenate([np.asarray(part.is_val, dtype=bool) for part in parts]))
        starts = np.zeros(len(nbytes) + 1, dtype=np.int64)
        if nbytes:
            np.cumsum(np.concatenate([part.lengths for part in parts]), out=starts[1:])
        lengths = np.diff(starts)
        all_tokens = np.memmap(tmp_path, dtype=dtype, mode="r") if starts[-1] else np.empty(0, dtype=dtype)

        order = run.order.read_text(encoding="utf-8").splitlines()
        unknown = [d for d in order if d not in index]
        if unknown:
            raise UserError(f"{run.order}: names '{unknown[0]}', not a kept document; "
                            f"run `glassforge data {run.root}` again")
        ids_of = {pos: doc_id for doc_id, pos in index.items()}
        # Pass 2: gather each split's stream from the temporary file.
        for split, positions in (("train", [index[d] for d in order]), ("val", val_positions.tolist())):
            ids = [ids_of[p] for p in positions]
            positions = np.asarray(positions, dtype=np.int64)
            offsets = np.zeros(len(positions) + 1, dtype=np.int64)
            if len(positions):
                np.cumsum(lengths[positions], out=offsets[1:])
            with AtomicFile(run.split_tokens(split)) as f:
                for a, b in zip(starts[positions].tolist(), starts[positions + 1].tolist()):
                    f.write(memoryview(all_tokens[a:b]))
            with AtomicFile(run.split_offsets(split)) as f:
                np.save(f, offsets, allow_pickle=False)
            info[split] = {"documents": list(ids), "tokens": int(offsets[-1]),
                           "bytes": int(sum(nbytes[p] for p in positions.tolist()))}
        del all_tokens
    finally:
        tmp_path.unlink(missing_ok=True)
        part_path.unlink(missing_ok=True)
    if info["train"]["tokens"] == 0:
        raise UserError("data: the training split is empty")
    atomic_write_json(run.shards, info)
    return info, {doc_id: int(lengths[pos]) - 1 for doc_id, pos in index.items()}


def _annotate_manifest(run: Run, tokens: dict[str, int], tokenizer_sha: str) -> None:
    """Add tokens per document to the manifest's entries and the tokenizer's hash to its head (atomically)."""
    head = read_manifest_head(run)
    head["tokenizer_sha256"] = tokenizer_sha

    def lines():
        for line, d in iter_manifest_lines(run):
            n = tokens.get(d["id"]) if d.get("status") == "kept" else None
            if n is None:
                yield line
            elif max(d) < "tokens":
                # The line is json.dumps(d, sort_keys=True) and "tokens" sorts last: append it, no re-encoding.
                yield f'{line[:-1]}, "tokens": {n}}}'
            else:
                d["tokens"] = n
                yield entry_line(d)

    write_data_manifest(run, head, lines())


def document_tokens(run: Run) -> dict[str, int]:
    """Tokens (without the separator) of every kept document, from the manifest."""
    return {d["id"]: d["tokens"] for d in iter_manifest_entries(run) if d.get("tokens") is not None}


class TokenStream:
    """A memory-mapped split: tokens, document offsets and ids."""

    def __init__(self, run: Run, split: str):
        if not run.shards.is_file():
            raise UserError(f"{run.data}: no token shards; run the data and tokenizer stages first")
        info = json.loads(run.shards.read_text())
        self.tokens = np.memmap(run.split_tokens(split), dtype=np.dtype(info["dtype"]), mode="r")
        self.offsets = np.load(run.split_offsets(split), allow_pickle=False)
        self.doc_ids: list[str] = info[split]["documents"]
        # Bytes of text per token, to turn a loss in nats per token into bits per byte.
        self.bytes_per_token = info[split]["bytes"] / max(1, info[split]["tokens"])

    def __len__(self) -> int:
        return len(self.tokens)

    def document_of(self, token_index: int) -> int:
        """Index (into doc_ids) of the document that holds stream position token_index."""
        if not 0 <= token_index < len(self.tokens):
            raise IndexError(token_index)
        return int(np.searchsorted(self.offsets, token_index, side="right") - 1)
