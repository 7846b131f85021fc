"""Throughput and memory of the data pipeline (read, clean, dedup, tokenize, shard) on a generated corpus.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/data_throughput.py --mb 200
    flock /tmp/gf-cpu.lock .venv/bin/python bench/data_throughput.py --mb 1024   # the memory check
    flock /tmp/gf-cpu.lock .venv/bin/python bench/data_throughput.py --mb 20 --compare-dedup

Both stages use a second process on 2 or more cores; GLASSFORGE_DATA_WORKERS=0
GLASSFORGE_SHARDS_PROCESSES=1 keeps each to one, for the per-core figures.

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


def generate(folder: Path, mb: int, seed: int = 0) -> dict:
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
        as_jsonl = file_no % 2 == 0
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


def make_run(run_dir: Path, corpus: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from glassforge.core.recipe import dump_recipe, parse_recipe
    from glassforge.core.files import atomic_write_text
    from glassforge.core.runfolder import Run

    toml = (f'name = "bench"\nseed = 1\n[data]\nval_fraction = 0.01\n[[data.sources]]\nname = "gen"\n'
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
    elif stage == "shards":
        from glassforge.tokenizer.shards import run_shards

        print(json.dumps(run_shards(run)))
    print(json.dumps({"stage_seconds": time.perf_counter() - t, "stage_cpu_seconds": _own_cpu() - c}))


def _tree_rss_mb(pid: int) -> float:
    """Proportional resident memory (PSS: a page shared by k processes counts 1/k in each) of a process
    and all its descendants, from Linux /proc/PID/smaps_rollup."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _own_cpu() -> float:
    """CPU seconds of this process (all threads) and of its reaped child processes (the second processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_child(stage: str, run_dir: Path) -> tuple[float, float, float]:
    """(seconds and CPU seconds in the stage function, peak resident MB of the stage's process tree,
    sampled every 0.2 s) of one stage run in a fresh process."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--run", str(run_dir)],
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mb(proc.pid))
        time.sleep(0.2)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise SystemExit(f"stage {stage} failed ({proc.returncode})")
    for line in out[:-1]:
        print(line)
    last = json.loads(out[-1])
    return last["stage_seconds"], last["stage_cpu_seconds"], peak


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200, help="corpus size in MiB")
    p.add_argument("--work", default="/tmp/gf-data-bench", help="where the corpus and run folder go")
    p.add_argument("--compare-dedup", action="store_true")
    p.add_argument("--data-only", action="store_true", help="skip the tokenizer and shards stages")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, Path(args.run))
    work = Path(args.work)
    corpus = work / f"corpus-{args.mb}mb"
    t = time.perf_counter()
    info = generate(corpus, args.mb)
    print(f"corpus: {info['bytes'] / 1e6:.0f} MB, {info['documents']} documents "
          f"({info['planted_exact']} exact and {info['planted_near']} near duplicates planted), "
          f"ready in {time.perf_counter() - t:.0f} s", flush=True)
    if args.compare_dedup:
        return compare_dedup(corpus)
    run_dir = work / f"run-{args.mb}mb"
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    make_run(run_dir, corpus)
    mb = info["bytes"] / 1e6

    def figures(seconds: float, cpu: float, rss: float) -> dict:
        return {"seconds": round(seconds, 1), "MB_per_s": round(mb / seconds, 1), "cpu_seconds": round(cpu, 1),
                "MB_per_cpu_s": round(mb / cpu, 1), "peak_pss_MB": round(rss)}

    data = timed_child("data", run_dir)
    result = {"input_MB": round(mb, 1), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "data_stage": figures(*data)}
    if not args.data_only:
        tok = timed_child("tokenizer", run_dir)
        shards = timed_child("shards", run_dir)
        result["shards_stage"] = figures(*shards)
        result["whole_stage_MB_per_s"] = round(mb / (data[0] + shards[0]), 1)
        result["tokenizer_training_untimed"] = figures(*tok)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
