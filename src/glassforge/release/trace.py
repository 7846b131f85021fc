"""Trace text back to the training documents that contain it verbatim, through the release's trace index.

The index (`trace_index.py` builds it and describes its files) needs nothing
but the release's tokenizer at query time.

Why these choices:

- A plain suffix array answers every question we ask (does this span occur,
  how often, where) with two binary searches, and needs nothing but the tokens
  beside it. At 4 bytes per token (5 past 4G tokens) it stays under the
  6-bytes-per-token budget; an FM-index would be smaller but far slower to
  query from Python, a suffix tree or automaton far larger.
- Query-time comparisons are `bytes < bytes` on slices of an `mmap` of the
  big-endian tokens, i.e. memcmp in C, so a binary search costs about a
  microsecond a step. The bucket table (one int64 per vocabulary entry) skips
  the first log2(vocab) steps of every search.
- Tracing needs, for every start i of the query, the longest match L(i); the
  maximal spans are the starts where i + L(i) grows. All starts bisect their
  first 4 tokens (2 with a uint32 vocabulary) together in numpy, so most of a
  novel text is settled in one vectorised pass; only starts whose first tokens
  occur go on to a memcmp bisection, inside an already narrow range; and a
  start that matches to the end of the query settles all later ones, so a
  passage copied from the data costs one search.
- Documents never straddle: every document ends with `<|endoftext|>`, and a
  query is cut at any `<|endoftext|>` it contains, so no matched span can
  include one, and so no span can cross from one document into the next.
- Everything is memory-mapped at query time; `np.load` never unpickles.

Matching is on whole tokens, as the model saw its data: a span must start and
end on the token boundaries the training tokenization had. `contains` also
tries the text with a leading space, since the byte-level BPE glues a word to
the space before it.
"""

from __future__ import annotations

import json
import mmap
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from glassforge.core.errors import UserError
from glassforge.core.hashing import sha256_file
from glassforge.core.runfolder import Release, TraceFolder, resolve_release
from glassforge.release.trace_index import FORMAT
from glassforge.tokenizer.bpe import load_tokenizer

#: Occurrences looked at to find a span's documents; counts are always exact.
DOC_SCAN_LIMIT = 100_000
SNIPPET_CONTEXT = 24  # tokens each side of the span


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
        lengths = self.longest_matches(ids)
        spans: list[tuple[int, int]] = []
        reach = 0  # furthest end of any span starting earlier
        for i, length in enumerate(lengths):
            end = i + length
            if length and end > reach:
                if length >= min_tokens:
                    spans.append((i, end))
                reach = end
        return spans

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

    def trace_ids(self, ids: Sequence[int], min_tokens: int = 8, max_docs: int = 5) -> list[dict]:
        """Maximal spans of ids at least min_tokens long, longest and rarest first, with their documents."""
        ids = list(ids)
        spans = []
        for i, j in self.maximal_spans(ids, min_tokens):
            lo, hi = self.find(ids[i:j])
            occ = self.occurrences(lo, hi, max_docs)
            spans.append({"token_start": i, "token_end": j, "tokens": j - i, "occurrences": hi - lo, **occ})
        spans.sort(key=lambda s: (-s["tokens"], s["occurrences"], s["token_start"]))
        return spans

    def doc_span(self, doc: int) -> tuple[int, int]:
        """Token range of document doc without its trailing <|endoftext|>."""
        a, b = int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1])
        if b > a and int(self.tokens[b - 1]) == self.eot_id:
            b -= 1
        return a, b


