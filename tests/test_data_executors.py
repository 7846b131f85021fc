"""The data stage on every executor: in-process, local processes and a real two-node Ray cluster give the same bytes.

The parts are cut small here (a few KiB) so that a corpus of a few hundred
documents makes many parts and its near duplicates cross part boundaries; the
outputs must not depend on the part size either.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_text
from glassforge.core.manifest import iter_manifest_entries
from glassforge.core.recipe import dump_recipe, parse_recipe
from glassforge.core.runfolder import Run
from glassforge.data import parts as parts_module
from glassforge.data import stage as stage_module
from glassforge.data.analyse import analyse_part, document_id
from glassforge.data.executor import make_executor
from glassforge.data.stage import run_data

OUTPUTS = ("documents.jsonl", "order.txt", "manifest.json", "manifest.jsonl", "train.bin", "train.offsets.npy",
           "val.bin", "shards.json")
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ru", "sa", "ti", "vo", "ze", "bra", "cle", "dro", "fin", "gul"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def make_corpus(root: Path, seed: int = 3) -> Path:
    """Two JSON-lines files and a folder of text files: distinct documents, exact copies and edited near copies
    (the copies far from their originals, so in other parts), and a few bad lines."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    originals = [" ".join(_word(rng) for _ in range(rng.randint(60, 140))) for _ in range(160)]
    lines = [json.dumps({"text": t}) for t in originals[:120]]
    lines.insert(40, "{not json")
    lines.insert(90, json.dumps({"other": "no text field"}))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    copies = []
    for i in range(0, 120, 7):
        words = originals[i].split()
        words[rng.randrange(len(words))] = "edited"
        copies.append(json.dumps({"text": " ".join(words)}))  # a near duplicate
    copies += [json.dumps({"text": originals[i]}) for i in range(3, 120, 29)]  # exact duplicates
    (root / "b.jsonl").write_text("\n".join(copies) + "\n")
    (root / "txt").mkdir()
    for i, text in enumerate(originals[120:]):
        (root / "txt" / f"{i:03d}.txt").write_text(text)
    return root


def make_run(root: Path, corpus: Path, **data) -> Run:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items())
    text = (f'name = "t"\nseed = 5\n[data]\nval_fraction = 0.1\n{extra}'
            f'[[data.sources]]\nname = "c"\nkind = "files"\npath = "{corpus}"\nlicense = "CC0-1.0"\n'
            '[tokenizer]\nvocab_size = 300\nmin_frequency = 1\n[pretrain]\nseq_len = 16\nbatch_tokens = 64\n')
    run = Run.create(root)
    atomic_write_text(run.recipe, dump_recipe(parse_recipe(text.encode(), "test")))
    return run


def outputs(run: Run) -> dict[str, bytes]:
    from glassforge.tokenizer.bpe import run_tokenizer
    from glassforge.tokenizer.shards import run_shards

    run_tokenizer(run)
    run_shards(run)
    assert not run.data_work.root.exists()  # the parts' files are gone once the stage completes
    return {name: (run.data / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "c")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, bytes]:
    """One process, one part per 32 MiB: the whole corpus in one part."""
    run = make_run(tmp_path_factory.mktemp("ref") / "run", corpus)
    run_data(run)
    return outputs(run)


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(parts_module, "PART_BYTES", 4096)


def test_reference_corpus_has_what_the_comparisons_need(reference, corpus):
    entries = [json.loads(line) for line in reference["manifest.jsonl"].splitlines()]
    reasons = {e["reason"] for e in entries}
    assert {"exact_duplicate", "near_duplicate", "malformed_json", "missing_text_field", None} <= reasons
    by_id = {e["id"]: e for e in entries}
    for e in entries:  # an id is the content address of its name and text, recomputable from the manifest
        assert e["id"] == document_id("c", e["name"], e["sha256"])
        seen = e
        while seen["duplicate_of"]:  # each group keeps its lowest id; following duplicate_of ends at a kept one
            assert seen["duplicate_of"] < seen["id"]
            seen = by_id[seen["duplicate_of"]]
        assert e["status"] == "kept" or e["duplicate_of"] is None or seen["status"] == "kept"
    from glassforge.core.recipe import DataConfig, SourceConfig

    cfg = DataConfig(sources=[SourceConfig(name="c", kind="files", path=str(corpus))])
    assert len(parts_module.plan_parts(cfg, part_bytes=4096)) >= 8  # the small parts below really are many


@pytest.mark.parametrize("executor,workers", [("inprocess", 0), ("processes", 1), ("processes", 2)])
def test_every_part_size_executor_and_worker_count_gives_the_same_bytes(executor, workers, corpus, reference,
                                                                         small_parts, tmp_path):
    run = make_run(tmp_path / "run", corpus, executor=executor, workers=workers)
    run_data(run)
    got = outputs(run)
    assert [n for n in OUTPUTS if got[n] != reference[n]] == []


