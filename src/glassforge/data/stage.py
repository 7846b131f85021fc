"""The `data` stage: sources in, a clean, deduplicated, decontaminated, ordered and documented set out.

Pipeline, streaming in batches (memory stays bounded by a batch, the dedup
indexes and one small record per document; never the corpus):

1. Read every `[[data.sources]]` entry in recipe order (`sources.py`); an item
   that cannot become text (unreadable, binary, invalid UTF-8, malformed JSON,
   corrupt Parquet, missing field, ...) is recorded under its reason code.
2. Clean (`normalize`): Unicode NFC, line ends to `\\n`, control characters
   removed, exotic spaces to spaces, tabs to four spaces, no trailing spaces,
   at most one blank line in a row, no leading or trailing blank space.
3. Filter, thresholds from `[data]`: `too_short` (< min_chars), `too_long`
   (> max_chars), `non_text` (share of characters that are neither letters,
   whitespace nor prose punctuation `.,;:!?'"()-` above max_non_text_fraction),
   `repeated_lines` (share of non-blank lines that repeat an earlier line above
   max_repeated_line_fraction; documents of one line are never dropped by it).
4. Deduplicate: `exact_duplicate` (same sha256 of the cleaned text), then
   `contaminated` (shares a decontaminate_ngram-word n-gram with an evaluation
   set in `data.decontaminate`), then `near_duplicate` (MinHash LSH, see
   `dedup.py`). The first document in stage order (sources in recipe order,
   each in its own fixed order) is kept; a dropped one names it in
   `duplicate_of`.
5. Split: a kept document is validation when the first 32 bits of its sha256,
   as a fraction, are below val_fraction: the split depends on the text alone.
6. Order: the training order (`order.txt`, one id a line) is a seeded shuffle
   (`random.Random(recipe.seed)`) of the kept training documents, each listed
   `repeats` times. Sampling weights: a source with weight w contributes each of
   its training documents floor(w) times plus once more with probability
   frac(w), the coin being a hash of (seed, document id), so w=1 is every
   document once, w=2 twice, w=0.5 about half of them, w=0 none. The coin uses
   the id, not the text, so editing a document never moves it in or out.
   Validation documents are not weighted.
7. Merkle roots over the training order (see `merkle_root`): one for the
   whole mix and one per source (over that source's entries of the same order).

Outputs: `data/documents.jsonl` ({id, split, text} of kept documents, stage
order), `data/order.txt`, and the data manifest (`core.manifest`): its head
`data/manifest.json` holds "summary" (counts, bytes, drops by reason, per
source, dedup and decontamination figures), "merkle", "mix_merkle_root",
"seed" and "order_sha256"; its entries `data/manifest.jsonl` list every
document seen: id, source (URI), source_name, license, sha256, bytes, status
(kept|dropped), split, reason, duplicate_of, and where they apply detail,
similarity, contaminated_by, repeats. The shards stage adds `tokens` and the
tokenizer's hash (see `tokenizer/shards.py`). Same inputs and recipe give
byte-identical files: nothing depends on time, paths of the run folder or
hash seeds.

The order depends on `recipe.seed`, which the data stage's recipe section does
not cover, so `input_fingerprint` includes the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_text
from glassforge.core.hashing import canonical_json, sha256_bytes, sha256_file
from glassforge.core.manifest import read_manifest_head, write_data_manifest
from glassforge.core.merkle import order_roots
from glassforge.core.recipe import DataConfig, Recipe
from glassforge.core.runfolder import Run
from glassforge.data.clean import (
    FILTER_REASONS,
    filter_reason,
    json_string_of_normalized,
    normalize,
    split_of,
    train_repeats,
)
from glassforge.data.dedup import (
    ContaminationIndex,
    LSHIndex,
    MinHasher,
    Words,
    eval_items,
)
from glassforge.data.sources import (
    READ_REASONS,
    RawDocument,
    check_sources,
    iter_source,
    source_fingerprint,
)

REASONS = {**READ_REASONS, **FILTER_REASONS}

_BATCH_DOCS = 512
_BATCH_BYTES = 512 << 10


class _Analyzer:
    """The per-batch work that needs no state across documents: clean, hash, filter, sign, n-gram check.

    It is a pure function of the batch's texts and the recipe, so the forked
    reader process (inheriting the evaluation sets' n-grams) can analyse every
    other batch while the stage's process makes the sequential decisions;
    results are identical either way.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.minhasher = MinHasher(cfg.near_dedup_bands * cfg.near_dedup_rows, cfg.near_dedup_shingle) \
            if cfg.near_dedup else None
        self.keyer = LSHIndex(cfg.near_dedup_bands, cfg.near_dedup_rows, cfg.near_dedup_threshold)
        self.contam = ContaminationIndex(cfg.decontaminate_ngram)
        for path in cfg.decontaminate:
            self.contam.add_set(path, eval_items(Path(path)))

    def __call__(self, texts: list[str | None]) -> dict:
        cfg = self.cfg
        norm: list[str | None] = []
        nbytes: list[int | None] = []
        digests: list[bytes | None] = []
        reasons: list[str | None] = []
        live: list[bytes] = []
        for text in texts:
            if text is None:
                norm.append(None), nbytes.append(None), digests.append(None), reasons.append(None)
                continue
            text = normalize(text)
            encoded = text.encode("utf-8")
            reason = filter_reason(text, cfg, encoded)
            norm.append(text if reason is None else None)
            nbytes.append(len(encoded))
            digests.append(hashlib.sha256(encoded).digest())
            reasons.append(reason)
            if reason is None:
                live.append(encoded)
        out = {"norm": norm, "bytes": nbytes, "digests": digests, "reasons": reasons,
               "sigs": None, "has": None, "keys": None, "hits": [[] for _ in live]}
        if live and (self.minhasher is not None or self.contam.sets):
            words = Words(live)
            if self.minhasher is not None:
                out["sigs"], out["has"] = self.minhasher.signatures(words)
                out["keys"] = self.keyer.keys(out["sigs"]).tolist()
            if self.contam.sets:
                out["hits"] = self.contam.hits(words)
        return out


def _read_in_child(conn, batches: Iterator[list[RawDocument]], analyzer: _Analyzer) -> None:
    """The forked reader process: the rest of the sources' batches, every other one analysed here.

    Sends (batch, analysis, None) or (batch, None, texts) per batch, then None;
    or the exception that stopped it. The pipe holds about one message, so the
    reader runs at most a batch or two ahead: memory stays bounded.
    """
    try:
        for n, batch in enumerate(batches):
            texts = [raw.text for raw in batch]
            for raw in batch:
                raw.text = None
            conn.send((batch, analyzer(texts), None) if n % 2 == 0 else (batch, None, texts))
        conn.send(None)
    except BaseException as e:
        try:
            conn.send(e)
        except Exception:  # an exception that does not pickle: its type and message
            conn.send(RuntimeError(f"data reader process: {type(e).__name__}: {e}"))
    finally:
        conn.close()


_READER_AFTER_BYTES = 8 << 20


def data_workers() -> int:
    """1 to read and analyse in a second process (see `_Stage.run_batches`), 0 not to:
    $GLASSFORGE_DATA_WORKERS, else 1 on 2 or more cores."""
    env = os.environ.get("GLASSFORGE_DATA_WORKERS")
    if env is not None:
        if env not in ("0", "1"):
            raise UserError(f"GLASSFORGE_DATA_WORKERS: expected 0 or 1, got '{env}'")
        return int(env)
    return 1 if (os.cpu_count() or 1) >= 2 else 0


class _Stage:
    """The state of one data-stage run: indexes, counters and the open output files."""

    def __init__(self, run: Run, recipe: Recipe):
        self.run, self.recipe, self.cfg = run, recipe, recipe.data
        cfg = self.cfg
        self.analyzer = _Analyzer(cfg)
        self.contam = self.analyzer.contam
        self.weights = {s.name: s.weight for s in cfg.sources}
        self.exact: dict[bytes, str] = {}
        self.lsh = LSHIndex(cfg.near_dedup_bands, cfg.near_dedup_rows, cfg.near_dedup_threshold) \
            if cfg.near_dedup else None
        self.lsh_ids: list[str] = []
        self.contam_matched: Counter = Counter()
        self.contam_dropped: Counter = Counter()
        self.train: list[tuple[str, str, bytes, int]] = []  # (id, source, digest, repeats) in stage order
        self.per_source = {s.name: {"kind": s.kind, "license": s.license, "weight": s.weight,
                                    "path": s.path if s.kind != "pystdlib" else "",
                                    "seen": 0, "kept": 0, "train": 0, "val": 0, "bytes_seen": 0,
                                    "bytes_kept": 0, "dropped": Counter()} for s in cfg.sources}
        self.reasons: Counter = Counter()
        self.ids: set[str] = set()
        self.seen = 0
        self.near_similarities: list[float] = []

    def run_batches(self, batches: Iterator[list[RawDocument]], docs_out, entries_out, bar) -> None:
        """Analyse batches and decide them in order, from 8 MB on with a forked reader process.

        The reader process takes over the same batch iterator (fork copies it,
        open files and positions included; this process never touches it again),
        reads the sources and analyses every other batch; this process analyses
        the others and makes every decision and write, in order. No text goes
        to the reader, and half the batches come back analysed, so the two
        processes have about equal work on the 2-core reference machine. The
        earlier design, a `multiprocessing.Pool` analysing batches that this
        process read, lost there: pickling every text both ways and the pool's
        helper threads contending for the GIL cost more than the second core
        gave. Small inputs (under 8 MB) and recipes with a Hugging Face source
        never fork. The output is the same either way (tested).
        """
        import multiprocessing as mp

        # Hugging Face sources stay in one process: a streaming dataset may hold connections and an event-loop
        # thread that a forked copy cannot use.
        forking = (data_workers() > 0 and "fork" in mp.get_all_start_methods()
                   and all(src.kind != "hf" for src in self.cfg.sources))
        it = iter(batches)
        size = 0
        for batch in it:
            texts = [raw.text for raw in batch]
            for raw in batch:
                raw.text = None  # the analysis holds the only copy now
            size += sum(len(t) for t in texts if t is not None)
            self.decide(batch, self.analyzer(texts), docs_out, entries_out)
            bar.update(len(batch))
            if forking and size >= _READER_AFTER_BYTES:
                break
        else:
            return
        docs_out.flush()  # nothing buffered for the forked copy of these files to write again
        entries_out.flush()
        ctx = mp.get_context("fork")
        receive, send = ctx.Pipe(duplex=False)
        reader = ctx.Process(target=_read_in_child, args=(send, it, self.analyzer), daemon=True)
        reader.start()
        send.close()
        try:
            while True:
                try:
                    msg = receive.recv()
                except EOFError:
                    raise RuntimeError(f"the data reader process ended without finishing "
                                       f"(exit code {reader.exitcode})") from None
                if msg is None:
                    break
                if isinstance(msg, BaseException):
                    raise msg
                batch, analysis, texts = msg
                self.decide(batch, analysis if analysis is not None else self.analyzer(texts), docs_out,
                            entries_out)
                bar.update(len(batch))
        finally:
            receive.close()
            if reader.is_alive():
                reader.terminate()
            reader.join()

    def decide(self, batch: list[RawDocument], a: dict, docs_out, entries_out) -> None:
        """Sequential decisions for one analysed batch: exact duplicates, contamination, near duplicates."""
        sigs, has, keys, hits = a["sigs"], a["has"], a["keys"], a["hits"]
        li = 0
        for k, raw in enumerate(batch):
            self._unique_id(raw)
            stats = self.per_source[raw.source_name]
            stats["seen"] += 1
            self.seen += 1
            digest, nbytes = a["digests"][k], a["bytes"][k]
            reason = (raw.reason or "unreadable") if digest is None else a["reasons"][k]
            entry = {"id": raw.id, "source": raw.source, "source_name": raw.source_name, "license": raw.license,
                     "sha256": digest.hex() if digest is not None else None, "bytes": nbytes,
                     "status": "dropped", "split": None, "reason": reason, "duplicate_of": None}
            if nbytes is not None:
                stats["bytes_seen"] += nbytes
            if raw.detail:
                entry["detail"] = raw.detail
            if reason is None:
                i, li = li, li + 1
                dup = self.exact.get(digest)
                if dup is not None:
                    entry.update(reason="exact_duplicate", duplicate_of=dup)
                else:
                    self.exact[digest] = raw.id
                    if hits[i]:
                        entry.update(reason="contaminated", contaminated_by=hits[i])
                        self.contam_matched.update(hits[i])
                        self.contam_dropped[hits[i][0]] += 1
                    elif sigs is not None and has[i]:
                        near = self.lsh.query_or_insert(sigs[i], keys[i])
                        if near is None:
                            self.lsh_ids.append(raw.id)
                        else:
                            entry.update(reason="near_duplicate", duplicate_of=self.lsh_ids[near[0]],
                                         similarity=round(near[1], 4))
                            self.near_similarities.append(near[1])
                    if entry["reason"] is None:
                        self._keep(raw, a["norm"][k], digest, nbytes, entry, stats, docs_out)
            if entry["status"] == "dropped":
                self.reasons[entry["reason"]] += 1
                stats["dropped"][entry["reason"]] += 1
            entries_out.write(json.dumps(entry, sort_keys=True, ensure_ascii=False))
            entries_out.write("\n")

    def _unique_id(self, raw: RawDocument) -> None:
        """Ids are unique: a repeated one (two definitions of one name, say) gets ~2, ~3, ..."""
        if raw.id in self.ids:
            k = 2
            while f"{raw.id}~{k}" in self.ids:
                k += 1
            raw.id = f"{raw.id}~{k}"
        self.ids.add(raw.id)

    def _keep(self, raw: RawDocument, text: str, digest: bytes, nbytes: int, entry: dict, stats: dict,
              docs_out) -> None:
        split = split_of(digest.hex(), self.cfg.val_fraction)
        entry.update(status="kept", split=split)
        stats["kept"] += 1
        stats[split] += 1
        stats["bytes_kept"] += nbytes
        if split == "train":
            reps = train_repeats(self.weights[raw.source_name], self.recipe.seed, raw.id)
            entry["repeats"] = reps
            self.train.append((raw.id, raw.source_name, digest, reps))
        # canonical_json({"id", "split", "text"}) spelled out: the keys are already in sorted order.
        docs_out.write(f'{{"id":{json.dumps(raw.id, ensure_ascii=False)},"split":"{split}","text":'
                       f'{json_string_of_normalized(text)}}}\n')


def _batches(items: Iterator[RawDocument]) -> Iterator[list[RawDocument]]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item.text) if item.text is not None else 0
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def run_data(run: Run) -> dict:
    """Collect, clean, filter, deduplicate, decontaminate, split and order the recipe's sources."""
    recipe = run.load_recipe()
    cfg: DataConfig = recipe.data
    check_sources(cfg)  # every recipe mistake before any work
    st = _Stage(run, recipe)
    run.data.mkdir(parents=True, exist_ok=True)
    entries_path = run.data / ".manifest.documents.tmp"
    try:
        with AtomicFile(run.documents, "w") as docs_out, \
                open(entries_path, "w", encoding="utf-8") as entries_out:
            with tqdm(desc="data", unit="doc", leave=False, mininterval=1.0) as bar:
                items = (item for src in cfg.sources for item in iter_source(src, cfg))
                st.run_batches(_batches(items), docs_out, entries_out, bar)
            kept = sum(s["kept"] for s in st.per_source.values())
            if not kept:
                raise UserError("data: no document survived cleaning; check data.sources and the filters "
                                f"(dropped: {dict(sorted(st.reasons.items()))})")
        order = _write_order(run, st)
        _write_manifest(run, st, order, entries_path)
    finally:
        entries_path.unlink(missing_ok=True)
    return read_manifest_head(run)["summary"]


