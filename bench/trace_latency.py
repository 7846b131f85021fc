"""Trace index: build speed and query latency, on a synthetic corpus and on a real release.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/trace_latency.py --tokens 100000000
    flock /tmp/gf-cpu.lock .venv/bin/python bench/trace_latency.py --tokens 0 --release RUN --shards 4

`--shards K` builds the real index in K document-aligned shards (one worker process per core) and
queries it as one; the same command with `--shards 1` is the single index to compare against.

Synthetic corpus: documents of log-normal length (median ~500 tokens) drawn from a Zipf(1.0)
unigram distribution over a 32,000-token vocabulary, 2% of documents pasted with a passage copied
from another document (so long spans repeat, as boilerplate does). `<|endoftext|>` (id 0) ends
each document, as in glassforge's shards.

Queries are 256-token "outputs" of three kinds: `copied` (a 256-token window of one training
document: one long match), `mixed` (four 64-token pieces of different documents: four spans), and
`novel` (fresh Zipf tokens: no span of 8 tokens). On the synthetic index the timed call is
`TraceIndex.trace_ids` plus the document rows (everything but tokenizing and decoding, since the
ids have no text); on the real release it is the whole `Tracer.trace(text)` with the release's
tokenizer, the text being 256-token windows of training (copied) and validation (novel) documents.

Peer: the PyPI `infini-gram` engine (its Rust indexer and C++ engine) on the same synthetic corpus,
`attribute()` (its OLMoTrace maximal-span query, min_len 8, up to 5 documents per span) plus
`get_docs_by_ptrs_2` for the documents, and its span boundaries checked against ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glassforge.release.trace import TraceIndex, Tracer  # noqa: E402
from glassforge.release.trace_index import build_index, build_index_arrays  # noqa: E402

VOCAB = 32_000
EOT = 0
QUERY_TOKENS = 256


def zipf_sampler(rng: np.random.Generator, vocab: int = VOCAB, a: float = 1.0):
    p = 1.0 / np.arange(1, vocab) ** a
    cdf = np.cumsum(p / p.sum())

    def draw(n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.uint16)
        for s in range(0, n, 1 << 22):
            k = min(n - s, 1 << 22)
            out[s:s + k] = np.minimum(np.searchsorted(cdf, rng.random(k)), vocab - 2) + 1
        return out

    return draw


def synthetic_corpus(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint16 tokens (each document ending in EOT) and document offsets."""
    rng = np.random.default_rng(seed)
    draw = zipf_sampler(rng)
    lengths = []
    total = 0
    while total < n_tokens:
        batch = np.maximum(8, rng.lognormal(np.log(500), 0.9, 100_000).astype(np.int64)) + 1
        lengths.append(batch)
        total += int(batch.sum())
    lens = np.concatenate(lengths)
    cum = np.cumsum(lens)
    n_docs = int(np.searchsorted(cum, n_tokens)) + 1
    lens = lens[:n_docs]
    lens[-1] -= int(cum[n_docs - 1]) - n_tokens
    if lens[-1] < 2:
        lens[-2] += lens[-1]
        lens = lens[:-1]
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    tokens = draw(n_tokens)
    tokens[offsets[1:] - 1] = EOT
    # 2% of documents get a passage (32..512 tokens) copied from another document.
    n_docs = len(lens)
    for d in rng.choice(n_docs, size=n_docs // 50, replace=False):
        src = int(rng.integers(n_docs))
        a, b = int(offsets[src]), int(offsets[src + 1]) - 1
        c, e = int(offsets[d]), int(offsets[d + 1]) - 1
        k = min(int(rng.integers(32, 513)), b - a, e - c)
        if k > 0:
            s = a + int(rng.integers(0, b - a - k + 1))
            t = c + int(rng.integers(0, e - c - k + 1))
            tokens[t:t + k] = tokens[s:s + k]
    return tokens, offsets


def synthetic_queries(tokens: np.ndarray, offsets: np.ndarray, n: int, seed: int = 1) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    lens = np.diff(offsets) - 1
    long_docs = np.flatnonzero(lens >= QUERY_TOKENS)
    mid_docs = np.flatnonzero(lens >= 64)

    def window(docs: np.ndarray, k: int) -> list[int]:
        d = int(rng.choice(docs))
        a = int(offsets[d]) + int(rng.integers(0, int(lens[d]) - k + 1))
        return tokens[a:a + k].tolist()

    draw = zipf_sampler(rng)
    return {
        "copied": [window(long_docs, QUERY_TOKENS) for _ in range(n)],
        "mixed": [sum((window(mid_docs, 64) for _ in range(4)), []) for _ in range(n)],
        "novel": [draw(QUERY_TOKENS).tolist() for _ in range(n)],
    }


def percentiles(ms: list[float]) -> dict:
    qs = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(qs[98], 2), "mean_ms": round(statistics.fmean(ms), 2)}