def test_an_interrupted_stage_resumes_from_the_parts_it_finished(corpus, reference, small_parts, tmp_path,
                                                                 monkeypatch):
    run = make_run(tmp_path / "run", corpus)
    calls = []

    def stop_at_the_fifth(task):
        calls.append(task.index)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return analyse_part(task)

    monkeypatch.setattr(stage_module, "analyse_part", stop_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_data(run)
    assert not run.documents.exists() and len(list(run.data_work.root.glob("part-*.json"))) == 4
    done = []
    monkeypatch.setattr(stage_module, "analyse_part", lambda task: done.append(task.index) or analyse_part(task))
    monkeypatch.setattr("glassforge.data.analyse.iter_part", _no_reading_of(set(range(4))))
    run_data(run)
    assert outputs(run) == reference and len(done) > 4


def _no_reading_of(finished: set[int]):
    from glassforge.data import analyse

    real = analyse.iter_part

    def guarded(part, cfg):
        assert part not in [p for i, p in enumerate(_plan) if i in finished], "a finished part was read again"
        return real(part, cfg)

    return guarded


_plan: list = []


@pytest.fixture(autouse=True)
def _remember_plan(monkeypatch):
    real = stage_module.plan_parts

    def remember(cfg):
        _plan[:] = real(cfg)
        return list(_plan)

    monkeypatch.setattr(stage_module, "plan_parts", remember)


# --------------------------------------------------------------------------- a real two-node Ray cluster


class FailOnce:
    """Wraps the part task: the first attempt at part `index` raises, or kills its own worker process after
    leaving a half-written file, as a crashed node would. Pickled by value, so Ray workers can load it."""

    def __init__(self, marker: str, index: int, how: str):
        self.marker, self.index, self.how = marker, index, how

    def __call__(self, task):
        if task.index == self.index and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            if self.how == "raise":
                raise RuntimeError("a task that fails once")
            Path(task.work, f".part-{task.index:06d}.entries.jsonl.half.tmp").write_text('{"name": "c:trunc')
            os.kill(os.getpid(), signal.SIGKILL)
        return analyse_part(task)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle as ray_cloudpickle
    from ray.cluster_utils import Cluster

    ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                           "object_store_memory": 80 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_two_node_ray_cluster_gives_the_same_bytes_with_a_failing_and_a_killed_task(
        ray_cluster, corpus, reference, small_parts, tmp_path, monkeypatch):
    import ray

    nodes = set()

    @ray.remote(num_cpus=1)
    def where():
        time.sleep(0.5)
        return ray.get_runtime_context().get_node_id()

    nodes.update(ray.get([where.remote() for _ in range(4)]))
    assert len(nodes) == 2  # tasks really run on both nodes
    for how in ("plain", "raise", "kill"):
        marker = tmp_path / f"failed-{how}"
        if how != "plain":
            monkeypatch.setattr(stage_module, "analyse_part", FailOnce(str(marker), 3, how))
        run = make_run(tmp_path / how, corpus, executor="ray")
        run_data(run)
        got = outputs(run)
        assert [n for n in OUTPUTS if got[n] != reference[n]] == [], how
        assert how == "plain" or marker.exists()  # the failure happened, and the retry made it good
        names = [e["name"] for e in iter_manifest_entries(run)]
        assert len(names) == len(set(names))  # nothing duplicated by the retried task
        if how == "plain":
            sharded_trace_index_on_ray(run, tmp_path)


def sharded_trace_index_on_ray(run: Run, tmp_path: Path) -> None:
    """The trace index in 3 shards built by Ray tasks answers as one index over the whole stream."""
    import numpy as np

    from glassforge.data.executor import RayExecutor
    from glassforge.release.trace_index import build_index
    from glassforge.release.trace_search import ShardedTraceIndex, open_index
    from glassforge.tokenizer.shards import TokenStream

    build_index(run, tmp_path / "one")
    with RayExecutor() as executor:
        build_index(run, tmp_path / "many", shards=3, executor=executor)
    one, many = open_index(tmp_path / "one"), open_index(tmp_path / "many")
    assert isinstance(many, ShardedTraceIndex) and len(many.shards) == 3
    stream = TokenStream(run, "train")
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = int(rng.integers(len(stream.doc_ids)))
        a, b = int(stream.offsets[d]), int(stream.offsets[d + 1]) - 1  # without its <|endoftext|>
        start = int(rng.integers(a, b))
        query = stream.tokens[start:min(b, start + 24)].tolist() + [int(t) for t in rng.integers(1, 300, 6)]
        assert many.trace_ids(query, min_tokens=3) == one.trace_ids(query, min_tokens=3)


def test_a_ray_address_that_does_not_answer_is_one_line_before_any_work(corpus, tmp_path, capsys):
    pytest.importorskip("ray")
    with pytest.raises(UserError, match=r"Ray cluster at '127\.0\.0\.1:9' does not answer"):
        make_executor("ray", address="127.0.0.1:9")
    with pytest.raises(UserError, match="not host:port"):
        make_executor("ray", address="nowhere")
    from glassforge.cli import main

    run = make_run(tmp_path / "run", corpus)
    t = time.perf_counter()
    assert main(["data", str(run.root), "--executor", "ray", "--address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not answer" in err[0] and time.perf_counter() - t < 10
    assert not run.data_work.root.exists() and not run.documents.exists()