class Tracer:
    """Trace text against a release's trace index, tokenized with the release's tokenizer.

    Thread-safe for concurrent queries (read-only maps; the tokenizer is reentrant).
    """

    def __init__(self, trace_dir: Path | str):
        trace_dir = Path(trace_dir)
        self.index = TraceIndex(trace_dir)
        self.tokenizer = load_tokenizer(trace_dir.parent)
        want = self.index.meta.get("tokenizer_sha256")
        tokenizer_json = Release(trace_dir.parent).tokenizer_json
        if want and sha256_file(tokenizer_json) != want:
            raise UserError(f"{trace_dir}: the trace index was built with another tokenizer than {tokenizer_json}")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False) if len(ids) else ""

    def _snippet(self, doc: int, pos: int, length: int, context: int = SNIPPET_CONTEXT) -> dict:
        a, b = self.index.doc_span(doc)
        s, e = max(a, pos - context), min(b, pos + length + context)
        toks = self.index.tokens
        before, match, after = (self._decode(toks[s:pos]), self._decode(toks[pos:pos + length]),
                                self._decode(toks[pos + length:e]))
        lead, tail = ("…" if s > a else ""), ("…" if e < b else "")
        return {"snippet": f"{lead}{before}«{match}»{after}{tail}",
                "snippet_parts": [lead + before, match, after + tail],
                "token_offset": pos - a}

    def _documents(self, found: list[tuple[int, int, int]], length: int) -> list[dict]:
        out = []
        for doc, n_occ, pos in found:
            row = self.index.document(doc)
            out.append({"id": row.get("id"), "source": row.get("source"), "license": row.get("license"),
                        "sha256": row.get("sha256"), "occurrences": n_occ, **self._snippet(doc, pos, length)})
        return out

    def _encode(self, text: str):
        if not isinstance(text, str) or not text:
            raise UserError("the text is empty")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def trace(self, text: str, min_tokens: int = 8, max_docs: int = 5) -> dict:
        """Maximal spans of text (at least min_tokens tokens) found verbatim in the training data.

        Spans come longest first, then rarest; each gives char offsets [start, end) into text, its
        token count, the number of occurrences in the training stream and up to max_docs documents
        (those holding it most often) with a snippet where «the span» is marked.
        """
        if min_tokens < 1:
            raise UserError(f"min_tokens must be at least 1, not {min_tokens}")
        if max_docs < 0:
            raise UserError(f"max_docs must be at least 0, not {max_docs}")
        t0 = time.perf_counter()
        if not isinstance(text, str):
            raise UserError("the text must be a string")
        # An empty text (an empty completion, say) has no spans; it is not an error.
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        spans = self.index.trace_ids(ids, min_tokens=min_tokens, max_docs=max_docs)
        covered = np.zeros(len(ids), dtype=bool)
        for s in spans:
            i, j = s["token_start"], s["token_end"]
            covered[i:j] = True
            s["start"], s["end"] = offsets[i][0], offsets[j - 1][1]
            s["text"] = text[s["start"]:s["end"]]
            s["documents"] = self._documents(s["documents"], j - i)
        ordered = [{k: s[k] for k in ("start", "end", "text", "tokens", "token_start", "token_end", "occurrences",
                                      "document_count", "documents_exact", "documents")} for s in spans]
        return {
            "tokens": len(ids),
            "min_tokens": min_tokens,
            "spans": ordered,
            "covered_tokens": int(covered.sum()),
            "index": {"tokens": self.index.n, "documents": self.index.n_docs},
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    def contains(self, text: str, max_docs: int = 10) -> dict:
        """Exact membership: how often text occurs in the training stream, and in which documents.

        Matching is on whole tokens; the text is also tried with a leading space (the tokenizer
        joins a word to the space before it, so mid-sentence occurrences tokenize that way). The
        two forms start with different tokens, so their occurrences never overlap and add up.
        """
        t0 = time.perf_counter()
        enc = self._encode(text)
        forms = [enc.ids]
        if not text[0].isspace():
            forms.append(self.tokenizer.encode(" " + text, add_special_tokens=False).ids)
        total, exact, merged = 0, True, {}
        for ids in forms:
            if self.index.eot_id in ids:
                continue
            lo, hi = self.index.find(ids)
            total += hi - lo
            exact = exact and hi - lo <= DOC_SCAN_LIMIT
            if hi > lo:
                for doc, n_occ, pos in self.index.occurrences(lo, hi, max_docs=DOC_SCAN_LIMIT)["documents"]:
                    if doc in merged:
                        merged[doc][1] += n_occ
                    else:
                        merged[doc] = [doc, n_occ, pos, len(ids)]
        ranked = sorted(merged.values(), key=lambda r: (-r[1], r[0]))
        docs = []
        for doc, n_occ, pos, length in ranked[:max_docs]:
            docs.extend(self._documents([(doc, n_occ, pos)], length))
        return {
            "text": text,
            "tokens": len(enc.ids),
            "count": total,
            "document_count": len(merged),
            "documents_exact": exact,
            "documents": docs,
            "index": {"tokens": self.index.n, "documents": self.index.n_docs},
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 3),
        }


