"""Searching a trace index: one suffix array (`TraceIndex`), or many shards searched as one (`ShardedTraceIndex`).

`open_index` reads `trace/index.json` and opens whichever it describes; both
answer the same questions with the same answers (the longest match at every
start of a query, the maximal spans, their counts and documents), so
`release/trace.py`'s Tracer does not know which it has. The search itself is
described in `release/trace.py`'s docstring; the format in `trace_index.py`.

A sharded index fans each question out to every shard and merges: the longest
match at a start is the longest of the shards'; a span's count is the sum of
the shards' counts; its documents are the shards' documents, renumbered by the
shard's first document, and ranked as one index ranks them (most occurrences,
then the lowest document number). Documents never straddle shards and no match
crosses an `<|endoftext|>`, so this is exact, except that when a span occurs
more than DOC_SCAN_LIMIT times the documents listed come from a different
sample of its occurrences (the count is exact either way).
"""

from __future__ import annotations

import json
import mmap
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from glassforge.core.errors import UserError
from glassforge.core.hashing import sha256_file
from glassforge.core.runfolder import TraceFolder
from glassforge.release.trace_index import FORMAT, SHARDED_FORMAT

#: Occurrences looked at to find a span's documents; counts are always exact.
DOC_SCAN_LIMIT = 100_000


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class TraceIndex:
    """A memory-mapped trace index: token-level search, no tokenizer needed."""

    def __init__(self, trace_dir: Path | str):
        self.dir = Path(trace_dir)
        folder = TraceFolder(self.dir)
        if not folder.index.is_file():
            raise UserError(f"{self.dir}: no trace index ({folder.index.name})")
        self.meta: dict = json.loads(folder.index.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{self.dir}: unknown trace index format {self.meta.get('format')!r} (want {FORMAT})")
        for path in folder.files:
            want = self.meta["files"][path.name]["bytes"]
            if not path.is_file() or path.stat().st_size != want:
                raise UserError(f"{path}: missing or not the size {folder.index.name} records ({want} bytes)")
        self.n = int(self.meta["tokens"])
        self.w = int(self.meta["token_bytes"])
        self.sa_bytes = int(self.meta["sa_bytes"])
        self.eot_id = int(self.meta["eot_id"])
        self._tok_mm = _map(folder.tokens)
        self.tokens = np.frombuffer(self._tok_mm, dtype=np.dtype(self.meta["token_dtype"]).newbyteorder(">"))
        self._sa_mm = _map(folder.suffix_array)
        # Scalar reads of the suffix array in the search loop: a memoryview index is ~50 ns.
        self._sa_u32 = memoryview(self._sa_mm).cast("I") if self.sa_bytes == 4 and sys.byteorder == "little" else None
        self._sa_arr = np.frombuffer(self._sa_mm, dtype="<u4") if self.sa_bytes == 4 else None
        self._sa_u8 = np.frombuffer(self._sa_mm, dtype=np.uint8)
        # Tokens after the first that a search compares at once as one integer: 3 x 17 bits for
        # uint16 tokens, 1 x 33 bits for uint32 (a token t packs as t + 1; 0 is "past the end").
        self._c, self._bits = (3, 17) if self.w == 2 else (1, 33)
        self.buckets = np.load(folder.buckets, allow_pickle=False)
        self._bucket_list: list[int] = self.buckets.tolist()
        self.doc_offsets = np.load(folder.doc_offsets, mmap_mode="r", allow_pickle=False)
        self._doc_idx = np.load(folder.documents_index, mmap_mode="r", allow_pickle=False)
        self._docs_mm = _map(folder.documents) if self.meta["files"][folder.documents.name]["bytes"] else None
        self.n_docs = int(self.meta["documents"])

    # -- raw access

    def sa_at(self, i: int) -> int:
        if self._sa_u32 is not None:
            return self._sa_u32[i]
        b = self.sa_bytes
        return int.from_bytes(self._sa_mm[i * b:(i + 1) * b], "little")

    def sa_range(self, lo: int, hi: int) -> np.ndarray:
        """Stream positions of suffixes lo..hi-1 (int64)."""
        k = max(0, hi - lo)
        if self.sa_bytes == 4:
            return np.frombuffer(self._sa_mm, dtype="<u4", count=k, offset=lo * 4).astype(np.int64)
        raw = np.frombuffer(self._sa_mm, dtype=np.uint8, count=k * self.sa_bytes, offset=lo * self.sa_bytes)
        wide = np.zeros((k, 8), dtype=np.uint8)
        wide[:, :self.sa_bytes] = raw.reshape(k, self.sa_bytes)
        return wide.view("<u8").ravel().astype(np.int64)

    def key(self, ids: Sequence[int]) -> bytes:
        return np.asarray(ids, dtype=np.int64).astype(self.tokens.dtype).tobytes()

    def _bucket(self, first: int) -> tuple[int, int]:
        if not 0 <= first < len(self._bucket_list) - 1:
            return 0, 0
        return self._bucket_list[first], self._bucket_list[first + 1]

    def _bound(self, key: bytes, lo: int, hi: int, upper: bool) -> int:
        """First suffix in [lo, hi) whose prefix is >= key (or > key when upper)."""
        tok, m, w = self._tok_mm, len(key), self.w
        sa = self._sa_u32
        if sa is not None:
            if upper:
                while lo < hi:
                    mid = (lo + hi) >> 1
                    p = sa[mid] * w
                    if tok[p:p + m] <= key:
                        lo = mid + 1
                    else:
                        hi = mid
            else:
                while lo < hi:
                    mid = (lo + hi) >> 1
                    p = sa[mid] * w
                    if tok[p:p + m] < key:
                        lo = mid + 1
                    else:
                        hi = mid
            return lo
        at = self.sa_at
        while lo < hi:
            mid = (lo + hi) >> 1
            p = at(mid) * w
            s = tok[p:p + m]
            if s < key or (upper and s == key):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def find(self, ids: Sequence[int]) -> tuple[int, int]:
        """Suffix-array range [lo, hi) of the suffixes that start with ids."""
        ids = list(ids)
        if not ids or min(ids) < 0 or max(ids) >= len(self._bucket_list) - 1:
            return 0, 0
        lo, hi = self._bucket(ids[0])
        if len(ids) == 1 or lo == hi:
            return lo, hi
        key = self.key(ids)
        lo = self._bound(key, lo, hi, upper=False)
        return lo, self._bound(key, lo, hi, upper=True)

    def count(self, ids: Sequence[int]) -> int:
        lo, hi = self.find(ids)
        return hi - lo

    def _lcp_tokens(self, key: bytes, p: int) -> int:
        """Whole tokens in common between key and the stream from token p (by memcmps of prefixes)."""
        w = self.w
        s = self._tok_mm[p * w:p * w + len(key)]
        if s == key:
            return len(key) // w
        # Gallop (1, 2, 4, ... tokens: most mismatches come early), then bisect the last gap.
        lo, hi, k = 0, min(len(s), len(key)) // w, 1
        while k <= hi and key[:k * w] == s[:k * w]:
            lo, k = k, k * 2
        hi = min(hi, k - 1)
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if key[:mid * w] == s[:mid * w]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _sa_take(self, idx: np.ndarray) -> np.ndarray:
        """Suffix-array entries at the indices idx (int64), vectorised."""
        if self._sa_arr is not None:
            return self._sa_arr[idx].astype(np.int64)
        b = self.sa_bytes
        raw = self._sa_u8[(idx * b)[:, None] + np.arange(b)].astype(np.int64)
        return (raw << (8 * np.arange(b))).sum(axis=1)

    def _chunk(self, pos: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The CHUNK tokens of the stream from each pos, as (code, values): value t+1, 0 past the
        stream end or past r tokens; the code packs them so that integer order is token order."""
        c, bits = self._c, self._bits
        j = np.arange(c)
        idx = pos[:, None] + j
        inside = (idx < self.n) & (j < r[:, None])
        vals = np.where(inside, self.tokens[np.minimum(idx, self.n - 1)].astype(np.int64) + 1, 0)
        return (vals << (bits * (c - 1 - j))).sum(axis=1), vals

    def _vec_bounds(self, lo: np.ndarray, hi: np.ndarray, qcode: np.ndarray,
                    r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the lower and upper bound of qcode among the chunk codes (the CHUNK tokens
        after the first) of the suffixes in [lo, hi). All queries, both bounds, bisect together in
        numpy: a fixed cost per step, whatever the number of queries."""
        m = len(lo)
        lo2, hi2 = np.concatenate([lo, lo]), np.concatenate([hi, hi])
        q2, r2, upper = np.concatenate([qcode, qcode]), np.concatenate([r, r]), np.arange(2 * m) >= m
        while True:
            a = np.flatnonzero(lo2 < hi2)
            if a.size == 0:
                return lo2[:m], lo2[m:]
            mid = (lo2[a] + hi2[a]) >> 1
            code, _ = self._chunk(self._sa_take(mid) + 1, r2[a])
            right = np.where(upper[a], code <= q2[a], code < q2[a])
            lo2[a] = np.where(right, mid + 1, lo2[a])
            hi2[a] = np.where(right, hi2[a], mid)

    def _longest_at(self, key: bytes, lo: int, hi: int, floor: int) -> int:
        """Longest prefix of key (in tokens) that starts a suffix in [lo, hi); at least floor."""
        pos = self._bound(key, lo, hi, upper=False)
        best = floor
        if pos < hi:
            best = max(best, self._lcp_tokens(key, self.sa_at(pos)))
        if pos > lo:
            best = max(best, self._lcp_tokens(key, self.sa_at(pos - 1)))
        return best

    def longest_matches(self, ids: Sequence[int]) -> list[int]:
        """For each start i, the largest L with ids[i:i+L] in the stream (no span crosses <|endoftext|>).

        A segment is a run of the query with no <|endoftext|> (nor a token the index never saw).
        1. Each segment's first start is searched alone (memcmp bisection); if it matches to the
           end of the segment, so does every later start (a suffix of a string that occurs occurs
           too), so a passage copied from the data costs one search, not one per token.
        2. The other starts bisect their first 1 + CHUNK tokens all at once, in numpy; where those
           do not occur, the longest match is with a neighbour of the bound, read off directly.
        3. Only starts whose first 1 + CHUNK tokens occur bisect their full key, inside that
           already narrow range, by memcmp; a match to the segment's end settles the rest of it.
        """
        q = np.asarray(list(ids), dtype=np.int64)
        n, c, w = len(q), self._c, self.w
        out = np.zeros(n, dtype=np.int64)
        if n == 0:
            return []
        ok = (q >= 0) & (q < len(self.buckets) - 1) & (q != self.eot_id)
        bad = np.flatnonzero(~ok)
        seg_end = np.append(bad, n)[np.searchsorted(bad, np.arange(n))]  # first stop at or after i
        qs = np.where(ok, q, 0)
        lo_all, hi_all = self.buckets[qs], self.buckets[qs + 1]
        todo = ok & (hi_all > lo_all)
        qbytes = qs.astype(self.tokens.dtype).tobytes()
        # 1. The first start of each segment.
        for i in np.flatnonzero(todo & np.concatenate([[True], ~ok[:-1]])).tolist():
            end = int(seg_end[i])
            best = self._longest_at(qbytes[i * w:end * w], int(lo_all[i]), int(hi_all[i]), 1)
            out[i] = best
            todo[i] = False
            if i + best == end:
                out[i:end] = end - np.arange(i, end)
                todo[i:end] = False
        starts = np.flatnonzero(todo)
        if starts.size == 0:
            return out.tolist()
        # 2. Every other start: its first 1 + r tokens (r <= CHUNK, fewer at the segment's end).
        lo, hi = lo_all[starts], hi_all[starts]
        r = np.minimum(c, seg_end[starts] - starts - 1)
        qpad = np.append(qs, np.zeros(c, dtype=np.int64))
        j = np.arange(c)
        qvals = np.where(j < r[:, None], qpad[starts[:, None] + 1 + j] + 1, 0)
        qcode = (qvals << (self._bits * (c - 1 - j))).sum(axis=1)
        lb, ub = self._vec_bounds(lo, hi, qcode, r)
        found = ub > lb
        res = np.where(found, 1 + r, 1)
        # Where the first 1 + r tokens do not occur, the bound is also the full key's, and the
        # longest match is with one of its two neighbours (inside the bucket: the first token matches).
        nf = np.flatnonzero(~found)
        for nb, inside in ((lb[nf], lb[nf] < hi[nf]), (lb[nf] - 1, lb[nf] > lo[nf])):
            k = nf[inside]
            if k.size:
                _, svals = self._chunk(self._sa_take(nb[inside]) + 1, r[k])
                eq = (svals == qvals[k]) & (j < r[k][:, None])
                res[k] = np.maximum(res[k], 1 + np.cumprod(eq, axis=1).sum(axis=1))
        # 3. Starts whose first 1 + CHUNK tokens occur and whose segment goes on: the full key.
        deep = np.flatnonzero(found & (r == c) & (seg_end[starts] - starts > 1 + c))
        if deep.size:
            settled_until = -1
            for k, b in zip(deep.tolist(), ub[deep].tolist()):
                i = int(starts[k])
                end = int(seg_end[i])
                if i < settled_until:
                    res[k] = end - i
                    continue
                res[k] = self._longest_at(qbytes[i * w:end * w], int(lb[k]), b, 1 + c)
                if i + res[k] == end:
                    settled_until = end
        out[starts] = res
        return out.tolist()

    def maximal_spans(self, ids: Sequence[int], min_tokens: int = 1) -> list[tuple[int, int]]:
        """Token ranges [i, j) of ids that occur in the stream and cannot be extended either way."""
        return spans_of(self.longest_matches(ids), min_tokens)

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_offsets, positions, side="right") - 1

    def document(self, i: int) -> dict:
        """Row i of the document table: id, source, license, sha256."""
        a, b = int(self._doc_idx[i]), int(self._doc_idx[i + 1])
        return json.loads(self._docs_mm[a:b]) if self._docs_mm is not None else {}

    def occurrences(self, lo: int, hi: int, max_docs: int) -> dict:
        """Documents holding the suffixes lo..hi-1: the max_docs with most occurrences, and the first position in each."""
        scan_hi = min(hi, lo + DOC_SCAN_LIMIT)
        pos = np.sort(self.sa_range(lo, scan_hi))
        docs = self.document_of(pos)
        # Positions are sorted, so each document's first index is its first occurrence.
        uniq, first, counts = np.unique(docs, return_index=True, return_counts=True)
        pick = np.lexsort((uniq, -counts))[:max_docs]
        return {
            "document_count": int(len(uniq)),
            "documents_exact": scan_hi == hi,
            "documents": [(int(uniq[k]), int(counts[k]), int(pos[first[k]])) for k in pick],
        }

    def span_occurrences(self, ids: Sequence[int], max_docs: int) -> tuple[int, dict]:
        """(occurrences of ids in the stream, `occurrences` of them: their documents)."""
        lo, hi = self.find(ids)
        return hi - lo, self.occurrences(lo, hi, max_docs)

    def trace_ids(self, ids: Sequence[int], min_tokens: int = 8, max_docs: int = 5) -> list[dict]:
        """Maximal spans of ids at least min_tokens long, longest and rarest first, with their documents."""
        return trace_spans(self, ids, min_tokens, max_docs)

    def token_slice(self, a: int, b: int) -> np.ndarray:
        """Stream tokens [a, b), inside one document."""
        return self.tokens[a:b]

    def doc_span(self, doc: int) -> tuple[int, int]:
        """Token range of document doc without its trailing <|endoftext|>."""
        a, b = int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1])
        if b > a and int(self.tokens[b - 1]) == self.eot_id:
            b -= 1
        return a, b


