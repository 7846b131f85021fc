"""The trainer's parts, in process and fast: data order, schedules, optimisers,
checkpoint state, logs, the loss's normalisation, and the gpu-small recipe."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from glassforge.core.errors import UserError
from glassforge.core.recipe import ModelConfig, TrainConfig
from glassforge.core.runfolder import latest_weights, list_checkpoints
from glassforge.model.checkpoints import _optimizer_tensors, load_optimizers, prune_checkpoints
from glassforge.model.llama import Llama
from glassforge.train.device import has_cpu_bf16, measured_peak_flops, pick_dtype, should_compile
from glassforge.train.loop import train
from glassforge.train.metrics import read_metrics, truncate_metrics
from glassforge.train.optim import build_optimizers, lr_at, zeropower_newton_schulz
from glassforge.train.order import DataOrder

# --------------------------------------------------------------------------- data order

def test_data_order_is_a_function_of_seed_and_step_only():
    a, b = DataOrder(100, 16, seed=3), DataOrder(100, 16, seed=3)
    assert all((a.global_batch(s) == b.global_batch(s)).all() for s in (0, 5, 6, 40))
    assert (b.global_batch(40) == DataOrder(100, 16, seed=3).global_batch(40)).all()  # no hidden cursor
    assert not (a.global_batch(0) == DataOrder(100, 16, seed=4).global_batch(0)).all()


def test_data_order_visits_every_example_once_per_epoch():
    order = DataOrder(48, 16, seed=0)
    epoch0 = np.concatenate([order.global_batch(s) for s in range(3)])
    epoch1 = np.concatenate([order.global_batch(s) for s in range(3, 6)])
    assert sorted(epoch0) == list(range(48)) and sorted(epoch1) == list(range(48))
    assert not (epoch0 == epoch1).all()  # a fresh permutation each epoch
    crossing = DataOrder(40, 16, seed=0).global_batch(2)  # positions 32..47 span two epochs
    assert len(crossing) == 16 and len(set(crossing[:8])) == 8


# --------------------------------------------------------------------------- schedules

def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert set(lrs[10:80]) == {1e-3}
    assert lrs[90] == pytest.approx(0.5e-3) and lrs[99] == pytest.approx(0.05e-3)


# --------------------------------------------------------------------------- optimisers

def tiny_model(**kw) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                       max_seq_len=32, tie_embeddings=False), **kw}))


def test_adamw_decays_matrices_only():
    model = tiny_model()
    (opt,) = build_optimizers(model, TrainConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")


def test_muon_takes_hidden_matrices_and_orthogonalises():
    model = tiny_model()
    muon, adamw = build_optimizers(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.005))
    assert muon.param_groups[0]["lr"] == 0.005 and adamw.param_groups[0]["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in muon.param_groups[0]["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n}
    adam_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= adam_names
    g = torch.randn(64, 32)
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(zeropower_newton_schulz(g, dtype=dtype).float())
        assert s.min() > 0.5 and s.max() < 1.3  # singular values pushed towards one
    stack = torch.randn(3, 48, 20)  # a stack is orthogonalised matrix by matrix
    together = zeropower_newton_schulz(stack)
    for i in range(3):
        torch.testing.assert_close(together[i], zeropower_newton_schulz(stack[i]), atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError):
        build_optimizers(model, TrainConfig(optimizer="sgd"))


def test_optimiser_state_round_trips_bit_for_bit():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon")
    opts = build_optimizers(model, cfg)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        for o in opts:
            o.step()
            o.zero_grad()
    tensors, meta = _optimizer_tensors(opts)
    fresh = build_optimizers(model, cfg)
    load_optimizers(fresh, tensors, json.loads(json.dumps(meta)))
    again, meta2 = _optimizer_tensors(fresh)
    assert meta2 == json.loads(json.dumps(meta)) and tensors.keys() == again.keys()
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)


# --------------------------------------------------------------------------- switches

def test_compile_switch():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert should_compile(TrainConfig(compile=True), cpu, 0) is True
    assert should_compile(TrainConfig(compile=False), gpu, 1e30) is False
    auto = replace(TrainConfig(), compile="auto")
    assert should_compile(auto, gpu, 1.0)
    assert not should_compile(auto, cpu, 1e12)  # seconds of work: compiling would not pay
    assert should_compile(auto, cpu, 1e15)  # hours of work
    with pytest.raises(UserError):
        should_compile(replace(TrainConfig(), compile="sometimes"), cpu, 0)


def test_dtype_choice():
    assert pick_dtype(TrainConfig(dtype="fp32"), torch.device("cpu")) == torch.float32
    assert pick_dtype(TrainConfig(dtype="bf16"), torch.device("cpu")) == torch.bfloat16
    expected = torch.bfloat16 if has_cpu_bf16() else torch.float32
    assert pick_dtype(TrainConfig(dtype="auto"), torch.device("cpu")) == expected
    with pytest.raises(UserError):
        pick_dtype(TrainConfig(dtype="fp8"), torch.device("cpu"))


# --------------------------------------------------------------------------- logs and checkpoints

def test_metrics_rewind_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 8))
    truncate_metrics(path, 5)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert path.read_text().endswith("}\n")


def test_prune_keeps_last_k_and_every_nth(tmp_path):
    for step in range(2, 21, 2):
        d = tmp_path / "checkpoints" / f"step_{step:07d}"
        d.mkdir(parents=True)
        (d / "trainer.json").write_text("{}")
    (tmp_path / "checkpoints" / ".step_0000022.abc.tmp").mkdir()  # an interrupted write
    prune_checkpoints(tmp_path, keep_last=2, keep_every=8)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 16, 18, 20]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[0] == "step_0000008"


# --------------------------------------------------------------------------- the loop, in process

class Rows:
    """SFT-shaped examples: padded rows whose targets are -100 outside a random span."""

    bytes_per_token = 3.0

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = np.random.default_rng(seed)
        self.x = g.integers(0, vocab, (n, seq_len))
        self.y = g.integers(0, vocab, (n, seq_len))
        for row, start in zip(self.y, g.integers(0, seq_len - 1, n)):
            row[:start] = -100

    def __len__(self):
        return len(self.x)

    def batch(self, indices):
        return torch.from_numpy(self.x[indices]), torch.from_numpy(self.y[indices])


def run_in_process(tmp_path: Path, name: str, **kw):
    cfg = TrainConfig(**{**dict(steps=3, seq_len=16, batch_tokens=128, micro_batch=8, lr=1e-2, warmup_steps=1,
                                eval_every=2, eval_batches=1, checkpoint_every=2, dtype="fp32", threads=1), **kw})
    model_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    threads = torch.get_num_threads()
    try:
        result = train(model_cfg, Rows(40, 16, 64), Rows(8, 16, 64, seed=1), cfg, tmp_path / name, seed=5,
                         recipe_hash="h")
    finally:
        torch.set_num_threads(threads)
    return result, read_metrics(tmp_path / name / "metrics.jsonl"), model_cfg, cfg


def test_loss_is_per_target_token_of_the_global_batch_whatever_the_accumulation(tmp_path):
    whole, m_whole, model_cfg, cfg = run_in_process(tmp_path, "whole", micro_batch=8)
    split, m_split, _, _ = run_in_process(tmp_path, "split", micro_batch=2)
    # Step 1 by hand: the initial model on the first global batch, summed loss / target count.
    torch.manual_seed(5)
    model = Llama(model_cfg)
    x, y = Rows(40, 16, 64).batch(DataOrder(40, 8, 5).global_batch(0))
    with torch.no_grad():
        _, total = model(x, y, reduction="sum")
    assert m_whole[0]["loss"] == pytest.approx(float(total) / int((y != -100).sum()), rel=1e-5)
    # Adam divides by the gradient's own scale, so weights would magnify last-bit differences
    # in near-zero gradients; the loss and the gradient norm are the honest comparison.
    for a, b in zip(m_whole, m_split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_logs_checkpoints_and_plot(tmp_path):
    result, rows, _, _ = run_in_process(tmp_path, "run", optimizer="muon", schedule="wsd")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= rows[0].keys()
    assert "val_loss" in rows[1] and "val_bpb" in rows[2] and "val_loss" not in rows[0]
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    meta = json.loads((result.checkpoint / "trainer.json").read_text())
    assert meta["step"] == 3 and meta["data_cursor"]["step"] == 3 and meta["recipe_hash"] == "h"
    assert {"torch", "python", "numpy"} <= meta["rng"].keys()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert latest_weights(tmp_path / "run") == result.checkpoint / "model.safetensors"
    # Finished: a second call resumes at the end and trains nothing.
    again, rows2, _, _ = run_in_process(tmp_path, "run", optimizer="muon", schedule="wsd")
    assert rows2 == rows and again.final_loss == pytest.approx(result.final_loss)
    with pytest.raises(UserError, match="another recipe"):
        train(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16),
                Rows(40, 16, 64), None, TrainConfig(steps=3, seq_len=16, batch_tokens=128, micro_batch=8),
                tmp_path / "run", seed=5, recipe_hash="other")


def test_bad_batch_shapes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="batch_tokens"):
        run_in_process(tmp_path, "bad", batch_tokens=100)
    with pytest.raises(UserError, match="micro_batch"):
        run_in_process(tmp_path, "bad", batch_tokens=16 * 6, micro_batch=4)


# --------------------------------------------------------------------------- the gpu-small recipe

def test_gpu_small_recipe_is_about_100m_parameters_and_consistent():
    from glassforge.core.recipe import load_recipe
    from glassforge.model.llama import flops_per_token

    r = load_recipe("gpu-small")
    with torch.device("meta"):  # shapes only: no 400 MB of random numbers
        params = sum(p.numel() for p in Llama(r.model).parameters())
    assert 80e6 <= params <= 130e6
    p = r.pretrain
    assert p.batch_tokens % (p.seq_len * p.micro_batch) == 0 and p.seq_len <= r.model.max_seq_len
    assert p.dtype in ("auto", "bf16") and r.model.n_heads % r.model.n_kv_heads == 0
    assert {s.kind for s in r.data.sources} <= {"files", "hf"}
    assert p.steps * p.batch_tokens >= 20 * params * 0.5  # at least half of a Chinchilla budget
    assert flops_per_token(r.model, p.seq_len) > 6 * params * 0.9


def test_peak_probe_only_rises_when_refreshed():
    first = measured_peak_flops(torch.device("cpu"), torch.float32)
    assert first > 1e9  # any CPU that runs the tests multiplies faster than a GFLOP/s
    assert measured_peak_flops(torch.device("cpu"), torch.float32) == first  # cached, not re-measured
    assert measured_peak_flops(torch.device("cpu"), torch.float32, refresh=True) >= first
