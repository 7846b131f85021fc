"""Throughput and memory of the data pipeline (read, clean, dedup, tokenize, shard) on a generated corpus,
on each executor, against datatrove doing the same work on the same corpus in the same run.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/data_throughput.py --mb 200 --executor inprocess,processes,ray \
        --datatrove --rounds 3
    flock /tmp/gf-cpu.lock .venv/bin/python bench/data_throughput.py --mb 5120 --executor ray --data-only
    flock /tmp/gf-cpu.lock .venv/bin/python bench/data_throughput.py --mb 20 --compare-dedup

--executor runs the data stage on each executor named (workers: every core),
then checks that their outputs are the same bytes. The shards stage uses a
second process on 2 or more cores; GLASSFORGE_SHARDS_PROCESSES=1 keeps it to one.

--datatrove runs datatrove's own pipeline on the same files (the corpus is then
all JSON lines, which both read) with LocalPipelineExecutor, tasks and workers
= cores: JsonlReader, a LambdaFilter applying glassforge's cleaning and filters
(the same work), MinHash dedup in its four stages with our parameters (5-word
shingles, 14 bands of 8; a whitespace word splitter, its cheapest), and
DocumentTokenizer with the same tokenizer.json, writing token files: the whole
of our data + shards stages but the exact-duplicate check, the manifest and
the order, which it has no equivalent for. Rounds alternate the two sides, and
the medians and their ratio are printed.

The corpus is a folder of `.txt` files and `.jsonl` files (1,000 records
each) of Zipf-distributed pseudo-words, 1-12 KB per document, with 2% exact
and 3% near duplicates (one word changed) planted. It is generated once per
size under --work and reused.

The tokenizer (byte-level BPE, 4096) is trained on a 5 MB sample first and not
timed: the issue's stage is read, clean, dedup, tokenize, shard. The data stage
and the shards stage each run in a fresh child process; peak memory is the
largest sum of proportional resident memory (PSS, so pages shared after fork
count once) over that process and its workers, sampled every 0.2 s. MB/s is input bytes on disk divided
by the two stage functions' wall time (`run_data`, `run_shards`; interpreter
start and imports, which a build pays once, are left out). MB per CPU-second
(CPU time of the stage function: every thread, and the worker processes) is the figure
that survives a shared machine: on an idle one, wall MB/s is about it times
the cores the stage keeps busy.

--compare-dedup times the near-duplicate step alone, ours (glassforge.data.dedup)
against datasketch's MinHash.update_batch + MinHashLSH with the same
parameters, on the first 20 MB of documents, and reports how many of the
planted near duplicates each finds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(folder: Path, mb: int, seed: int = 0, jsonl_only: bool = False) -> dict:
    """Write the corpus; return {bytes, documents, planted_exact, planted_near}."""
    done = folder.with_name(folder.name + ".json")  # beside the corpus, not in it
    if done.is_file() and folder.is_dir():
        return json.loads(done.read_text())
    import numpy as np

    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    syll = ["ka", "lo", "mi", "nu", "pe", "ru", "sa", "ti", "vo", "ze", "an", "el", "or", "ust", "ing", "er"]
    vocab = sorted({"".join(prng.choice(syll) for _ in range(prng.randint(1, 4))) for _ in range(40000)})
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    target = mb << 20
    total = n_docs = exact = near = 0
    recent: list[str] = []
    file_no = 0
    while total < target:
        file_no += 1
        as_jsonl = jsonl_only or file_no % 2 == 0
        n_in_file = 1000 if as_jsonl else 1
        texts = []
        for _ in range(n_in_file):
            r = prng.random()
            if recent and r < 0.02:
                text = prng.choice(recent)
                exact += 1
            elif recent and r < 0.05:
                w = prng.choice(recent).split(" ")
                w[prng.randrange(len(w))] = "plantedchange"
                text = " ".join(w)
                near += 1
            else:
                n_words = int(prng.uniform(150, 1800))
                idx = rng.choice(len(vocab), size=n_words, p=weights).tolist()
                words = [vocab[i] for i in idx]
                for k in range(12, len(words), 13):
                    words[k] += "."
                text = " ".join(words)
                recent.append(text)
                if len(recent) > 200:
                    recent.pop(0)
            texts.append(text)
        if as_jsonl:
            data = "".join(json.dumps({"id": n_docs + i, "text": t}) + "\n" for i, t in enumerate(texts))
            (folder / f"part-{file_no:06d}.jsonl").write_text(data)
        else:
            sub = folder / f"d{file_no // 1000:03d}"
            sub.mkdir(exist_ok=True)
            (sub / f"doc-{file_no:06d}.txt").write_text(texts[0])
            data = texts[0]
        total += len(data.encode())
        n_docs += len(texts)
    info = {"bytes": total, "documents": n_docs, "planted_exact": exact, "planted_near": near}
    done.write_text(json.dumps(info))
    return info


def make_run(run_dir: Path, corpus: Path, executor: str = "inprocess") -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from glassforge.core.recipe import dump_recipe, parse_recipe
    from glassforge.core.files import atomic_write_text
    from glassforge.core.runfolder import Run

    toml = (f'name = "bench"\nseed = 1\n[data]\nval_fraction = 0.01\nexecutor = "{executor}"\n'
            f'[[data.sources]]\nname = "gen"\n'
            f'kind = "files"\nlicense = "CC0-1.0"\npath = "{corpus}"\n[tokenizer]\nvocab_size = 4096\n')
    run = Run.create(run_dir)
    atomic_write_text(run.recipe, dump_recipe(parse_recipe(toml.encode(), "bench")))


def child(stage: str, run_dir: Path) -> None:
    """Run one stage in this (child) process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from glassforge.core.runfolder import Run

    import glassforge.data.stage  # noqa: F401  (imports are not the stage's work)
    import glassforge.tokenizer.shards  # noqa: F401

    run = Run(run_dir)
    run.load_recipe()
    t, c = time.perf_counter(), _own_cpu()
    if stage == "data":
        from glassforge.data.stage import run_data

        print(json.dumps({k: v for k, v in run_data(run).items() if k != "sources"}))
    elif stage == "tokenizer":
        from glassforge.data.documents import iter_documents
        from glassforge.tokenizer.bpe import train_tokenizer, write_tokenizer_files

        def sample():
            n = 0
            for d in iter_documents(run, "train"):
                yield d["text"]
                n += len(d["text"])
                if n > 5 << 20:
                    return
        write_tokenizer_files(run.tokenizer, train_tokenizer(sample(), 4096))
    elif stage == "datatrove":
        print(json.dumps(datatrove_pipeline(run)))
    elif stage == "shards":
        from glassforge.tokenizer.shards import run_shards

        print(json.dumps(run_shards(run)))
    print(json.dumps({"stage_seconds": time.perf_counter() - t, "stage_cpu_seconds": _own_cpu() - c}))


