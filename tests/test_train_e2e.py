"""The trainer end to end, through `python -m glassforge pretrain` and `torchrun`.

- kill -9 at three random moments, resuming each time: final weights bit-identical
  to an uninterrupted run's;
- a checkpoint write killed half way: the previous checkpoint stays usable and the
  resumed run still ends bit-identical;
- 2 gloo processes vs 1 process with twice the accumulation: the same losses;
- replay of one interval between kept checkpoints reproduces its hashes.

One small run folder (data, tokenizer and shards of three stdlib modules) is
built once; every training is a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RECIPE = """
name = "trainer-test"
seed = 7

[data]
val_fraction = 0.1

[[data.sources]]
name = "pystdlib"
kind = "pystdlib"
license = "PSF-2.0"
modules = ["json", "textwrap", "string"]

[tokenizer]
vocab_size = 512

[model]
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 64

[pretrain]
steps = {steps}
seq_len = 64
batch_tokens = 1024
micro_batch = {micro_batch}
lr = 3e-3
warmup_steps = 3
eval_every = 10
eval_batches = 2
checkpoint_every = {checkpoint_every}
keep_last = 2
keep_every = {keep_every}
dtype = "{dtype}"
threads = {threads}
compile = "{compile}"

[sft]
enabled = false

[eval]
enabled = false
"""


def write_recipe(run: Path, steps=40, micro_batch=4, checkpoint_every=3, keep_every=0, dtype="auto", threads=1,
                 compile="off") -> None:
    from glassforge.core.recipe import dump_recipe, parse_recipe

    text = RECIPE.format(steps=steps, micro_batch=micro_batch, checkpoint_every=checkpoint_every,
                         keep_every=keep_every, dtype=dtype, threads=threads, compile=compile)
    (run / "recipe.toml").write_text(dump_recipe(parse_recipe(text.encode(), "test")))


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    """A run folder with token shards and no training yet."""
    from glassforge.build import run_stage
    from glassforge.core.runfolder import Run

    run = Run.create(tmp_path_factory.mktemp("trainer") / "run")
    write_recipe(run.root)
    for stage in ("data", "tokenizer", "shards"):
        run_stage(run, stage)
    return run.root


STEPS, EVERY, KEEP_EVERY = 30, 3, 6


@pytest.fixture(scope="module")
def reference(data_run, tmp_path_factory) -> Path:
    """An uninterrupted run, trained in this process (same thread count as the subprocesses)."""
    import torch

    from glassforge.train.pretrain import run_pretrain
    from glassforge.core.runfolder import Run

    run = fresh_run(data_run, tmp_path_factory.mktemp("reference") / "run", steps=STEPS,
                    checkpoint_every=EVERY, keep_every=KEEP_EVERY)
    threads = torch.get_num_threads()
    try:
        run_pretrain(Run.open(run))
    finally:
        torch.set_num_threads(threads)
    return run


def fresh_run(data_run: Path, dest: Path, **recipe) -> Path:
    shutil.copytree(data_run, dest, ignore=shutil.ignore_patterns("pretrain"))
    write_recipe(dest, **recipe)
    return dest


def env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def pretrain_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "glassforge", "pretrain", str(run)]


def final_sha(run: Path, steps: int) -> str:
    from glassforge.core.hashing import sha256_file

    return sha256_file(run / "pretrain" / "checkpoints" / f"step_{steps:07d}" / "model.safetensors")


def checkpoint_log(run: Path) -> list[dict]:
    from glassforge.model.checkpoints import read_checkpoint_log

    return read_checkpoint_log(run / "pretrain")


def kill_at_step(run: Path, step: int, extra_env: dict | None = None) -> int:
    """Start pretraining, SIGKILL it once metrics.jsonl reaches `step`; the last step logged."""
    metrics = run / "pretrain" / "metrics.jsonl"
    proc = subprocess.Popen(pretrain_cmd(run), env={**env(), **(extra_env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before step {step}: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    from glassforge.train.metrics import read_metrics

    return read_metrics(metrics)[-1]["step"]


def test_kill9_three_times_resumes_bit_identical(data_run, reference, tmp_path):
    run = fresh_run(data_run, tmp_path / "killed", steps=STEPS, checkpoint_every=EVERY, keep_every=KEEP_EVERY)
    rng = random.Random()  # truly random kill points; printed so a failure can be replayed
    kill_steps = sorted(rng.sample(range(2, STEPS - 6), 3))
    print("kill steps", kill_steps)
    reached = 0
    for target in kill_steps:
        reached = kill_at_step(run, max(target, reached + 1))
    subprocess.run(pretrain_cmd(run), env=env(), check=True, capture_output=True)

    assert final_sha(run, STEPS) == final_sha(reference, STEPS)
    from glassforge.train.metrics import read_metrics

    rows = read_metrics(run / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the log was rewound, not duplicated
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(reference / "pretrain" / "metrics.jsonl")]
    # every checkpoint ever written is logged once, with the uninterrupted run's hashes (pruned ones included)
    assert checkpoint_log(run) == checkpoint_log(reference)
    assert [e["step"] for e in checkpoint_log(run)] == list(range(EVERY, STEPS + 1, EVERY))


# Compiled training, as the default recipe runs it, on two threads: inductor's CPU kernels split their
# work by thread, and its embedding backward added rows with atomic adds whose order changed run to run.
COMPILED = {"compile": "on", "threads": 2, "steps": 8, "checkpoint_every": 4, "keep_every": 4}


def test_compiled_training_gives_the_same_bits_twice(data_run, tmp_path):
    runs = [fresh_run(data_run, tmp_path / f"compiled{i}", **COMPILED) for i in range(2)]
    for run in runs:
        subprocess.run(pretrain_cmd(run), env=env(), check=True, capture_output=True)
    first, second = checkpoint_log(runs[0]), checkpoint_log(runs[1])
    assert [e["step"] for e in first] == [4, 8]
    assert [(e["model_sha256"], e["optimizer_sha256"]) for e in first] == \
        [(e["model_sha256"], e["optimizer_sha256"]) for e in second]
    meta = json.loads((runs[0] / "pretrain" / "checkpoints" / "step_0000008" / "trainer.json").read_text())
    assert meta["env"]["compile"] is True and meta["env"]["threads"] == 2


def test_compiled_kill9_resume_is_bit_identical(data_run, tmp_path):
    reference = fresh_run(data_run, tmp_path / "compiled_reference", **COMPILED)
    subprocess.run(pretrain_cmd(reference), env=env(), check=True, capture_output=True)
    run = fresh_run(data_run, tmp_path / "compiled_killed", **COMPILED)
    assert kill_at_step(run, 6) < 8  # after the step-4 checkpoint, before the end
    subprocess.run(pretrain_cmd(run), env=env(), check=True, capture_output=True)
    assert final_sha(run, 8) == final_sha(reference, 8)
    assert checkpoint_log(run) == checkpoint_log(reference)


def test_checkpoint_write_killed_half_way_keeps_previous(data_run, reference, tmp_path):
    """SIGKILL inside save_checkpoint, after the weights are written and before trainer.json."""
    run = fresh_run(data_run, tmp_path / "interrupted", steps=STEPS, checkpoint_every=EVERY, keep_every=KEEP_EVERY)
    # Kill the process from inside the second checkpoint's write (step 6), half way through.
    script = (
        "import os, signal, sys\n"
        "import glassforge.model.checkpoints as t\n"
        "real = t.atomic_write_json\n"
        "def dying(path, obj):\n"
        "    if obj.get('step') == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, obj)\n"
        "t.atomic_write_json = dying\n"
        "from glassforge.cli import main\n"
        f"main(['pretrain', {str(run)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    from glassforge.core.runfolder import list_checkpoints

    ckpt_dir = run / "pretrain" / "checkpoints"
    half_written = [p for p in ckpt_dir.iterdir() if p.name.startswith(".step_0000006")]
    assert half_written and (half_written[0] / "model.safetensors").is_file()
    assert [s for s, _ in list_checkpoints(run / "pretrain")] == [3]  # ... is not taken for a checkpoint

    subprocess.run(pretrain_cmd(run), env=env(), check=True, capture_output=True)
    assert final_sha(run, STEPS) == final_sha(reference, STEPS)
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # the debris was cleared


@pytest.fixture(scope="module")
def single(data_run, tmp_path_factory) -> Path:
    """6 steps in one process, fp32, 16 rows a step in micro-batches of 4: 4 accumulated."""
    run = fresh_run(data_run, tmp_path_factory.mktemp("single") / "run", steps=6, dtype="fp32")
    subprocess.run(pretrain_cmd(run), env=env(), check=True, capture_output=True)
    return run


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_with_double_accumulation(data_run, single, sharding, tmp_path):
    """Two gloo processes, each accumulating 2 micro-batches, against one accumulating 4."""
    import torch
    from safetensors.torch import load_file

    from glassforge.model.llama import Llama
    from glassforge.core.recipe import load_recipe
    from glassforge.train.metrics import read_metrics

    steps = 6
    double = fresh_run(data_run, tmp_path / "double", steps=steps, dtype="fp32")
    if sharding == "fsdp":
        (double / "recipe.toml").write_text((double / "recipe.toml").read_text().replace("fsdp = false", "fsdp = true"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + (os.getpid() + len(sharding)) % 1000), "-m", "glassforge", "pretrain", str(double)]
    proc = subprocess.run(torchrun, env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    one = read_metrics(single / "pretrain" / "metrics.jsonl")
    two = read_metrics(double / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, steps + 1))  # rank 0 alone writes the log
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-6)  # the same examples in step 1
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)

    cfg = load_recipe(single / "recipe.toml").model
    weights = []
    for run in (single, double):  # whole tensors on disk, even when training held shards
        model = Llama(cfg)
        model.load_hf_state_dict(load_file(run / "pretrain" / "checkpoints" / f"step_{steps:07d}" / "model.safetensors"))
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
        assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))[0]).all()
    assert torch.allclose(weights[0], weights[1], atol=1e-4)


def test_replay_reproduces_a_kept_interval(reference):
    from glassforge.train.pretrain import replay_pretrain
    from glassforge.core.runfolder import Run
    from glassforge.core.runfolder import list_checkpoints

    assert [s for s, _ in list_checkpoints(reference / "pretrain")] == [6, 12, 18, 24, 27, 30]
    result = replay_pretrain(Run.open(reference), 6, 12)
    assert result["match"], result
    assert result["model_sha256"] == final_sha(reference, 12)
    assert replay_pretrain(Run.open(reference), 0, 6)["match"]  # from the seed's initial weights
    partial = replay_pretrain(Run.open(reference), 27, 29)  # no kept checkpoint at 29: nothing to compare
    assert partial["expected_model_sha256"] is None and not partial["match"]


def test_a_stage_reports_its_whole_time_not_its_entrys_own(tmp_path, monkeypatch):
    """An entry's own "seconds" (a trainer's: its steps only) must not replace the stage's whole time."""
    import time

    from glassforge import build
    from glassforge.core.runfolder import Run

    run = Run.create(tmp_path / "run")
    write_recipe(run.root)

    def slow_data(run):
        time.sleep(0.3)
        return {"seconds": 0.01}

    monkeypatch.setitem(build.ENTRIES, "data", slow_data)
    result = build.run_stage(run, "data")
    assert result["seconds"] >= 0.3
    assert run.read_state()["data"]["seconds"] == result["seconds"]