# --------------------------------------------------------------------------------------------- CLI


def open_tracer(run: Path | str) -> Tracer:
    """The Tracer of a run folder's release, or of a release folder."""
    release = Release(resolve_release(run))
    if not release.trace_index.is_file():
        raise UserError(f"{release.root}: the release has no trace index (trace/index.json); "
                        f"rebuild it with `glassforge release`")
    return Tracer(release.trace)


def _short(text: str, limit: int = 240) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_trace(result: dict) -> str:
    idx = result["index"]
    where = f"the training data ({_plural(idx['tokens'], 'token')}, {_plural(idx['documents'], 'document')})"
    if not result["spans"]:
        return (f"No span of {result['min_tokens']} or more tokens of this text "
                f"({_plural(result['tokens'], 'token')}) occurs verbatim in {where}.")
    pct = 100 * result["covered_tokens"] / max(1, result["tokens"])
    n = len(result["spans"])
    lines = [f"{_plural(n, 'span')} of at least {result['min_tokens']} tokens occur{'s' if n == 1 else ''} verbatim in "
             f"{where}, covering {pct:.0f}% of the text's {result['tokens']} tokens.", ""]
    for k, s in enumerate(result["spans"], 1):
        ndoc = f"{s['document_count']:,}{'' if s['documents_exact'] else '+'} document" \
               f"{'' if s['document_count'] == 1 else 's'}"
        lines.append(f"[{k}] characters {s['start']}-{s['end']}, {s['tokens']} tokens, "
                     f"{_plural(s['occurrences'], 'occurrence')} in {ndoc}")
        lines.append(f"    \"{_short(s['text'])}\"")
        lines += _format_docs(s["documents"])
        lines.append("")
    return "\n".join(lines).rstrip()


def _format_docs(docs: list[dict]) -> list[str]:
    lines = []
    for d in docs:
        lines.append(f"    - {d['id']}  licence {d['license']}  sha256 {str(d['sha256'])[:16]}…  "
                     f"({_plural(d['occurrences'], 'time')})")
        if d.get("source"):
            lines.append(f"      {d['source']}")
        lines.append(f"      {_short(d['snippet'], 300)}")
    return lines


def format_contains(result: dict) -> str:
    idx = result["index"]
    if not result["count"]:
        return (f"Not found: the text ({_plural(result['tokens'], 'token')}) does not occur verbatim in the training "
                f"data ({_plural(idx['tokens'], 'token')}, {_plural(idx['documents'], 'document')}).")
    more = "" if result["documents_exact"] else "+"
    lines = [f"Found {_plural(result['count'], 'time')} in {result['document_count']:,}{more} training "
             f"document{'' if result['document_count'] == 1 else 's'}"
             f"{' (showing ' + str(len(result['documents'])) + ')' if len(result['documents']) < result['document_count'] else ''}:"]
    lines += _format_docs(result["documents"])
    return "\n".join(lines)


def trace_command(run: Path | str, text: str, as_json: bool = False, min_tokens: int = 8) -> int:
    """`glassforge trace`: print the spans of text found in the training data. Exit 0 (also when none)."""
    result = open_tracer(run).trace(text, min_tokens=min_tokens)
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_trace(result))
    return 0


def contains_command(run: Path | str, text: str, as_json: bool = False) -> int:
    """`glassforge contains`: exit 0 when the text occurs in the training data, 1 when not (like grep)."""
    result = open_tracer(run).contains(text)
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_contains(result))
    return 0 if result["count"] else 1