def time_calls(fn, queries: list, warmup: int = 5) -> dict:
    for q in queries[:warmup]:
        fn(q)
    ms = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        ms.append((time.perf_counter() - t) * 1000)
    return percentiles(ms)


def ours_synthetic(index: TraceIndex, ids: list[int]) -> list[dict]:
    spans = index.trace_ids(ids, min_tokens=8, max_docs=5)
    for s in spans:
        s["rows"] = [index.document(doc) for doc, _, _ in s["documents"]]
    return spans


# ----------------------------------------------------------------------------------- infini-gram


def infinigram_build(tokens: np.ndarray, offsets: np.ndarray, folder: Path, cpus: int) -> float:
    """Write infini-gram's v4 layout (\\xff\\xff before each document, u16 little-endian) and run its indexer."""
    from argparse import Namespace

    from infini_gram import indexing

    folder.mkdir(parents=True, exist_ok=True)
    n_docs = len(offsets) - 1
    starts = np.zeros(n_docs, dtype=np.uint64)
    with open(folder / "tokenized.0", "wb") as f:
        pos = 0
        for d in range(n_docs):
            body = tokens[offsets[d]:offsets[d + 1] - 1].astype("<u2").tobytes()
            starts[d] = pos
            f.write(b"\xff\xff" + body)
            pos += 2 + len(body)
    starts.tofile(folder / "offset.0")
    args = Namespace(save_dir=str(folder), temp_dir=str(folder / "tmp"), worker_id=0, shards=1, workers=1,
                     cpus=cpus, mem=8, token_width=2)
    cwd = os.getcwd()
    t = time.perf_counter()
    try:
        indexing.build_sa(args)
    finally:
        os.chdir(cwd)
    return time.perf_counter() - t


