"""The trainer shared by `pretrain` and `sft`: fast, resumable bit for bit, distributed.

Data order is a pure function of (seed, global step): step s trains on the
examples at positions [s*B, (s+1)*B) of a sequence of per-epoch permutations
seeded by (seed, epoch). Each process takes its contiguous slice of that global
batch and splits it into micro-batches, so world size and accumulation change
how the work is divided, never which examples a step sees.

Losses are summed per token and divided by the number of target tokens in the
whole global batch, so a step's gradient is the same whether one process
accumulates or several share the work (DDP averages over ranks; we scale by
the world size to undo that average).

Checkpoints hold weights and optimiser state in safetensors and the step, RNG
states, data cursor and recipe hash in JSON; each is a folder written under a
temporary name and renamed into place, so a kill at any moment leaves the
previous checkpoint intact. Training resumes from the newest complete one.

Launch with `torchrun --nproc_per_node N -m glassforge pretrain RUN` for DDP
(gloo on CPU, nccl on GPU), or FSDP2 (`fully_shard`, per layer) with
`fsdp = true`; only rank 0 writes checkpoints and logs.

Bit-identical results need the same recipe, data, software, hardware, world
size and thread count: floating-point sums are not associative, so a change in
how a reduction is split changes the last bits (never which data a step sees).
`replay()` re-runs one interval between kept checkpoints and compares hashes.

Speed: bf16 autocast where the hardware has it (GPUs, CPUs with AMX or
AVX512-bf16); `torch.compile` when it pays (see `should_compile`); the loop does
no per-token Python work: a batch is a handful of numpy slices.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from glassforge.core.errors import UserError
from glassforge.core.recipe import ModelConfig, TrainConfig
from glassforge.core.runfolder import (
    LOSS_PLOT,
    METRICS,
    TRAINER,
    checkpoint_dir,
    list_checkpoints,
)
from glassforge.model.checkpoints import (
    checkpoint_hashes,
    find_resume,
    full_tensor,
    load_optimizers,
    log_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
    truncate_checkpoint_log,
)
from glassforge.model.hf import load_weights
from glassforge.model.llama import Llama, flops_per_token
from glassforge.train.device import (
    all_reduce,
    barrier,
    cpu_threads,
    deterministic,
    init_distributed,
    measured_peak_flops,
    pick_dtype,
    should_compile,
)
from glassforge.train.metrics import plot_metrics, truncate_metrics
from glassforge.train.optim import Muon, build_optimizers, lr_at
from glassforge.train.order import DataOrder, Examples, Windows


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    val_loss: float | None
    val_bpb: float | None
    seconds: float
    checkpoint: Path


@torch.no_grad()
def evaluate(model: Llama, data: Examples, cfg: TrainConfig, device, dtype) -> tuple[float, float]:
    """Mean loss per target token on the first eval_batches micro-batches, and bits per byte."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(len(data), cfg.eval_batches * cfg.micro_batch)
    for start in range(0, n, cfg.micro_batch):
        x, y, *extra = data.batch(np.arange(start, min(n, start + cfg.micro_batch)))
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), reduction="sum", **_model_kwargs(extra, device))
        total += float(loss)
        count += int((y != -100).sum())
    model.train(was_training)
    mean = total / max(1, count)
    return mean, mean / math.log(2) / data.bytes_per_token


def _model_kwargs(extra: list[dict], device) -> dict:
    """The model's keyword arguments from a batch's extras: packed rows' segments (RL's weights are the loss's)."""
    return {"segments": extra[0]["segments"].to(device)} if extra and "segments" in extra[0] else {}


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _target_count(data: Examples, rows: np.ndarray, seq_len: int) -> int:
    """Target tokens (not -100) in a global batch: the loss's denominator on every rank."""
    if isinstance(data, Windows):
        return len(rows) * seq_len
    count = getattr(data, "target_count", None)
    if count is not None:
        return int(count(rows))
    _, y, *_ = data.batch(rows)
    return int((y != -100).sum())


