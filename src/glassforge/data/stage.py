"""The `data` stage: sources in, a clean, deduplicated, decontaminated, ordered and documented set out.

The same bytes at any scale. The work is cut into parts by the data alone
(`parts.py`: runs of the sorted input listing, big JSON-lines files at line
ends), never by the number of workers; each part is analysed by a task
(`analyse.py`) on the executor the recipe or the command line picks
(`executor.py`: this process, local processes, or a Ray cluster), and every
decision that needs more than one part is taken over all of them by rules
that depend on document ids, never on arrival order. Tested: in-process, one
and two worker processes, and a two-node Ray cluster with a failing and a
killed task give identical bytes.

1. Read every `[[data.sources]]` entry (`sources.py`); an item that cannot
   become text (unreadable, binary, invalid UTF-8, malformed JSON, corrupt
   Parquet, missing field, ...) is recorded under its reason code.
2. Clean (`normalize`): Unicode NFC, line ends to `\\n`, control characters
   removed, exotic spaces to spaces, tabs to four spaces, no trailing spaces,
   at most one blank line in a row, no leading or trailing blank space.
3. Filter, thresholds from `[data]`: `too_short` (< min_chars), `too_long`
   (> max_chars), `non_text` (share of characters that are neither letters,
   whitespace nor prose punctuation `.,;:!?'"()-` above max_non_text_fraction),
   `repeated_lines` (share of non-blank lines that repeat an earlier line above
   max_repeated_line_fraction; documents of one line are never dropped by it).
4. Ids: content addresses of each item's name and cleaned text (`analyse.py`).
5. Deduplicate, over every part at once: `exact_duplicate` (same sha256 of the
   cleaned text), then `contaminated` (shares a decontaminate_ngram-word n-gram
   with an evaluation set in `data.decontaminate`), then `near_duplicate`
   (MinHash LSH: one task per band finds the pairs sharing a band key and
   verifies them, and the verified pairs' connected components are the
   duplicate groups; see `dedup.py`). Each group keeps its lowest id, and a
   dropped document names the one it duplicates in `duplicate_of`.
6. Split: a kept document is validation when the first 32 bits of its sha256,
   as a fraction, are below val_fraction: the split depends on the text alone.
7. Order: the training order (`order.txt`, one id a line) sorts the kept
   training documents, each listed `repeats` times, by sha256(seed, id, repeat
   number): a seeded function of the ids, so an edited document moves only
   itself. Sampling weights: a source with weight w contributes each of its
   training documents floor(w) times plus once more with probability frac(w),
   the coin being a hash of (seed, document id), so w=1 is every document
   once, w=2 twice, w=0.5 about half of them, w=0 none. Validation documents
   are not weighted.
8. Merkle roots over the training order (see `merkle_root`): one for the
   whole mix and one per source (over that source's entries of the same order).

Outputs: `data/documents.jsonl` ({id, split, text} of kept documents, in the
sources' order), `data/order.txt`, and the data manifest (`core.manifest`): its
head `data/manifest.json` holds "summary" (counts, bytes, drops by reason, per
source, dedup and decontamination figures), "merkle", "mix_merkle_root",
"seed" and "order_sha256"; its entries `data/manifest.jsonl` list every
document seen: id, name (its place in its source), source (URI), source_name,
license, sha256, bytes, status (kept|dropped), split, reason, duplicate_of,
and where they apply detail, similarity, contaminated_by, repeats. The shards
stage adds `tokens` and the tokenizer's hash (see `tokenizer/shards.py`).
Nothing depends on time, paths of the run folder, hash seeds, the executor,
the worker count or the part size.

While it runs the stage keeps each part's results in `data/work/` (on storage
every worker shares); an interrupted stage resumes from the parts it finished,
and the folder is removed when the stage completes. Memory: a part's task
holds one batch of its texts; the stage's own process holds a few arrays of
about 300 bytes per document (ids, digests, band keys), never the texts.

The order depends on `recipe.seed`, which the data stage's recipe section does
not cover, so `input_fingerprint` includes the seed.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_text
from glassforge.core.hashing import canonical_json, sha256_bytes, sha256_file
from glassforge.core.manifest import read_manifest_head, write_data_manifest
from glassforge.core.merkle import order_roots
from glassforge.core.recipe import DataConfig, Recipe
from glassforge.core.runfolder import PartFiles, Run
from glassforge.data.analyse import CONTAMINATED, EXACT, NEAR, Analyzer, FinishTask, PartTask, analyse_part, finish_part
from glassforge.data.clean import FILTER_REASONS
from glassforge.data.dedup import BandTask, band_edges, components, estimated_jaccard
from glassforge.data.executor import EXECUTORS, make_executor
from glassforge.data.parts import plan_parts
from glassforge.data.sources import READ_REASONS, check_sources, source_fingerprint

REASONS = {**READ_REASONS, **FILTER_REASONS}


class _Live:
    """Every item that passed the filters, across all parts, in part order: the arrays the decisions need."""

    def __init__(self, work: PartFiles, n_parts: int):
        ids, digests, has, keys, places, contaminated = [], [], [], [], [], []
        for i in range(n_parts):
            with np.load(work.arrays(i), allow_pickle=False) as a:
                ids.append(a["ids"])
                digests.append(a["digests"])
                has.append(a["has"])
                contaminated.append(a["contaminated"])
                keys.append(a["keys"])
                places.append(np.stack([np.full(len(a["ids"]), i), np.arange(len(a["ids"]))], axis=1))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, dtype="U1")
        self.digests = np.concatenate(digests)
        self.has = np.concatenate(has)
        self.contaminated = np.concatenate(contaminated)
        self.keys = np.concatenate(keys)
        self.places = np.concatenate(places).astype(np.int64)
        self.ranks = np.empty(len(self.ids), dtype=np.int64)
        self.ranks[np.argsort(self.ids, kind="stable")] = np.arange(len(self.ids))
        if len(np.unique(self.ids)) != len(self.ids):
            raise RuntimeError("data: two documents have the same content address")  # 96 bits: never in practice


def _decide(live: _Live, hits: np.ndarray, cfg: DataConfig, work: PartFiles, executor) -> tuple:
    """Status code, representative (index) and similarity per live item: exact duplicates, then
    contamination, then near duplicates; in every group the lowest id is kept."""
    n = len(live.ids)
    code = np.zeros(n, dtype=np.int8)
    rep = np.full(n, -1, dtype=np.int64)
    similarity = np.zeros(n, dtype=np.float64)
    if n:
        d = np.ascontiguousarray(live.digests).view(np.uint64).reshape(n, 4)
        order = np.lexsort((live.ranks, d[:, 3], d[:, 2], d[:, 1], d[:, 0]))
        sd = d[order]
        first = np.concatenate([[True], np.any(sd[1:] != sd[:-1], axis=1)])
        group_first = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
        dup = ~first
        code[order[dup]] = EXACT
        rep[order[dup]] = group_first[dup]
    code[(code == 0) & hits] = CONTAMINATED
    eligible = np.flatnonzero((code == 0) & live.has) if cfg.near_dedup else np.zeros(0, dtype=np.int64)
    if len(eligible) > 1:
        work.root.mkdir(parents=True, exist_ok=True)
        for path, arr in ((work.near_keys, live.keys[eligible]), (work.near_ranks, live.ranks[eligible]),
                          (work.near_places, live.places[eligible])):
            with AtomicFile(path) as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        sig_files = tuple(str(work.signatures(i)) for i in range(int(live.places[:, 0].max()) + 1))
        tasks = [BandTask(b, str(work.near_keys), str(work.near_ranks), str(work.near_places), sig_files,
                          cfg.near_dedup_threshold) for b in range(cfg.near_dedup_bands)]
        edges = list(tqdm(executor.map(band_edges, tasks), total=len(tasks), desc="data: near duplicates",
                          unit="band", leave=False))
        roots = components(len(eligible), live.ranks[eligible], edges)
        near = np.flatnonzero(roots != np.arange(len(eligible)))
        if len(near):
            sigs = [np.load(work.signatures(i), mmap_mode="r") for i in range(len(sig_files))]

            def sig(j: int) -> np.ndarray:
                part, row = live.places[j]
                return np.asarray(sigs[part][row])

            for k in near.tolist():
                doc, of = int(eligible[k]), int(eligible[roots[k]])
                code[doc], rep[doc] = NEAR, of
                similarity[doc] = estimated_jaccard(sig(doc), sig(of))
    return code, rep, similarity


class _Summary:
    """Counters over everything the stage saw, and the kept training documents, filled in part order."""

    def __init__(self, recipe: Recipe):
        cfg = recipe.data
        self.recipe, self.cfg = recipe, cfg
        self.contam_matched: Counter = Counter()
        self.contam_dropped: Counter = Counter()
        self.train: list[tuple[str, str, bytes, int]] = []  # (id, source, digest, repeats) in stage order
        self.per_source = {s.name: {"kind": s.kind, "license": s.license, "weight": s.weight,
                                    "path": s.path if s.kind != "pystdlib" else "",
                                    "seen": 0, "kept": 0, "train": 0, "val": 0, "bytes_seen": 0,
                                    "bytes_kept": 0, "dropped": Counter()} for s in cfg.sources}
        self.reasons: Counter = Counter()
        self.seen = 0
        self.near_similarities: list[float] = []
        self.contam_stats: dict = {}


def _write(run: Run, work: PartFiles, parts, live: _Live, decisions, st: _Summary, executor) -> Path:
    """Each part's final entries and kept documents (tasks on the executor), then documents.jsonl and the
    manifest's entries concatenated in part order; returns the entries file."""
    code, rep, similarity = decisions
    cfg = st.cfg
    starts = np.concatenate([[0], np.cumsum(np.bincount(live.places[:, 0], minlength=len(parts)))]).astype(int) \
        if len(live.ids) else np.zeros(len(parts) + 1, dtype=int)
    tasks = []
    for i, part in enumerate(parts):
        a, b = int(starts[i]), int(starts[i + 1])
        src = cfg.sources[part.source]
        dup = tuple(str(live.ids[r]) if r >= 0 else None for r in rep[a:b].tolist())
        tasks.append(FinishTask(i, str(work.root), src.name, src.weight, st.recipe.seed,
                                tuple(code[a:b].tolist()), dup, tuple(similarity[a:b].tolist())))
    entries_path = work.merged_entries
    with AtomicFile(run.documents, "wb") as docs_out, open(entries_path, "wb") as entries_out:
        for i, result in enumerate(tqdm(executor.map(finish_part, tasks), total=len(tasks), desc="data: writing",
                                        unit="part", leave=False)):
            stats = st.per_source[tasks[i].source_name]
            for key in ("seen", "bytes_seen", "kept", "train", "val", "bytes_kept"):
                stats[key] += result[key]
            st.seen += result["seen"]
            stats["dropped"].update(result["dropped"])
            st.reasons.update(result["dropped"])
            st.contam_matched.update(result["contam_matched"])
            st.contam_dropped.update(result["contam_dropped"])
            st.near_similarities += result["near_similarities"]
            st.train += [(doc_id, tasks[i].source_name, bytes.fromhex(sha), reps)
                         for doc_id, sha, reps in result["train_documents"]]
            for path, out in ((work.kept_documents(i), docs_out), (work.final_entries(i), entries_out)):
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    kept = sum(s["kept"] for s in st.per_source.values())
    if not kept:
        raise UserError("data: no document survived cleaning; check data.sources and the filters "
                        f"(dropped: {dict(sorted(st.reasons.items()))})")
    return entries_path


