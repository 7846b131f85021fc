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
`FastAsciiEncoder`, a batch at a time in numpy and pyarrow (the same ids as
`tokenizers`, checked at the start of every run), the rest through
`tokenizers`' `encode_batch_fast`.

Memory stays bounded whatever the corpus size: documents are tokenized once,
streaming, in `documents.jsonl` order into a temporary token file (with each
document's offset); the training stream is then gathered from it in
`order.txt` order through a memory map.

The data manifest gets each document's `tokens` and the tokenizer's hash when
the build does not fingerprint `manifest.json` as the data stage's output
(rewriting it would otherwise make the build re-run every stage); otherwise
they live here, in `shards.json` ("tokens_per_document", "tokenizer_sha256").

Files are memory-mapped by readers; `np.load` never unpickles (allow_pickle=False).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glassforge.errors import UserError
from glassforge.runfolder import AtomicFile, Run, atomic_write_json, sha256_file


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ASCII character classes of the GPT-2 pre-tokenizer pattern, as `tokenizers` (Oniguruma) applies it:
# whitespace is \t \n \v \f \r and space (not \x1c-\x1f, which Python's `re` would count), letters are
# [A-Za-z], numbers [0-9], anything else is "other".
_LETTER, _DIGIT, _OTHER, _SPACE, _BREAK = 1, 2, 3, 4, 5
_CLASS = np.full(256, _OTHER, dtype=np.uint8)
_CLASS[np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = _LETTER
_CLASS[np.frombuffer(b"0123456789", np.uint8)] = _DIGIT
_CLASS[ord(" ")] = _SPACE
_CLASS[np.frombuffer(b"\t\n\x0b\x0c\r", np.uint8)] = _BREAK
_APOSTROPHE = ord("'")


def piece_starts(b: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """Where the GPT-2 pre-tokenizer's pieces start in b, ASCII bytes of documents laid end to end.

    The pattern is `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`
    (leftmost alternative first). On ASCII text its matches are: a run of letters, of digits or of
    other characters, taking one space just before it along; a run of whitespace, except that its last
    character goes to the next piece when that is a space followed by a non-space, and stands alone
    when it is another whitespace character followed by a non-space; and the seven contractions, but
    only where a piece would start anyway (after a letter, digit, non-space whitespace, contraction or
    the document's start: after other characters the apostrophe continues their run, after a space it
    starts " '..."). doc_starts (sorted, one per document, empty documents included) restarts the
    pattern, so no piece crosses two documents. Returns the sorted start offsets (int64).
    """
    n = len(b)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    cls = _CLASS[b]
    ws = cls >= _SPACE
    prev, cur, ws_prev, ws_cur = cls[:-1], cls[1:], ws[:-1], ws[1:]
    start = np.empty(n, dtype=bool)
    start[0] = True
    s = start[1:]
    np.not_equal(cur, prev, out=s)  # a new class starts a piece ...
    s &= ~(ws_prev & ws_cur)  # ... but spaces and other whitespace make one run ...
    s &= ~((prev == _SPACE) & ~ws_cur)  # ... and a space before a non-space belongs to its piece
    last = ws_prev & ~ws_cur  # the last whitespace before a non-space starts a piece
    inner = doc_starts[(doc_starts > 0) & (doc_starts < n)]
    last[inner - 1] = False  # (not when the non-space is the next document's)
    start[:-1] |= last
    start[inner] = True
    apos = np.flatnonzero(b == _APOSTROPHE)
    if len(apos):
        apos = apos[start[apos]]
        ends = np.append(doc_starts[1:], n)[np.searchsorted(doc_starts, apos, side="right") - 1]
        padded = np.concatenate([b, np.zeros(2, dtype=np.uint8)])
        c1, c2 = padded[apos + 1], padded[apos + 2]
        two = np.isin(c1, np.frombuffer(b"stmd", np.uint8)) & (apos + 1 < ends)
        three = (((c1 == ord("r")) & (c2 == ord("e"))) | ((c1 == ord("v")) & (c2 == ord("e")))
                 | ((c1 == ord("l")) & (c2 == ord("l")))) & (apos + 2 < ends)
        for length, hit in ((2, two), (3, three)):
            j, end = apos[hit], ends[hit]
            for k in range(1, length):
                start[j + k] = False
            after = j + length
            start[after[after < end]] = True
    return np.flatnonzero(start)


class FastAsciiEncoder:
    """Byte-level BPE for batches of ASCII documents, several times faster than `tokenizers`, same ids.

    Per batch: the documents' bytes are laid end to end, `piece_starts` finds
    the pre-tokenizer's pieces with a few numpy passes, pyarrow views the
    pieces as one binary array (offsets over the same buffer, no copy) and
    dictionary-encodes it (a C++ hash table), so Python touches each distinct
    piece of the batch once, not each occurrence. A piece's ids come from a
    cache, or once from the tokenizer's own BPE model (`tok.model.tokenize`);
    pyarrow's `take` then gathers every occurrence's ids into one buffer.
    Per-piece Python calls (the `re` findall + dict lookup this replaced) cost
    about 4x more CPU.

    Used only when the tokenizer is exactly the shape glassforge trains (no
    normalizer, ByteLevel without prefix space, plain BPE) and only for ASCII
    documents free of special-token strings; anything else goes through
    `tokenizers`. `run_shards` also checks the first documents against
    `tokenizers` and falls back for the whole run on any difference.
    """

    MAX_CACHE = 1 << 20

    def __init__(self, tok, dtype=np.uint32):
        spec = json.loads(tok.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if (spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
                or not pre.get("use_regex", True) or model.get("type") != "BPE" or model.get("dropout")
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                or model.get("byte_fallback")):
            raise ValueError("not a plain byte-level BPE tokenizer")
        self.model = tok.model
        self.dtype = np.dtype(dtype)
        self.table = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})
        self.specials = [t["content"] for t in spec.get("added_tokens", [])]
        # Two characters that start every special token's text, checked before the full strings.
        self.special_heads = sorted({sp[:2] for sp in self.specials if sp})
        self.cache: dict[bytes, bytes] = {}  # piece -> its ids as self.dtype bytes

    def usable(self, text: str) -> bool:
        return text.isascii() and not (any(h in text for h in self.special_heads)
                                       and any(sp in text for sp in self.specials))

    def _ids(self, piece: bytes) -> bytes:
        ids = [t.id for t in self.model.tokenize(piece.decode("ascii").translate(self.table))]
        return np.asarray(ids, dtype=self.dtype).tobytes()

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts, concatenated; each text's count) for texts that are all `usable`."""
        import pyarrow as pa

        buf = "".join(texts).encode("ascii")
        doc_starts = np.zeros(len(texts), dtype=np.int64)
        if len(texts) > 1:
            np.cumsum([len(t) for t in texts[:-1]], out=doc_starts[1:])
        starts = piece_starts(np.frombuffer(buf, dtype=np.uint8), doc_starts)
        big = len(buf) >= (1 << 28)  # ids bytes can be 4x the text: 64-bit offsets past 2 GB
        offsets = np.empty(len(starts) + 1, dtype=np.int64 if big else np.int32)
        offsets[:-1], offsets[-1] = starts, len(buf)
        pieces = pa.Array.from_buffers(pa.large_binary() if big else pa.binary(), len(starts),
                                       [None, pa.py_buffer(offsets), pa.py_buffer(buf)])
        coded = pieces.dictionary_encode()
        cache = self.cache
        if len(cache) > self.MAX_CACHE:
            cache.clear()
        values = []
        for piece in coded.dictionary.to_pylist():
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self._ids(piece)
            values.append(ids)
        gathered = pa.array(values, type=pa.large_binary() if big else pa.binary()).take(coded.indices)
        _, ends_buf, data_buf = gathered.buffers()
        ends = np.frombuffer(ends_buf, dtype=offsets.dtype, count=len(starts) + 1)
        size = self.dtype.itemsize
        ids = np.frombuffer(data_buf, dtype=self.dtype, count=int(ends[-1]) // size) if ends[-1] else \
            np.empty(0, dtype=self.dtype)
        first_piece = np.searchsorted(starts, np.append(doc_starts, len(buf)))
        counts = np.diff(ends[first_piece].astype(np.int64)) // size
        return ids, counts

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()


class _ChunkTokenizer:
    """Tokens of a chunk of documents, each followed by the separator, as one array.

    ASCII documents go through `FastAsciiEncoder` in one batch, the rest through
    `tokenizers`' `encode_batch_fast` (which skips character offsets we never
    use, about 1.4x faster; older tokenizers lack it). The first 64 fast
    results are compared with `tokenizers`' own; on any difference the fast
    path is off for the rest of the run.
    """

    CHECK = 64

    def __init__(self, tok, dtype: np.dtype, eot: int):
        self.encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self.dtype, self.eot = dtype, eot
        try:
            self.fast: FastAsciiEncoder | None = FastAsciiEncoder(tok, dtype)
        except ValueError:
            self.fast = None
        self.verified = 0

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the chunk's stream, each document's length in it, separator included)."""
        n = len(texts)
        fast_idx = [i for i, t in enumerate(texts) if self.fast.usable(t)] if self.fast is not None else []
        counts = np.zeros(n, dtype=np.int64)
        if fast_idx:
            ids, fast_counts = self.fast.encode_batch(texts if len(fast_idx) == n else [texts[i] for i in fast_idx])
            if self.verified < self.CHECK and not self._agrees(texts, fast_idx, ids, fast_counts):
                self.fast, fast_idx = None, []
            else:
                counts[fast_idx] = fast_counts
        rest = sorted(set(range(n)) - set(fast_idx))
        slow = self.encode([texts[i] for i in rest], add_special_tokens=False) if rest else []
        for i, enc in zip(rest, slow):
            counts[i] = len(enc.ids)
        lengths = counts + 1
        ends = np.cumsum(lengths)
        stream = np.empty(int(ends[-1]) if n else 0, dtype=self.dtype)
        stream[ends - 1] = self.eot
        body = np.ones(len(stream), dtype=bool)
        body[ends - 1] = False
        if not rest:
            stream[body] = ids
        else:  # documents in order: fast ones from ids, the others from tokenizers
            parts = [np.empty(0, dtype=self.dtype)] * n
            if fast_idx:
                bounds = np.concatenate([[0], np.cumsum(counts[fast_idx])]).tolist()
                for k, i in enumerate(fast_idx):
                    parts[i] = ids[bounds[k]:bounds[k + 1]]
            for i, enc in zip(rest, slow):
                parts[i] = np.asarray(enc.ids, dtype=self.dtype)
            stream[body] = np.concatenate(parts)
        return stream, lengths

    def _agrees(self, texts: list[str], fast_idx: list[int], ids: np.ndarray, counts: np.ndarray) -> bool:
        check = fast_idx[:self.CHECK - self.verified]
        self.verified += len(check)
        bounds = np.concatenate([[0], np.cumsum(counts[:len(check)])]).tolist()
        encs = self.encode([texts[i] for i in check], add_special_tokens=False)
        return all(ids[bounds[k]:bounds[k + 1]].tolist() == enc.ids for k, enc in enumerate(encs))


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
    from glassforge.tokenizer import ENDOFTEXT, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tokenize = _ChunkTokenizer(tok, dtype, tok.token_to_id(ENDOFTEXT))
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


def _manifest_is_data_output(run: Run) -> bool:
    try:
        from glassforge.build import STAGES

        data_stage = next(s for s in STAGES if s.name == "data")
        return any(p.name == "manifest.json" for p in data_stage.outputs(run))
    except Exception:  # no build module, or an unexpected layout: never rewrite the manifest
        return True


def run_shards(run: Run) -> dict:
    from glassforge.tokenizer import load_tokenizer

    recipe = run.load_recipe()
    if not (run.data / "documents.jsonl").is_file() or not (run.data / "order.txt").is_file():
        raise UserError(f"{run.root}: no data (documents.jsonl, order.txt); run `glassforge data {run.root}` first")
    tok = load_tokenizer(run.tokenizer)
    dtype = np.dtype(token_dtype(tok.get_vocab_size()))
    tokenizer_sha = sha256_file(run.tokenizer / "tokenizer.json")
    order_sha = sha256_file(run.data / "order.txt")
    info: dict = {"dtype": dtype.name, "tokenizer_sha256": tokenizer_sha, "seed": recipe.seed,
                  "order_sha256": order_sha}

    # Pass 1: tokenize every kept document once, in documents.jsonl order, into a temporary file.
    tmp_path = run.data / ".tokens_by_document.tmp"
    part_path = run.data / ".tokens_by_document.part.tmp"
    docs_path = run.data / "documents.jsonl"
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

        order = (run.data / "order.txt").read_text(encoding="utf-8").splitlines()
        unknown = [d for d in order if d not in index]
        if unknown:
            raise UserError(f"{run.data / 'order.txt'}: names '{unknown[0]}', not a kept document; "
                            f"run `glassforge data {run.root}` again")
        ids_of = {pos: doc_id for doc_id, pos in index.items()}
        # Pass 2: gather each split's stream from the temporary file.
        for split, positions in (("train", [index[d] for d in order]), ("val", val_positions.tolist())):
            ids = [ids_of[p] for p in positions]
            positions = np.asarray(positions, dtype=np.int64)
            offsets = np.zeros(len(positions) + 1, dtype=np.int64)
            if len(positions):
                np.cumsum(lengths[positions], out=offsets[1:])
            with AtomicFile(run.data / f"{split}.bin") as f:
                for a, b in zip(starts[positions].tolist(), starts[positions + 1].tolist()):
                    f.write(memoryview(all_tokens[a:b]))
            with AtomicFile(run.data / f"{split}.offsets.npy") as f:
                np.save(f, offsets, allow_pickle=False)
            info[split] = {"documents": list(ids), "tokens": int(offsets[-1]),
                           "bytes": int(sum(nbytes[p] for p in positions.tolist()))}
        del all_tokens
    finally:
        tmp_path.unlink(missing_ok=True)
        part_path.unlink(missing_ok=True)
    if info["train"]["tokens"] == 0:
        raise UserError("data: the training split is empty")
    tokens_per_document = {doc_id: int(lengths[pos]) - 1 for doc_id, pos in index.items()}
    if _manifest_is_data_output(run):
        info["tokens_per_document"] = tokens_per_document
    else:
        _annotate_manifest(run, tokens_per_document, tokenizer_sha)
    atomic_write_json(run.data / "shards.json", info)
    return {"train_tokens": info["train"]["tokens"], "val_tokens": info["val"]["tokens"]}


def _annotate_manifest(run: Run, tokens: dict[str, int], tokenizer_sha: str) -> None:
    """Add tokens per document and the tokenizer's hash to data/manifest.json (atomically)."""
    from glassforge.data import _manifest_head, _write_manifest_file, iter_manifest_lines

    head = json.loads(_manifest_head(run))
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
                yield json.dumps(d, sort_keys=True, ensure_ascii=False)

    _write_manifest_file(run.data / "manifest.json", head, lines())


def document_tokens(run: Run) -> dict[str, int]:
    """Tokens (without the separator) of every kept document, from the manifest or shards.json."""
    info = json.loads((run.data / "shards.json").read_text()) if (run.data / "shards.json").is_file() else {}
    if "tokens_per_document" in info:
        return info["tokens_per_document"]
    from glassforge.data import iter_manifest_documents

    return {d["id"]: d["tokens"] for d in iter_manifest_documents(run) if d.get("tokens") is not None}


class TokenStream:
    """A memory-mapped split: tokens, document offsets and ids."""

    def __init__(self, data_dir: Path, split: str):
        info_path = Path(data_dir) / "shards.json"
        if not info_path.is_file():
            raise UserError(f"{data_dir}: no token shards; run the data and tokenizer stages first")
        info = json.loads(info_path.read_text())
        self.tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(info["dtype"]), mode="r")
        self.offsets = np.load(Path(data_dir) / f"{split}.offsets.npy", allow_pickle=False)
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
