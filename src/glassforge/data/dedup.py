"""Near-duplicate detection (MinHash LSH) and decontamination (shared n-grams), vectorised.

Words. Both checks work on words: maximal runs of ASCII letters and digits or
non-ASCII bytes in the UTF-8 text, lower-cased (so punctuation and case do
not hide a copy). Each word gets a 64-bit hash computed for the whole
document at once in numpy: a polynomial hash over the bytes via prefix sums
(the base is odd, so its inverse modulo 2**64 lets any word's hash be read off
the prefix sums), finished with the splitmix64 mixer. An n-gram (a shingle) is
a position-weighted sum of its n word hashes, mixed again. Hashes are
deterministic across processes and machines (no Python `hash()`).

MinHash. The defaults (5-word shingles, 14 bands of 8 rows = 112 values,
Jaccard 0.8) are the issue's. Instead of 112 independent permutations (112
hash evaluations per shingle, as datasketch does) we use one-permutation
hashing with rotation densification (Li, Owen & Zhang 2012; Shrivastava & Li
2014): each shingle's hash picks one of the 112 bins with its high bits and
offers its low 32 bits as that bin's candidate minimum; an empty bin borrows
the value of the next non-empty bin to its right (cyclically) plus a distance
offset. Two documents agree in a bin with probability equal to their
Jaccard similarity, as with classic MinHash, at 1/112 of the hashing cost;
`bench/data_throughput.py` measures it against datasketch's `MinHash` and
`MinHashLSH` on the same corpus and records both in docs/PERFORMANCE.md.

LSH. A signature is cut into bands; a band's 8 values hash to one 64-bit key.
Documents sharing a band key are candidates, and a candidate pair counts only
when its estimated Jaccard (share of equal signature values) reaches the
threshold, so a band collision alone never drops a document. The search runs
one task per band (`BandTask`, `band_edges`) over every part's signatures,
then joins the verified pairs into connected components (`components`): each
component keeps its lowest id. Bands, ids and signatures decide everything, so
the result is the same however the corpus was split among workers. (`LSHIndex`
also offers the incremental query-or-insert a single stream needs; the bench
compares it with datasketch.)

Decontamination. Every n-gram (default 13 words) of every evaluation item is
hashed into one sorted array per evaluation set; a training document is
contaminated when any of its n-grams is in one. Items shorter than n words
cannot be checked this way and are counted, not silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_BASE = 0x100000001B3  # odd: invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)

_pow_cache: dict[str, np.ndarray] = {"pow": np.ones(1, dtype=np.uint64), "inv": np.ones(1, dtype=np.uint64)}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i modulo 2**64 for i < n (cached, grown by doubling)."""
    have = len(_pow_cache["pow"])
    if have < n:
        size = max(n, 2 * have, 1 << 16)
        with np.errstate(over="ignore"):
            p = np.full(size, _BASE, dtype=np.uint64)
            p[0] = 1
            q = np.full(size, _BASE_INV, dtype=np.uint64)
            q[0] = 1
            _pow_cache["pow"] = np.cumprod(p, dtype=np.uint64)
            _pow_cache["inv"] = np.cumprod(q, dtype=np.uint64)
    return _pow_cache["pow"][:n], _pow_cache["inv"][:n]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit (uint64 arrays wrap silently)."""
    x = x ^ (x >> _U64(30))
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


class Words:
    """Word hashes of a batch of documents: `hashes` in order, document d owning hashes[bounds[d]:bounds[d+1]]."""

    def __init__(self, blobs: list[bytes]):
        # A newline is not a word character: words never cross documents. bytes.lower() lower-cases ASCII only.
        data = b"\n".join(blobs).lower()
        doc_starts = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) + 1 for b in blobs], out=doc_starts[1:])
        if not data:
            self.hashes = np.empty(0, dtype=np.uint64)
            self.bounds = np.zeros(len(blobs) + 1, dtype=np.int64)
            return
        b = np.frombuffer(data, dtype=np.uint8)
        # Word bytes: ASCII letters and digits, and every byte of a multi-byte UTF-8 character (letters of
        # other scripts). Comparisons, uint8 wrapping below 'a' and '0', are several times faster than a
        # lookup table.
        isw = (b - np.uint8(97) < 26) | (b - np.uint8(48) < 10) | (b >= 128)
        edges = np.diff(isw.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        bounds = np.flatnonzero(edges)  # word starts and ends alternate
        starts, ends = bounds[0::2], bounds[1::2]
        pw, inv = _powers(len(b))
        prefix = np.empty(len(b) + 1, dtype=np.uint64)
        prefix[0] = 0
        values = prefix[1:]
        values[:] = b
        values += _U64(1)  # a byte's value is the byte + 1, so a zero byte still counts
        values *= pw
        np.cumsum(values, out=values)
        raw = (prefix[ends] - prefix[starts]) * inv[starts] + (ends - starts).astype(np.uint64)
        self.hashes = mix64(raw)
        self.bounds = np.searchsorted(starts, doc_starts)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def of(self, d: int) -> np.ndarray:
        return self.hashes[self.bounds[d]:self.bounds[d + 1]]

    def ngrams(self, n: int, short_as_one: bool) -> tuple[np.ndarray, np.ndarray]:
        """(hashes of every n-gram within a document, the document of each), in order."""
        W = len(self.hashes)
        counts = np.diff(self.bounds)
        parts, owners = [], []
        m = W - n + 1
        if m > 0:
            start = np.arange(m)
            doc = np.searchsorted(self.bounds, start, side="right") - 1
            ok = start + n <= self.bounds[doc + 1]
            acc = self.hashes[:m] * _POSMUL[0]
            for t in range(1, n):
                acc += self.hashes[t:t + m] * _POSMUL[t]
            acc += _U64(n)
            parts.append(mix64(acc[ok]))
            owners.append(doc[ok])
        if short_as_one:
            for d in np.flatnonzero((counts > 0) & (counts < n)):
                parts.append(ngram_hashes(self.of(d), n, short_as_one=True))
                owners.append(np.array([d]))
        if not parts:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        h, o = np.concatenate(parts), np.concatenate(owners)
        if short_as_one and len(parts) > 1:
            order = np.argsort(o, kind="stable")
            h, o = h[order], o[order]
        return h, o


def word_hashes(text: str | bytes) -> np.ndarray:
    """64-bit hashes of one document's lower-cased words, in order."""
    return Words([text.encode("utf-8") if isinstance(text, str) else text]).hashes