def _write_order(run: Run, st: _Stage) -> list[str]:
    order = [doc_id for doc_id, _, _, reps in st.train for _ in range(reps)]
    random.Random(st.recipe.seed).shuffle(order)
    atomic_write_text(run.order, "".join(d + "\n" for d in order))
    return order


def _write_manifest(run: Run, st: _Stage, order: list[str], entries_path: Path) -> None:
    cfg = st.cfg
    digest_of = {doc_id: digest for doc_id, _, digest, _ in st.train}
    source_of = {doc_id: src for doc_id, src, _, _ in st.train}
    roots = order_roots(order, digest_of, source_of, [s.name for s in cfg.sources])
    order_sha = sha256_file(run.order)
    per_source = {}
    for name, s in st.per_source.items():
        per_source[name] = {**s, "dropped": dict(sorted(s["dropped"].items())),
                            "train_order_entries": sum(1 for d in order if source_of[d] == name),
                            "merkle_root": roots["sources"][name]}
    sims = st.near_similarities
    summary = {
        "documents_seen": st.seen,
        "documents_kept": sum(s["kept"] for s in st.per_source.values()),
        "train_documents": sum(s["train"] for s in st.per_source.values()),
        "val_documents": sum(s["val"] for s in st.per_source.values()),
        "bytes_seen": sum(s["bytes_seen"] for s in st.per_source.values()),
        "bytes_kept": sum(s["bytes_kept"] for s in st.per_source.values()),
        "dropped": dict(sorted(st.reasons.items())),
        "sources": per_source,
        "dedup": {
            "exact_duplicates": st.reasons.get("exact_duplicate", 0),
            "near_duplicates": st.reasons.get("near_duplicate", 0),
            "near_dedup": {"enabled": cfg.near_dedup, "method": "one-permutation MinHash, rotation densification, "
                           "banded LSH, candidates verified (glassforge.data.dedup)",
                           "shingle_words": cfg.near_dedup_shingle, "bands": cfg.near_dedup_bands,
                           "rows": cfg.near_dedup_rows, "threshold": cfg.near_dedup_threshold,
                           "mean_similarity_of_dropped": round(sum(sims) / len(sims), 4) if sims else None},
        },
        "decontamination": {
            "ngram": cfg.decontaminate_ngram,
            "documents_dropped": st.reasons.get("contaminated", 0),
            "sets": {name: {**st.contam.stats[name], "documents_matched": st.contam_matched.get(name, 0),
                            "documents_dropped": st.contam_dropped.get(name, 0)} for name in cfg.decontaminate},
        },
        "order": {"seed": st.recipe.seed, "entries": len(order), "sha256": order_sha,
                  "weights": "each training document appears floor(w) times, plus once with probability frac(w)"},
        "mix_merkle_root": roots["mix"],
    }
    head = {
        "summary": summary,
        "merkle": {**roots, "leaves": "sha256 of each training document's cleaned UTF-8 text, in order.txt order",
                   "construction": "glassforge.core.merkle.merkle_root: sha256(0x00||leaf), sha256(0x01||left||right), "
                                   "odd node promoted (RFC 6962 tree hash)"},
        "mix_merkle_root": roots["mix"],
        "seed": st.recipe.seed,
        "order_sha256": order_sha,
        "tokenizer_sha256": None,
        "reasons": {k: REASONS[k] for k in sorted(st.reasons)},
    }
    with open(entries_path, encoding="utf-8") as f:
        write_data_manifest(run, head, (line.rstrip("\n") for line in f))



def input_fingerprint(recipe: Recipe) -> str:
    """A cheap hash of the data stage's inputs beyond its recipe section (no content read).

    pystdlib: Python version and standard library path; files: each file's
    relative path, size and mtime; hf: dataset name and split (plus files if
    local); decontamination sets: size and mtime; and the seed, which fixes
    the training order the data stage writes.
    """
    parts = {"seed": recipe.seed, "sources": [source_fingerprint(s) for s in recipe.data.sources],
             "decontaminate": []}
    for path in recipe.data.decontaminate:
        p = Path(path)
        st = p.stat() if p.is_file() else None
        parts["decontaminate"].append([path, st.st_size if st else None, st.st_mtime_ns if st else None])
    return sha256_bytes(canonical_json(parts))
