"""Byte-level BPE for batches of ASCII documents, several times faster than `tokenizers`, with the same ids.

Tokenizing is most of the shards stage's time. ASCII documents (nearly all of
the embedded corpus) go through `FastAsciiEncoder`; anything else, and any
tokenizer not of the exact shape glassforge trains, goes through `tokenizers`
itself. `ChunkTokenizer` checks the first documents of every run against
`tokenizers` and falls back for the whole run on any difference.
"""

from __future__ import annotations

import json

import numpy as np


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


class ChunkTokenizer:
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