_POSMUL = mix64(np.arange(1, 65, dtype=np.uint64)) | _U64(1)  # odd multiplier per n-gram position


def ngram_hashes(words: np.ndarray, n: int, short_as_one: bool = True) -> np.ndarray:
    """Hashes of every run of n consecutive words; a shorter document is one n-gram (or none)."""
    m = len(words) - n + 1
    if m <= 0:
        if not short_as_one or len(words) == 0:
            return np.empty(0, dtype=np.uint64)
        n, m = len(words), 1
    if n > len(_POSMUL):
        raise ValueError(f"n-grams of at most {len(_POSMUL)} words")
    acc = words[:m] * _POSMUL[0]
    for t in range(1, n):
        acc += words[t:t + m] * _POSMUL[t]
    acc += _U64(n)
    return mix64(acc)


_EMPTY = np.uint64(1 << 32)


class MinHasher:
    """One-permutation MinHash with rotation densification (see the module docstring)."""

    def __init__(self, num_perm: int = 112, shingle: int = 5):
        self.num_perm = num_perm
        self.shingle = shingle
        self._offsets = (mix64(np.arange(num_perm, dtype=np.uint64) + _U64(7)) & _MASK32)

    def signatures(self, words: Words) -> tuple[np.ndarray, np.ndarray]:
        """(D x num_perm uint32 signatures, bool D: whether the document had any word)."""
        D, K = len(words), self.num_perm
        shingles, owner = words.ngrams(self.shingle, short_as_one=True)
        # Salted so that MinHash bins are independent of the n-gram hashes used for decontamination.
        h = mix64(shingles ^ _U64(0x9E3779B97F4A7C15))
        bins = ((h >> _U64(32)) * _U64(K)) >> _U64(32)
        sig = np.full(D * K, _EMPTY, dtype=np.uint64)
        np.minimum.at(sig, owner * K + bins.astype(np.int64), h & _MASK32)
        sig = sig.reshape(D, K)
        empty = sig == _EMPTY
        has = ~empty.all(axis=1)
        if empty[has].any():
            # Rotation densification: an empty bin takes the next non-empty bin to its right (cyclically).
            idx = np.where(np.concatenate([~empty, ~empty], axis=1), np.arange(2 * K), 4 * K)
            nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :K]
            nxt[~has] = np.arange(K)  # no words at all: leave as is (has=False)
            src = nxt % K
            dist = (nxt - np.arange(K)).astype(np.uint64)
            rows = np.arange(D)[:, None]
            sig = (sig[rows, src] + dist * self._offsets[src]) & _MASK32
        return sig.astype(np.uint32), has

    def signature(self, text: str) -> np.ndarray | None:
        sig, has = self.signatures(Words([text.encode("utf-8")]))
        return sig[0] if has[0] else None


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a == b)) / len(a)