class _SplitWords:
    """datatrove's WordTokenizer interface over str.split: its cheapest word splitter (its own fall back
    to spaCy), near our dedup's word rule; defined at module level so its workers can unpickle it."""

    language = None

    def word_tokenize(self, text):
        return text.split()

    def sent_tokenize(self, text):
        return [text]

    def span_tokenize(self, text):
        return [(0, len(text))]


def datatrove_pipeline(run) -> dict:
    """datatrove's read, filter, MinHash dedup and tokenize on the run's corpus, into RUN/datatrove/."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    from glassforge.data.clean import filter_reason, normalize

    recipe = run.load_recipe()
    cfg, corpus = recipe.data, recipe.data.sources[0].path
    out = run.root / "datatrove"
    n = os.cpu_count() or 1
    mh = MinhashConfig(n_grams=cfg.near_dedup_shingle, num_buckets=cfg.near_dedup_bands,
                       hashes_per_bucket=cfg.near_dedup_rows, hash_config=HashConfig(precision=64))
    words = type("SplitWords", (_SplitWords, WordTokenizer), {})()

    def keep(doc) -> bool:
        doc.text = normalize(doc.text)
        return filter_reason(doc.text, cfg, doc.text.encode("utf-8")) is None

    def reader():
        return JsonlReader(corpus, glob_pattern="*.jsonl", text_key="text", id_key="id")

    steps = [
        ([reader(), LambdaFilter(keep), MinhashDedupSignature(str(out / "sigs"), config=mh, language=words)], n),
        ([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=mh)], mh.num_buckets),
        ([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=mh)], 1),
        ([reader(), LambdaFilter(keep), MinhashDedupFilter(str(out / "remove")),
          DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(run.tokenizer_json),
                            eos_token="<|endoftext|>", shuffle_documents=False)], n),
    ]
    seconds = []
    for k, (pipeline, tasks) in enumerate(steps):
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(n, tasks), logging_dir=str(out / f"logs{k}"),
                              skip_completed=False).run()
        seconds.append(round(time.perf_counter() - t, 2))
    tokens = sum(p.stat().st_size for p in (out / "tokens").glob("*.ds")) // 2
    return {"datatrove_step_seconds": seconds, "datatrove_tokens": tokens}


def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(proportional resident memory of a process and all its descendants, the largest resident memory of one
    of them) in MB, from Linux /proc: PSS counts a page shared by k processes 1/k in each."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, largest, todo = 0.0, 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) / 1024
                    elif line.startswith("Rss:"):
                        largest = max(largest, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return total, largest


def _own_cpu() -> float:
    """CPU seconds of this process (all threads) and of its reaped child processes (the second processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_child(stage: str, run_dir: Path) -> tuple[float, float, float, float]:
    """(seconds and CPU seconds in the stage function, peak PSS MB of the stage's process tree, peak RSS MB
    of its largest process, sampled every 0.2 s) of one stage run in a fresh process."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--run", str(run_dir)],
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.PIPE, text=True)
    peak = largest = 0.0
    while proc.poll() is None:
        total, one = _tree_memory_mb(proc.pid)
        peak, largest = max(peak, total), max(largest, one)
        time.sleep(0.2)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise SystemExit(f"stage {stage} failed ({proc.returncode})")
    for line in out[:-1]:
        print(line)
    last = json.loads(out[-1])
    return last["stage_seconds"], last["stage_cpu_seconds"], peak, largest


def compare_dedup(corpus: Path, limit_mb: int = 20) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from datasketch import MinHash, MinHashLSH

    from glassforge.data.clean import normalize
    from glassforge.data.dedup import LSHIndex, MinHasher, Words
    from glassforge.core.recipe import SourceConfig
    from glassforge.data.sources import iter_source

    texts, n = [], 0
    for raw in iter_source(SourceConfig(name="g", kind="files", path=str(corpus))):
        if raw.text is None:
            continue
        texts.append(normalize(raw.text))
        n += len(texts[-1])
        if n > limit_mb << 20:
            break
    mb = n / 1e6
    t = time.perf_counter()
    mh, lsh, ours = MinHasher(112, 5), LSHIndex(14, 8, 0.8), 0
    for i in range(0, len(texts), 1024):
        words = Words([x.encode() for x in texts[i:i + 1024]])
        sigs, has = mh.signatures(words)
        keys = lsh.keys(sigs).tolist()
        for j in range(len(sigs)):
            if has[j] and lsh.query_or_insert(sigs[j], keys[j]) is not None:
                ours += 1
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    index, theirs = MinHashLSH(threshold=0.8, num_perm=112, params=(14, 8)), 0
    for i, x in enumerate(texts):
        w = x.lower().split()
        m = MinHash(num_perm=112)
        m.update_batch([" ".join(w[k:k + 5]).encode() for k in range(max(1, len(w) - 4))])
        if index.query(m):
            theirs += 1
        else:
            index.insert(i, m)
    t_theirs = time.perf_counter() - t
    print(json.dumps({"documents": len(texts), "MB": round(mb, 1),
                      "glassforge_dedup": {"seconds": round(t_ours, 2), "MB_per_s": round(mb / t_ours, 1),
                                           "near_duplicates": ours},
                      "datasketch": {"seconds": round(t_theirs, 2), "MB_per_s": round(mb / t_theirs, 1),
                                     "near_duplicates": theirs}}, indent=1))


def _outputs_digest(run_dir: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("documents.jsonl", "order.txt", "manifest.json", "manifest.jsonl"):
        h.update(hashlib.sha256((run_dir / "data" / name).read_bytes()).digest())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200, help="corpus size in MiB")
    p.add_argument("--work", default="/tmp/gf-data-bench", help="where the corpus and run folder go")
    p.add_argument("--executor", default="processes", help="comma-separated: inprocess, processes, ray")
    p.add_argument("--datatrove", action="store_true", help="also run datatrove's pipeline on the same corpus")
    p.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times (medians)")
    p.add_argument("--compare-dedup", action="store_true")
    p.add_argument("--data-only", action="store_true", help="skip the tokenizer and shards stages")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, Path(args.run))
    import shutil
    import statistics

    work = Path(args.work)
    corpus = work / (f"corpus-{args.mb}mb" + ("-jsonl" if args.datatrove else ""))
    t = time.perf_counter()
    info = generate(corpus, args.mb, jsonl_only=args.datatrove)
    print(f"corpus: {info['bytes'] / 1e6:.0f} MB, {info['documents']} documents "
          f"({info['planted_exact']} exact and {info['planted_near']} near duplicates planted), "
          f"ready in {time.perf_counter() - t:.0f} s", flush=True)
    if args.compare_dedup:
        return compare_dedup(corpus)
    mb = info["bytes"] / 1e6

    def figures(seconds: float, cpu: float, pss: float, rss: float) -> dict:
        return {"seconds": round(seconds, 1), "MB_per_s": round(mb / seconds, 1), "cpu_seconds": round(cpu, 1),
                "MB_per_cpu_s": round(mb / cpu, 1), "peak_pss_MB": round(pss), "largest_process_rss_MB": round(rss)}

    executors = [e.strip() for e in args.executor.split(",") if e.strip()]
    result: dict = {"input_MB": round(mb, 1), "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
                    "rounds": args.rounds}
    whole: dict[str, list[float]] = {}
    digests = {}
    for r in range(args.rounds):
        for executor in executors:
            run_dir = work / f"run-{args.mb}mb-{executor}"
            shutil.rmtree(run_dir, ignore_errors=True)
            make_run(run_dir, corpus, executor)
            data = timed_child("data", run_dir)
            digests[executor] = _outputs_digest(run_dir)
            result.setdefault(f"data_stage[{executor}]", []).append(figures(*data))
            if args.data_only:
                continue
            tok = timed_child("tokenizer", run_dir)
            shards = timed_child("shards", run_dir)
            result.setdefault(f"shards_stage[{executor}]", []).append(figures(*shards))
            result["tokenizer_training_untimed"] = figures(*tok)
            whole.setdefault(f"glassforge[{executor}]", []).append(data[0] + shards[0])
            if args.datatrove and executor == executors[0]:
                shutil.rmtree(run_dir / "datatrove", ignore_errors=True)
                dt = timed_child("datatrove", run_dir)
                result.setdefault("datatrove", []).append(figures(*dt))
                whole.setdefault("datatrove", []).append(dt[0])
    result["same_bytes_on_every_executor"] = len(set(digests.values())) == 1
    if whole:
        result["whole_stage_median_MB_per_s"] = {k: round(mb / statistics.median(v), 1) for k, v in whole.items()}
        if "datatrove" in whole:
            result["ratio_to_datatrove"] = {k: round(statistics.median(whole["datatrove"]) / statistics.median(v), 2)
                                            for k, v in whole.items() if k != "datatrove"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