def spans_of(lengths: Sequence[int], min_tokens: int) -> list[tuple[int, int]]:
    """Maximal spans [i, j) from the longest match at each start: the starts where i + L(i) grows."""
    spans: list[tuple[int, int]] = []
    reach = 0  # furthest end of any span starting earlier
    for i, length in enumerate(lengths):
        end = i + length
        if length and end > reach:
            if length >= min_tokens:
                spans.append((i, end))
            reach = end
    return spans


def trace_spans(index, ids: Sequence[int], min_tokens: int, max_docs: int) -> list[dict]:
    """Maximal spans of ids at least min_tokens long, longest and rarest first, with their documents."""
    ids = list(ids)
    spans = []
    for i, j in index.maximal_spans(ids, min_tokens):
        count, occ = index.span_occurrences(ids[i:j], max_docs)
        spans.append({"token_start": i, "token_end": j, "tokens": j - i, "occurrences": count, **occ})
    spans.sort(key=lambda s: (-s["tokens"], s["occurrences"], s["token_start"]))
    return spans


class ShardedTraceIndex:
    """Shards of one training stream, each a TraceIndex, searched together (see the module docstring)."""

    def __init__(self, trace_dir: Path | str, meta: dict):
        self.dir = Path(trace_dir)
        self.meta = meta
        self.shards: list[TraceIndex] = []
        for s in meta["shards"]:
            folder = TraceFolder(self.dir / s["folder"])
            if not folder.index.is_file() or sha256_file(folder.index) != s["index_sha256"]:
                raise UserError(f"{folder.index}: missing, or not the shard index {TraceFolder(self.dir).index} "
                                "records (its sha256 differs)")
            self.shards.append(TraceIndex(folder.root))
        self.n, self.n_docs, self.eot_id = int(meta["tokens"]), int(meta["documents"]), int(meta["eot_id"])
        self.first_token = np.array([s["first_token"] for s in meta["shards"]], dtype=np.int64)
        self.first_document = np.array([s["first_document"] for s in meta["shards"]], dtype=np.int64)

    def longest_matches(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        best = np.zeros(len(ids), dtype=np.int64)
        for shard in self.shards:
            best = np.maximum(best, shard.longest_matches(ids))
        return best.tolist()

    def maximal_spans(self, ids: Sequence[int], min_tokens: int = 1) -> list[tuple[int, int]]:
        return spans_of(self.longest_matches(ids), min_tokens)

    def span_occurrences(self, ids: Sequence[int], max_docs: int) -> tuple[int, dict]:
        total, exact, found, n_docs = 0, True, [], 0
        for k, shard in enumerate(self.shards):
            lo, hi = shard.find(ids)
            if hi == lo:
                continue
            total += hi - lo
            occ = shard.occurrences(lo, hi, DOC_SCAN_LIMIT)
            exact = exact and occ["documents_exact"]
            n_docs += occ["document_count"]
            found += [(int(self.first_document[k]) + d, n, int(self.first_token[k]) + p)
                      for d, n, p in occ["documents"]]
        found.sort(key=lambda r: (-r[1], r[0]))
        return total, {"document_count": n_docs, "documents_exact": exact, "documents": found[:max_docs]}

    def trace_ids(self, ids: Sequence[int], min_tokens: int = 8, max_docs: int = 5) -> list[dict]:
        return trace_spans(self, ids, min_tokens, max_docs)

    def _shard_of_document(self, doc: int) -> int:
        return int(np.searchsorted(self.first_document, doc, side="right") - 1)

    def document(self, doc: int) -> dict:
        k = self._shard_of_document(doc)
        return self.shards[k].document(doc - int(self.first_document[k]))

    def doc_span(self, doc: int) -> tuple[int, int]:
        k = self._shard_of_document(doc)
        a, b = self.shards[k].doc_span(doc - int(self.first_document[k]))
        return a + int(self.first_token[k]), b + int(self.first_token[k])

    def token_slice(self, a: int, b: int) -> np.ndarray:
        k = int(np.searchsorted(self.first_token, a, side="right") - 1)
        start = int(self.first_token[k])
        return self.shards[k].token_slice(a - start, b - start)


def open_index(trace_dir: Path | str) -> "TraceIndex | ShardedTraceIndex":
    """The index in trace_dir, one suffix array or shards, by its index.json's format."""
    folder = TraceFolder(Path(trace_dir))
    if not folder.index.is_file():
        raise UserError(f"{folder.root}: no trace index ({folder.index.name})")
    try:
        meta = json.loads(folder.index.read_text())
    except ValueError:
        raise UserError(f"{folder.index}: not JSON") from None
    if meta.get("format") == SHARDED_FORMAT:
        return ShardedTraceIndex(folder.root, meta)
    return TraceIndex(folder.root)