class LSHIndex:
    """Banded LSH over signatures; only kept (first-seen) documents are inserted."""

    _CHUNK = 1 << 15

    def __init__(self, bands: int = 14, rows: int = 8, threshold: float = 0.8):
        self.bands, self.rows, self.threshold = bands, rows, threshold
        self.buckets: dict[int, int | list[int]] = {}
        self._chunks: list[np.ndarray] = []
        self.size = 0
        self._rowmul = _POSMUL[:rows]
        self._bandsalt = mix64(np.arange(bands, dtype=np.uint64) + _U64(1000))

    def keys(self, sigs: np.ndarray) -> np.ndarray:
        """Band keys (D x bands uint64) of D signatures."""
        s = sigs[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sigs), self.bands, self.rows)
        k = (s * self._rowmul).sum(axis=2, dtype=np.uint64) ^ self._bandsalt
        return mix64(k)

    def _sig(self, i: int) -> np.ndarray:
        return self._chunks[i // self._CHUNK][i % self._CHUNK]

    def query(self, sig: np.ndarray, keys: list[int]) -> tuple[int, float] | None:
        """(index, estimated Jaccard) of the most similar indexed document at or above threshold."""
        cands: set[int] = set()
        for k in keys:
            v = self.buckets.get(k)
            if v is None:
                continue
            if isinstance(v, int):
                cands.add(v)
            else:
                cands.update(v)
        best = None
        for c in sorted(cands):
            j = estimated_jaccard(sig, self._sig(c))
            if j >= self.threshold and (best is None or j > best[1]):
                best = (c, j)
        return best

    def insert(self, sig: np.ndarray, keys: list[int]) -> int:
        i = self.size
        if i % self._CHUNK == 0:
            self._chunks.append(np.empty((self._CHUNK, len(sig)), dtype=np.uint32))
        self._chunks[-1][i % self._CHUNK] = sig
        for k in keys:
            v = self.buckets.get(k)
            if v is None:
                self.buckets[k] = i
            elif isinstance(v, int):
                self.buckets[k] = [v, i]
            else:
                v.append(i)
        self.size += 1
        return i

    def query_or_insert(self, sig: np.ndarray, keys: list[int] | None = None) -> tuple[int, float] | None:
        """The duplicate found, or None after inserting sig as a new kept document."""
        if keys is None:
            keys = self.keys(sig[None, :])[0].tolist()
        found = self.query(sig, keys)
        if found is None:
            self.insert(sig, keys)
        return found


# --------------------------------------------------------------------------- decontamination


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def eval_items(path: Path) -> list[str]:
    """The texts of an evaluation set: every string in every record (JSONL/JSON), or the whole file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl" or suffix == ".json":
        try:
            return _strings(json.loads(text)) if suffix == ".json" else [
                s for line in text.splitlines() if line.strip() for s in _strings(json.loads(line))]
        except json.JSONDecodeError:
            pass  # not JSON after all: treat as text
    return [text]


class ContaminationIndex:
    """Sorted n-gram hashes per evaluation set; `hits(words)` names the sets a document shares one with."""

    def __init__(self, n: int = 13):
        self.n = n
        self.sets: dict[str, np.ndarray] = {}
        self.stats: dict[str, dict] = {}

    def add_set(self, name: str, items: list[str]) -> None:
        grams, short = [], 0
        for item in items:
            g = ngram_hashes(word_hashes(item), self.n, short_as_one=False)
            if g.size == 0:
                short += 1
            grams.append(g)
        arr = np.unique(np.concatenate(grams)) if grams else np.empty(0, dtype=np.uint64)
        self.sets[name] = arr
        self.stats[name] = {"items": len(items), "items_shorter_than_n": short, "ngrams": int(arr.size)}

    def hits(self, words: Words) -> list[list[str]]:
        """For each document of the batch, the evaluation sets it shares an n-gram with."""
        out: list[list[str]] = [[] for _ in range(len(words))]
        if not self.sets:
            return out
        grams, owner = words.ngrams(self.n, short_as_one=False)
        if grams.size == 0:
            return out
        for name, arr in self.sets.items():
            if arr.size == 0:
                continue
            pos = np.searchsorted(arr, grams)
            pos[pos == arr.size] = 0
            for d in np.unique(owner[arr[pos] == grams]).tolist():
                out[d].append(name)
        return out


# --------------------------------------------------------------------------- near duplicates at any scale


@dataclass(frozen=True)
class BandTask:
    """Band `band` of every eligible document: find its candidate pairs and verify them.

    The eligible documents' band keys (n x bands uint64), ranks (their ids' order) and places
    (part, row) are files every worker reads memory-mapped; `signature_files` are the parts'
    signature arrays, of which only compared rows are touched.
    """

    band: int
    keys_file: str
    ranks_file: str
    places_file: str
    signature_files: tuple[str, ...]
    threshold: float


_MAX_COMPARISONS = 16  # per document and band: the lowest-ranked members of its bucket


def band_edges(task: BandTask) -> np.ndarray:
    """Verified pairs (document, lower-ranked document) sharing this band's key, as an (m, 2) int64 array.

    In each bucket (documents whose band keys are equal), in rank order, each
    document is compared with the members before it, lowest rank first, at most
    _MAX_COMPARISONS of them, and linked to the first whose estimated Jaccard
    reaches the threshold. Everything here is a function of keys, ranks and
    signatures, never of how documents were split among workers.
    """
    keys = np.array(np.load(task.keys_file, mmap_mode="r")[:, task.band])
    ranks = np.load(task.ranks_file, mmap_mode="r")
    places = np.load(task.places_file, mmap_mode="r")
    order = np.lexsort((ranks, keys))
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    ends = np.concatenate([starts[1:], [len(order)]])
    multi = ends - starts >= 2
    signatures = [np.load(f, mmap_mode="r") for f in task.signature_files]

    def sig(doc: int) -> np.ndarray:
        part, row = places[doc]
        return np.asarray(signatures[part][row])

    edges = []
    for s, e in zip(starts[multi].tolist(), ends[multi].tolist()):
        members = order[s:e].tolist()
        member_sigs = [sig(m) for m in members[:_MAX_COMPARISONS]]
        for t in range(1, len(members)):
            mine = member_sigs[t] if t < len(member_sigs) else sig(members[t])
            for c in range(min(t, _MAX_COMPARISONS)):
                if estimated_jaccard(mine, member_sigs[c]) >= task.threshold:
                    edges.append((members[t], members[c]))
                    break
    return np.array(edges, dtype=np.int64).reshape(-1, 2)


def components(n: int, ranks: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """For each of n documents, the lowest-ranked document of its connected component (union-find)."""
    parent = np.arange(n, dtype=np.int64)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pairs in edges:
        for a, b in pairs.tolist():
            ra, rb = root(a), root(b)
            if ra != rb:
                if ranks[ra] < ranks[rb]:
                    ra, rb = rb, ra
                parent[ra] = rb  # the lower-ranked root represents the union
    linked = np.unique(np.concatenate([p.ravel() for p in edges])) if edges else np.zeros(0, np.int64)
    for x in linked.tolist():
        parent[x] = root(x)
    return parent