def run_data(run: Run, executor: str | None = None, workers: int | None = None, address: str | None = None) -> dict:
    """Collect, clean, filter, deduplicate, decontaminate, split and order the recipe's sources.

    executor, workers, address: override `[data] executor`, `workers`, `ray_address` (the output is the
    same bytes whichever runs it)."""
    recipe = run.load_recipe()
    cfg: DataConfig = recipe.data
    check_sources(cfg)  # every recipe mistake before any work
    name = executor or cfg.executor
    if name not in EXECUTORS:
        raise UserError(f"--executor / data.executor: unknown executor '{name}' (known: {', '.join(EXECUTORS)})")
    n_workers = cfg.workers if workers is None else workers
    if n_workers < 0:
        raise UserError(f"--workers / data.workers: must be >= 0, got {n_workers}")
    work = run.data_work
    run.data.mkdir(parents=True, exist_ok=True)
    with make_executor(name, n_workers, cfg.ray_address if address is None else address) as ex:
        parts = plan_parts(cfg)
        work.root.mkdir(parents=True, exist_ok=True)
        tasks = [PartTask(i, p, cfg, str(work.root)) for i, p in enumerate(parts)]
        for _ in tqdm(ex.map(analyse_part, tasks), total=len(tasks), desc=f"data ({ex.name})", unit="part",
                      leave=False):
            pass
        live = _Live(work, len(parts))
        decisions = _decide(live, live.contaminated, cfg, work, ex)
        st = _Summary(recipe)
        st.contam_stats = Analyzer(cfg).contam.stats if cfg.decontaminate else {}
        entries = _write(run, work, parts, live, decisions, st, ex)
    order = _write_order(run, st)
    _write_manifest(run, st, order, entries)
    shutil.rmtree(work.root, ignore_errors=True)
    return read_manifest_head(run)["summary"]


def order_key(seed: int, doc_id: str, k: int) -> bytes:
    """Where the k-th repeat of a training document goes in the order: a seeded hash of its id."""
    return hashlib.sha256(f"{seed}\n{doc_id}\n{k}".encode("utf-8")).digest()


def _write_order(run: Run, st: _Summary) -> list[str]:
    seed = st.recipe.seed
    keyed = sorted((order_key(seed, doc_id, k), doc_id) for doc_id, _, _, reps in st.train for k in range(reps))
    order = [doc_id for _, doc_id in keyed]
    atomic_write_text(run.order, "".join(d + "\n" for d in order))
    return order


def _write_manifest(run: Run, st: _Summary, order: list[str], entries_path: Path) -> None:
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
            "sets": {name: {**st.contam_stats[name], "documents_matched": st.contam_matched.get(name, 0),
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