def infinigram_peer(tokens, offsets, workdir: Path, queries: dict, index: TraceIndex, cpus: int) -> dict:
    try:
        from infini_gram.engine import InfiniGramEngine
    except ImportError as e:  # pragma: no cover - depends on the machine
        return {"error": f"infini-gram not importable: {e}"}
    folder = workdir / "infinigram"
    shutil.rmtree(folder, ignore_errors=True)
    with open(os.devnull, "w") as devnull:
        old = os.dup(1)
        os.dup2(devnull.fileno(), 1)  # its indexer prints progress
        try:
            build_s = infinigram_build(tokens, offsets, folder, cpus)
        finally:
            os.dup2(old, 1)
    engine = InfiniGramEngine(index_dir=str(folder), eos_token_id=EOT, version=4, token_dtype="u16")

    def query(ids: list[int]) -> list:
        res = engine.attribute(input_ids=ids, delim_ids=[], min_len=8, max_cnt=5, enforce_bow=False)
        reqs = [(d["s"], d["ptr"], s["length"], 24) for s in res["spans"] for d in s["docs"]]
        docs = engine.get_docs_by_ptrs_2(requests=reqs) if reqs else []
        return [res, docs]

    out = {"build_seconds": round(build_s, 2), "build_mtok_per_s": round(len(tokens) / build_s / 1e6, 3),
           "index_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file())}
    agree = total = 0
    for kind in queries:
        out[kind] = time_calls(query, queries[kind])
        # Cross-check: same maximal spans (start, end, count) as ours, where infini-gram reports them.
        for ids in queries[kind][:20]:
            theirs = sorted((s["l"], s["r"], s["count"]) for s in query(ids)[0]["spans"])
            ours = sorted((s["token_start"], s["token_end"], s["occurrences"]) for s in index.trace_ids(ids, 8, 5))
            agree += theirs == ours
            total += 1
    out["spans_agree"] = f"{agree}/{total}"
    shutil.rmtree(folder, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- real release


def real_release(arg: str | None, workdir: Path, shards: int = 1) -> tuple[Path, str, float | None]:
    """A release folder with trace/ and tokenizer.json, given or built from a recipe's data stages, and the
    index's build time when it was built here."""
    from glassforge.core.recipe import builtin_recipes, dump_recipe, load_recipe
    from glassforge.core.files import atomic_write_text
    from glassforge.core.runfolder import Run

    if arg and not Path(arg).is_dir() and ("/" in arg or arg.endswith(".toml")) and not Path(arg).is_file():
        raise SystemExit(f"{arg}: no such folder")
    if arg and Path(arg).is_dir():
        path = Path(arg)
        for cand in (path, path / "release"):
            if (cand / "trace" / "index.json").is_file():
                return cand, str(cand), None
        if (path / "data" / "shards.json").is_file():
            run = Run(path)
        else:
            raise SystemExit(f"{arg}: neither a release with trace/ nor a run folder with token shards")
        label = f"run {path}"
    else:
        from glassforge.data.stage import run_data
        from glassforge.tokenizer.shards import run_shards
        from glassforge.tokenizer.bpe import run_tokenizer

        name = arg or ("default" if "default" in builtin_recipes() else "tiny")
        run = Run.create(workdir / f"run-{name}")
        atomic_write_text(run.recipe, dump_recipe(load_recipe(name)))
        run_data(run)
        run_tokenizer(run)
        run_shards(run)
        label = f"recipe {name} (data, tokenizer and shards stages only)"
    rel = workdir / "release"
    rel.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.tokenizer / "tokenizer.json", rel / "tokenizer.json")
    if shards > 1:  # document-aligned shards, each sorted by its own worker process
        from glassforge.data.executor import ProcessExecutor

        with ProcessExecutor() as executor:
            info = build_index(run, rel / "trace", shards=shards, executor=executor)
    else:
        info = build_index(run, rel / "trace")
    rel.joinpath(".run").write_text(str(run.root))
    return rel, label, info["build_seconds"]


def real_queries(tracer: Tracer, rel: Path, n: int, seed: int = 2) -> dict[str, list[str]]:
    """256-token windows of training documents (copied) and of validation documents (novel)."""
    from glassforge.data.documents import iter_documents
    from glassforge.core.runfolder import Run

    rng = np.random.default_rng(seed)
    run_file = rel / ".run"
    out: dict[str, list[str]] = {}
    if not run_file.is_file():
        return out
    run = Run(Path(run_file.read_text()))
    for kind, split in (("copied", "train"), ("novel", "val")):
        texts = []
        docs = [d["text"] for d in iter_documents(run, split)]
        encs = tracer.tokenizer.encode_batch(docs, add_special_tokens=False)
        pool = [e.ids for e in encs if len(e.ids) >= QUERY_TOKENS] or [e.ids for e in encs if len(e.ids) >= 32]
        for _ in range(n if pool else 0):
            ids = pool[int(rng.integers(len(pool)))]
            a = int(rng.integers(0, max(1, len(ids) - QUERY_TOKENS + 1)))
            texts.append(tracer.tokenizer.decode(ids[a:a + QUERY_TOKENS]))
        if texts:
            out[kind] = texts
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000_000, help="synthetic corpus size (0: skip)")
    p.add_argument("--queries", type=int, default=200, help="queries per kind")
    p.add_argument("--release", help="a release (with trace/), run folder or recipe name for the real-data part "
                                     "(default: the default recipe's data stages, else tiny's)")
    p.add_argument("--no-infinigram", action="store_true")
    p.add_argument("--shards", type=int, default=1, help="build the real index in this many shards (one process "
                                                          "per core), queried as one")
    p.add_argument("--cpus", type=int, default=2, help="threads the infini-gram indexer may use")
    p.add_argument("--workdir", help="where to put indexes (default: a temp folder, removed)")
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trace-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpus_visible": os.cpu_count(), "query_tokens": QUERY_TOKENS}
    try:
        if args.tokens:
            t = time.perf_counter()
            tokens, offsets = synthetic_corpus(args.tokens)
            print(f"synthetic corpus: {len(tokens):,} tokens, {len(offsets) - 1:,} documents "
                  f"({time.perf_counter() - t:.1f} s to generate)", flush=True)
            rows = [{"id": f"doc{i}", "source": f"synthetic://{i}", "license": "CC0-1.0", "sha256": "0" * 64}
                    for i in range(len(offsets) - 1)]
            t = time.perf_counter()
            info = build_index_arrays(tokens, offsets, rows, workdir / "synthetic", eot_id=EOT)
            build_s = time.perf_counter() - t
            index = TraceIndex(workdir / "synthetic")
            size = sum(f["bytes"] for f in info["files"].values())
            syn = {"tokens": len(tokens), "documents": len(offsets) - 1,
                   "build_seconds": round(build_s, 2), "build_mtok_per_s": round(len(tokens) / build_s / 1e6, 3),
                   "sort_seconds": info["sort_seconds"],
                   "sort_mtok_per_s": round(len(tokens) / info["sort_seconds"] / 1e6, 3),
                   "index_bytes": size, "bytes_per_token_besides_tokens":
                       round((size - info["files"]["tokens.bin"]["bytes"]) / len(tokens), 3)}
            print(f"ours: built in {build_s:.1f} s ({syn['build_mtok_per_s']} M tokens/s; suffix sort "
                  f"{info['sort_seconds']:.1f} s), {syn['bytes_per_token_besides_tokens']} bytes/token besides tokens",
                  flush=True)
            queries = synthetic_queries(tokens, offsets, args.queries)
            for kind, qs in queries.items():
                syn[kind] = time_calls(lambda ids: ours_synthetic(index, ids), qs)
                print(f"ours {kind:7s} 256-token trace: p50 {syn[kind]['p50_ms']} ms, p99 {syn[kind]['p99_ms']} ms",
                      flush=True)
            report["synthetic"] = syn
            if not args.no_infinigram:
                try:
                    peer = infinigram_peer(tokens, offsets, workdir, queries, index, args.cpus)
                except Exception as e:  # report, don't hide, a peer that fails here
                    peer = {"error": f"{type(e).__name__}: {e}"}
                report["infinigram"] = peer
                if "error" in peer:
                    print(f"infini-gram: {peer['error']}", flush=True)
                else:
                    print(f"infini-gram: built in {peer['build_seconds']} s ({peer['build_mtok_per_s']} M tokens/s, "
                          f"{args.cpus} threads); spans agree with ours on {peer['spans_agree']} queries", flush=True)
                    for kind in queries:
                        print(f"infini-gram {kind:7s} 256-token attribute+docs: p50 {peer[kind]['p50_ms']} ms, "
                              f"p99 {peer[kind]['p99_ms']} ms", flush=True)
            del index, tokens, offsets
            shutil.rmtree(workdir / "synthetic", ignore_errors=True)

        rel, label, build_s = real_release(args.release, workdir, args.shards)
        tracer = Tracer(rel / "trace")
        meta = tracer.index.meta
        real = {"release": label, "tokens": meta["tokens"], "documents": meta["documents"],
                "build_seconds": build_s,
                "build_mtok_per_s": round(meta["tokens"] / max(build_s, 1e-9) / 1e6, 3) if build_s else None}
        print(f"real: {label}: {meta['tokens']:,} tokens, {meta['documents']:,} documents"
              + (f", index built in {build_s} s" if build_s else " (index built earlier)"), flush=True)
        for kind, texts in real_queries(tracer, rel, args.queries).items():
            real[kind] = time_calls(lambda text: tracer.trace(text, min_tokens=8, max_docs=5), texts)
            print(f"real {kind:7s} 256-token Tracer.trace: p50 {real[kind]['p50_ms']} ms, "
                  f"p99 {real[kind]['p99_ms']} ms", flush=True)
        report["real"] = real
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