def train(
    model_cfg: ModelConfig,
    train_set: Examples,
    val_set: Examples | None,
    cfg: TrainConfig,
    out: Path,
    seed: int,
    recipe_hash: str,
    init_weights: Path | None = None,
    label: str = "train",
    *,
    stop_step: int | None = None,
    on_checkpoint: Callable[[int, Path], bool] | None = None,
) -> TrainResult:
    """Train from scratch (or from init_weights), resuming from out/checkpoints if any.

    stop_step: stop (with a checkpoint) after this step instead of cfg.steps, the schedule
    unchanged; `replay` uses it to re-run one interval between kept checkpoints.
    on_checkpoint(step, folder): called after each checkpoint is written; returning False stops the
    run there (a replay stops at the first checkpoint that differs from the attested one).
    """
    out = Path(out)
    dist_info, device = init_distributed()
    if device.type == "cpu":
        # Each process gets its share of the cores; oversubscription slows everyone.
        # A replay sets cfg.threads to the count the run recorded: it fixes how reductions are split, and with
        # it the bits, whatever cores the replaying machine has.
        torch.set_num_threads(cfg.threads or max(1, cpu_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    seq_len = cfg.seq_len
    global_rows = cfg.batch_tokens // seq_len
    per_rank = global_rows // dist_info.world
    micro = min(per_rank, cfg.micro_batch)
    if (global_rows < 1 or cfg.batch_tokens % seq_len or global_rows % dist_info.world or per_rank < 1
            or per_rank % micro):
        raise UserError(f"{label}.batch_tokens={cfg.batch_tokens} must be a multiple of seq_len ({seq_len}) x "
                        f"world size ({dist_info.world}) x micro_batch ({cfg.micro_batch})")
    last_step = cfg.steps if stop_step is None else min(stop_step, cfg.steps)
    dtype = pick_dtype(cfg, device)
    if cfg.fsdp and cfg.optimizer == "muon":
        raise UserError(f"{label}: optimizer = \"muon\" needs whole matrices; it does not combine with fsdp = true")

    # The initial weights are a function of the seed alone (or come from init_weights).
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model = Llama(model_cfg)
    resume = find_resume(out, recipe_hash, verbose=dist_info.main)
    if resume is not None:
        model.load_hf_state_dict(resume["weights"])
    elif init_weights is not None:
        load_weights(init_weights, model)
    model.to(device)
    train_model: torch.nn.Module = model
    if dist_info.world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one all-gather per layer, freed after use
            fully_shard(layer)
        fully_shard(model)
    opts = build_optimizers(model, cfg, dtype)
    start_step, resumed = 0, None
    if resume is not None:
        load_optimizers(opts, resume["optimizer"], resume["meta"]["optimizers"])
        set_rng_state(resume["meta"]["rng"])
        start_step, resumed = resume["step"], resume["meta"]
        del resume
    if dist_info.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    flops_tok = flops_per_token(model_cfg, seq_len)
    tokens_per_step = global_rows * seq_len
    # Decided on the whole run's work, not what is left of it: a resumed run or a replay must
    # compile exactly when the original did, or its bits would differ.
    compiled = should_compile(cfg, device, flops_tok * tokens_per_step * cfg.steps)
    if compiled:
        # Forget what this process compiled before (another stage's shapes would make dynamo recompile
        # this one with dynamic shapes): a stage compiles the same kernels whether it runs after other
        # stages, as in a build, or alone, as in a replay of one interval.
        torch._dynamo.reset()
        model.compile_for_training()

    metrics_path = out / METRICS
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start_step)
        truncate_checkpoint_log(out, start_step)
    order = DataOrder(len(train_set), global_rows, seed)
    peak = measured_peak_flops(device, dtype) * dist_info.world
    env = {"world_size": dist_info.world, "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
           "compile": compiled, "torch": torch.__version__, "device": device.type}
    bar = tqdm(total=last_step, initial=start_step, desc=label, unit="step", disable=not dist_info.main,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    loss_value = float(resumed["loss"]) if resumed and "loss" in resumed else float("nan")
    val_loss, val_bpb = None, None
    last_ckpt = checkpoint_dir(out, start_step) if resumed else None
    model.train()
    # RL: a source whose examples the model itself makes at each step (train/rl.py), and what it reports of them
    prepare, step_stats = getattr(train_set, "prepare", None), getattr(train_set, "step_stats", None)
    if prepare is not None and cfg.fsdp:
        raise UserError(f"{label}: rollouts generate with whole weights; fsdp = true is not supported with them")
    if hasattr(train_set, "resume"):
        train_set.resume(start_step)  # its own log, rewound to the checkpoint like metrics.jsonl
    metrics_file = open(metrics_path, "a", encoding="utf-8") if dist_info.main else None
    stopped = False  # by on_checkpoint
    done = start_step
    try:
        # one code path, compiled or not: deterministic kernels (see train.device.deterministic)
        with deterministic():
            for step in range(start_step, last_step):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for opt in opts:
                    scale = cfg.muon_lr / cfg.lr if isinstance(opt, Muon) else 1.0  # Muon follows the same schedule
                    for g in opt.param_groups:
                        g["lr"] = lr * scale
                rows = order.global_batch(step)
                mine = rows[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
                if prepare is not None:  # examples the model being trained makes (RL rollouts), for this rank's rows
                    model.eval()
                    with torch.no_grad():
                        local_targets = prepare(step, model, mine, fixed_shape=compiled)
                    model.train()
                    n_targets = max(1, int(all_reduce(torch.tensor(float(local_targets), device=device), dist_info)))
                else:
                    n_targets = max(1, _target_count(train_set, rows, seq_len))
                chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
                loss_sum = torch.zeros((), device=device)
                for i, chunk in enumerate(chunks):
                    x, y, *extra = train_set.batch(chunk)
                    kw = _model_kwargs(extra, device)
                    extra = extra[0] if extra else {}
                    last_micro = i == len(chunks) - 1
                    sync = nullcontext()
                    if dist_info.world > 1 and not last_micro:  # reduce gradients once, after the last micro-batch
                        if cfg.fsdp:
                            model.set_requires_gradient_sync(False)
                        else:
                            sync = train_model.no_sync()
                    elif dist_info.world > 1 and cfg.fsdp:
                        model.set_requires_gradient_sync(True)
                    with sync:
                        with autocast(device, dtype):
                            if "weights" in extra:  # a weight per target token (RL's advantages): their weighted sum
                                _, losses = train_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                                    reduction="none", **kw)
                                loss = (losses * extra["weights"].to(device).reshape(-1)).sum()
                            else:
                                _, loss = train_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                                  reduction="sum", **kw)
                        # Sum over the global batch / its target count; x world undoes the ranks' average.
                        (loss * (dist_info.world / n_targets)).backward()
                    loss_sum += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                for opt in opts:
                    opt.step()
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss_value = float(all_reduce(loss_sum, dist_info)) / n_targets
                if not math.isfinite(loss_value):
                    raise UserError(f"{label}: loss became {loss_value} at step {step + 1}; lower {label}.lr")
                dt = time.perf_counter() - t0
                tok_s = tokens_per_step / dt
                mfu = tok_s * flops_tok / peak
                done = step + 1
                record = {"step": done, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(float(full_tensor(grad_norm)), 6),
                          "tokens": done * tokens_per_step, "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 4),
                          **(step_stats() if step_stats is not None else {})}
                if val_set is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                    val_loss, val_bpb = evaluate(model, val_set, cfg, device, dtype)
                    record.update(val_loss=round(val_loss, 6), val_bpb=round(val_bpb, 6))
                    peak = measured_peak_flops(device, dtype, refresh=True) * dist_info.world
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                bar.update(1)
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if done % cfg.checkpoint_every == 0 or done == last_step:
                    if metrics_file:
                        os.fsync(metrics_file.fileno())  # the log is never behind the checkpoint it describes
                    last_ckpt = save_checkpoint(out, done, model, opts, {
                        "recipe_hash": recipe_hash, "seed": seed, "label": label,
                        "data_cursor": {"step": done, "examples": done * global_rows},
                        "tokens": done * tokens_per_step, "loss": loss_value, "env": env}, dist_info.main)
                    if dist_info.main:
                        log_checkpoint(out, done, last_ckpt)
                        prune_checkpoints(out, cfg.keep_last, cfg.keep_every)
                    barrier(dist_info)
                    if on_checkpoint is not None and not on_checkpoint(done, last_ckpt):
                        stopped = True
                        break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if last_ckpt is None:
        last_ckpt = list_checkpoints(out)[-1][1]
    if dist_info.main and stop_step is None and not stopped:
        plot_metrics(metrics_path, out / LOSS_PLOT, title=label)
    if dist_info.started_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return TrainResult(done, done * tokens_per_step, loss_value, val_loss, val_bpb,
                       time.perf_counter() - t_start, last_ckpt)


def retrain(model_cfg: ModelConfig, train_set: Examples, cfg: TrainConfig, seed: int, recipe_hash: str,
            to_step: int, *, start: Path | None = None, init_weights: Path | None = None,
            on_checkpoint: Callable[[int, Path], bool] | None = None, workdir: Path | None = None,
            label: str = "replay") -> dict[int, dict]:
    """Re-train into a scratch folder from `start` up to to_step, with the schedule of cfg.steps.

    start: a checkpoint folder to resume from; None starts at step 0 (the seed's initial weights, or
    init_weights for fine-tuning). on_checkpoint(step, folder) sees each checkpoint while it exists
    and may stop the run (see `train`). Returns the hashes of every checkpoint written, by step.
    Bit-identical to the original on the same platform, thread count, dtype and compile decision.
    """
    import tempfile

    written: dict[int, dict] = {}

    def seen(step: int, folder: Path) -> bool:
        written[step] = checkpoint_hashes(folder)
        return on_checkpoint(step, folder) if on_checkpoint is not None else True

    with tempfile.TemporaryDirectory(prefix="glassforge-replay-", dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        if start is not None:
            step = int(json.loads((Path(start) / TRAINER).read_text())["step"])
            shutil.copytree(start, checkpoint_dir(tmp, step))
        train(model_cfg, train_set, None, cfg, tmp, seed, recipe_hash,
              init_weights=None if start is not None else init_weights, label=label, stop_step=to_step,
              on_checkpoint=seen)
    return written


def replay(out: Path, model_cfg: ModelConfig, train_set: Examples, cfg: TrainConfig, seed: int,
           recipe_hash: str, from_step: int, to_step: int, init_weights: Path | None = None,
           workdir: Path | None = None) -> dict:
    """Re-run steps from_step..to_step of the training in `out` and compare with its kept checkpoint.

    Starts from out/checkpoints/step_{from_step} (from_step 0: from the seed's initial weights,
    or init_weights for fine-tuning) and returns {"from_step", "to_step", "model_sha256",
    "optimizer_sha256", "expected_model_sha256", "expected_optimizer_sha256", "match"}; the expected
    values are None where `out` kept no checkpoint at to_step.
    """
    kept = dict(list_checkpoints(Path(out)))
    if from_step and from_step not in kept:
        raise UserError(f"{out}: no checkpoint at step {from_step} (kept: {sorted(kept) or 'none'})")
    if not from_step < to_step <= cfg.steps:
        raise UserError(f"replay: need 0 <= from_step < to_step <= steps ({cfg.steps}); got {from_step}, {to_step}")
    written = retrain(model_cfg, train_set, cfg, seed, recipe_hash, to_step, start=kept.get(from_step),
                      init_weights=init_weights, workdir=workdir)
    got = written[max(written)]
    want = checkpoint_hashes(kept[to_step]) if to_step in kept else {}
    pair = ("model_sha256", "optimizer_sha256")
    return {"from_step": from_step, "to_step": to_step,
            "model_sha256": got["model_sha256"], "optimizer_sha256": got["optimizer_sha256"],
            "expected_model_sha256": want.get("model_sha256"),
            "expected_optimizer_sha256": want.get("optimizer_sha256"),
            "match": bool(want) and all(got[k] == want[k] for k in pair)}
