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
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from glassforge.errors import UserError
from glassforge.model import Llama, ModelConfig, flops_per_token
from glassforge.recipe import TrainConfig
from glassforge.runfolder import AtomicFile, atomic_write_dir, atomic_write_json

CKPT_RE = re.compile(r"^step_(\d{7})$")


class Examples(Protocol):
    """A training set the trainer can index: rows of inputs and targets (-100 = no loss)."""

    bytes_per_token: float

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class Windows:
    """Non-overlapping windows of seq_len + 1 tokens over a memory-mapped token stream."""

    def __init__(self, stream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self.bytes_per_token = stream.bytes_per_token
        self.n = (len(stream.tokens) - 1) // seq_len
        if self.n < 1:
            raise UserError(f"token stream of {len(stream.tokens)} tokens is shorter than seq_len={seq_len}")

    def __len__(self) -> int:
        return self.n

    def batch(self, indices):
        # One gather from the memory map for the whole batch: no Python loop over rows or tokens.
        T = self.seq_len
        positions = np.asarray(indices, dtype=np.int64)[:, None] * T + np.arange(T + 1)
        rows = torch.from_numpy(self.stream.tokens[positions].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


# --------------------------------------------------------------------------- data order

class DataOrder:
    """Which examples global step s uses: a function of (seed, step) alone."""

    def __init__(self, n_examples: int, global_batch: int, seed: int):
        self.n, self.B, self.seed = n_examples, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.B, (step + 1) * self.B)
        out = np.empty(len(positions), dtype=np.int64)
        epochs = positions // self.n
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[positions[sel] % self.n]
        return out


# --------------------------------------------------------------------------- schedule and optimiser

def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * frac
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def zeropower_newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to G, by a quintic Newton-Schulz iteration (Muon).

    G is one matrix or a stack of same-shape matrices (..., m, n), each
    orthogonalised on its own. The iteration only has to land near orthogonal,
    so it runs in the training precision: bf16 roughly halves its cost where
    bf16 matmuls are fast (docs/PERFORMANCE.md, "Muon").
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalised updates, for the hidden weight matrices only."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.dtype = dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            # Matrices of one shape (the same projection in every layer) are
            # orthogonalised as one stack: a few batched products instead of
            # many small ones, whose per-call overhead dominated on CPU.
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            for (rows, cols), items in by_shape.items():
                updates = zeropower_newton_schulz(torch.stack([u for _, u in items]), dtype=self.dtype)
                scale = max(1.0, rows / cols) ** 0.5
                for (p, _), update in zip(items, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig,
                     dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """AdamW with decay on matrices only; with optimizer="muon", Muon takes the hidden matrices.

    dtype is the training precision; Muon's orthogonalisation runs in it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.dim() >= 2]
    vectors = [p for n, p in named if p.dim() < 2]
    adam_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # Fused (one kernel for every tensor) where this torch has it, else foreach; never the per-tensor loop.
    fused = {"fused": True} if hasattr(torch, "_fused_adamw_") else {"foreach": True}
    if cfg.optimizer == "adamw":
        groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, **adam_kw, **fused)]
    if cfg.optimizer == "muon":
        hidden = [p for n, p in named if p.dim() >= 2 and ".layers." in f".{n}"]
        hidden_ids = {id(p) for p in hidden}
        rest_matrices = [p for p in matrices if id(p) not in hidden_ids]
        groups = [{"params": rest_matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return [Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, dtype=dtype),
                torch.optim.AdamW(groups, **adam_kw, **fused)]
    raise UserError(f"pretrain.optimizer: unknown '{cfg.optimizer}' (known: adamw, muon)")


# --------------------------------------------------------------------------- hardware

def has_cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "fp32":
        return torch.float32
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype != "auto":
        raise UserError(f"dtype: unknown '{cfg.dtype}' (known: auto, bf16, fp32)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if has_cpu_bf16() else torch.float32


# On CPU, inductor spends about a minute compiling a small Llama (forward and backward)
# on a cold cache and then runs a step 1.1-1.4x faster (docs/PERFORMANCE.md): it pays
# only once the eager run would take many minutes. The estimate is from the config
# alone (FLOPs at a pessimistic 0.1 TFLOP/s, about half what eager reaches), so the
# choice, and with it the bits, is reproducible.
COMPILE_PAYS_AFTER_S = 600.0
CPU_EAGER_FLOPS_ESTIMATE = 1e11


def should_compile(cfg: TrainConfig, device: torch.device, run_flops: float) -> bool:
    """cfg.compile: true/"on", false/"off", or "auto": on GPUs always, on CPUs for long runs."""
    choice = cfg.compile
    if isinstance(choice, bool):
        return choice
    if choice in ("on", "true"):
        return True
    if choice in ("off", "false"):
        return False
    if choice != "auto":
        raise UserError(f"compile: unknown '{choice}' (known: auto, on, off)")
    if device.type == "cuda":
        return True
    return run_flops / CPU_EAGER_FLOPS_ESTIMATE > COMPILE_PAYS_AFTER_S


_PEAK_CACHE: dict[tuple, float] = {}


def measured_peak_flops(device: torch.device, dtype: torch.dtype, refresh: bool = False) -> float:
    """This machine's matmul FLOP/s for dtype (MFU's denominator): the best rate seen in this process.

    Best of a few square products, quick enough for every run's start-up. A
    probe that a neighbour's job or a compile thread slowed reads low and would
    put MFU above 100%, so the trainer probes again (refresh=True) at every
    validation and the denominator only ever rises. bench/train_throughput.py
    measures the peak more carefully for reported figures."""
    key = (device.type, dtype)
    if key not in _PEAK_CACHE or refresh:
        n = 2048 if device.type == "cpu" else 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        best = _PEAK_CACHE.get(key, 0.0)
        for _ in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        _PEAK_CACHE[key] = best
    return _PEAK_CACHE[key]


# --------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Dist, torch.device]:
    """torchrun's environment to a process group: nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, started), device


def _all_reduce(t: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _barrier(dist_info: Dist) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it); others as they are."""
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else t).detach().cpu().contiguous()


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from disk, sharded like `param` when param is an FSDP2 DTensor."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None or value.dim() == 0:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), mesh, param.placements)


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- checkpoints

def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    ckpts = []
    if (folder / "checkpoints").is_dir():
        for p in (folder / "checkpoints").iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / "trainer.json").is_file():
                ckpts.append((int(m.group(1)), p))
    return sorted(ckpts)


def _optimizer_tensors(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    """Optimiser state as flat safetensors entries `opt{k}.{param index}.{name}` plus JSON metadata.

    Every rank must call this under FSDP (whole tensors are gathered)."""
    tensors, meta = {}, []
    for k, opt in enumerate(opts):
        sd = opt.state_dict()
        for pid, state in sd["state"].items():
            for name, value in state.items():
                t = _full(value) if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt{k}.{pid}.{name}"] = t.reshape(-1) if t.dim() == 0 else t
        meta.append({"param_groups": sd["param_groups"],
                     "scalars": sorted(f"{pid}.{n}" for pid, s in sd["state"].items() for n, v in s.items()
                                       if not torch.is_tensor(v) or v.dim() == 0)})
    return tensors, meta


def _load_optimizers(opts, tensors: dict[str, torch.Tensor], meta: list) -> None:
    for k, opt in enumerate(opts):
        scalars = set(meta[k]["scalars"])
        params = [p for g in opt.param_groups for p in g["params"]]
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            prefix, pid, name = key.split(".", 2)
            if prefix != f"opt{k}":
                continue
            state.setdefault(int(pid), {})[name] = (t.reshape(()) if f"{pid}.{name}" in scalars
                                                    else _like(t, params[int(pid)]))
        opt.load_state_dict({"state": state, "param_groups": meta[k]["param_groups"]})


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _model_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict, whole (gathered from FSDP shards; every rank must call it)."""
    sd = {k: _full(v) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(folder: Path, step: int, model: Llama, opts, meta: dict, dist_info: Dist | None = None) -> Path:
    """Write checkpoints/step_NNNNNNN atomically; under torchrun every rank calls it, rank 0 writes."""
    from safetensors.torch import save_file

    dist_info = dist_info or Dist()
    final = folder / "checkpoints" / f"step_{step:07d}"
    weights = _model_tensors(model)
    opt_tensors, opt_meta = _optimizer_tensors(opts)
    if dist_info.main:
        def fill(tmp: Path):
            save_file(weights, tmp / "model.safetensors")
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            # trainer.json last: a folder without it is never taken for a checkpoint.
            atomic_write_json(tmp / "trainer.json", {**meta, "step": step, "optimizers": opt_meta,
                                                     "rng": rng_state()})

        atomic_write_dir(final, fill)
    return final


def prune_checkpoints(folder: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest keep_last checkpoints and every keep_every-th; clear interrupted writes."""
    ckpts = list_checkpoints(folder)
    keep = {s for s, _ in ckpts[-max(1, keep_last):]}
    if keep_every:
        keep |= {s for s, _ in ckpts if s % keep_every == 0}
    for s, p in ckpts:
        if s not in keep:
            # Rename first: a kill during rmtree must not leave a half-deleted folder that
            # still looks like a checkpoint.
            doomed = p.with_name(f".{p.name}.deleting")
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for stale in (folder / "checkpoints").glob(".step_*"):  # temp folders of an interrupted write
        shutil.rmtree(stale, ignore_errors=True)


def load_weights(path: Path, model: Llama) -> None:
    from safetensors.torch import load_file

    model.load_hf_state_dict(load_file(path))


def _find_resume(out: Path, recipe_hash: str, dist_info: Dist) -> dict | None:
    """The newest checkpoint that loads: its trainer.json, weights and optimiser tensors."""
    from safetensors.torch import load_file

    for step, path in reversed(list_checkpoints(out)):
        try:
            meta = json.loads((path / "trainer.json").read_text())
            state = {"step": step, "path": path, "meta": meta, "weights": load_file(path / "model.safetensors"),
                     "optimizer": load_file(path / "optimizer.safetensors")}
        except (OSError, ValueError) as e:  # damaged on disk (a full disk, a bad copy): try the one before
            if dist_info.main:
                print(f"[train] {path}: unreadable ({e}); trying an older checkpoint", flush=True)
            continue
        if meta.get("recipe_hash") != recipe_hash:
            raise UserError(f"{path}: checkpoint was made with another recipe or data; remove {out} to start over")
        return state
    return None


# --------------------------------------------------------------------------- the loop

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
        x, y = data.batch(np.arange(start, min(n, start + cfg.micro_batch)))
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), reduction="sum")
        total += float(loss)
        count += int((y != -100).sum())
    model.train(was_training)
    mean = total / max(1, count)
    return mean, mean / math.log(2) / data.bytes_per_token


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
    _, y = data.batch(rows)
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
) -> TrainResult:
    """Train from scratch (or from init_weights), resuming from out/checkpoints if any.

    stop_step: stop (with a checkpoint) after this step instead of cfg.steps, the schedule
    unchanged; `replay` uses it to re-run one interval between kept checkpoints.
    """
    out = Path(out)
    dist_info, device = init_distributed()
    if device.type == "cpu":
        # Each process gets its share of the cores; oversubscription slows everyone.
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
    resume = _find_resume(out, recipe_hash, dist_info)
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
        _load_optimizers(opts, resume["optimizer"], resume["meta"]["optimizers"])
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
    step_fn = torch.compile(train_model) if compiled else train_model

    metrics_path = out / "metrics.jsonl"
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_step)
    order = DataOrder(len(train_set), global_rows, seed)
    peak = measured_peak_flops(device, dtype) * dist_info.world
    env = {"world_size": dist_info.world, "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
           "compile": compiled, "torch": torch.__version__, "device": device.type}
    bar = tqdm(total=last_step, initial=start_step, desc=label, unit="step", disable=not dist_info.main,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    loss_value = float(resumed["loss"]) if resumed and "loss" in resumed else float("nan")
    val_loss, val_bpb = None, None
    last_ckpt = out / "checkpoints" / f"step_{start_step:07d}" if resumed else None
    model.train()
    metrics_file = open(metrics_path, "a", encoding="utf-8") if dist_info.main else None
    try:
        for step in range(start_step, last_step):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for opt in opts:
                scale = cfg.muon_lr / cfg.lr if isinstance(opt, Muon) else 1.0  # Muon follows the same schedule
                for g in opt.param_groups:
                    g["lr"] = lr * scale
            rows = order.global_batch(step)
            n_targets = max(1, _target_count(train_set, rows, seq_len))
            mine = rows[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
            chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
            loss_sum = torch.zeros((), device=device)
            for i, chunk in enumerate(chunks):
                x, y = train_set.batch(chunk)
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
                        _, loss = step_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                          reduction="sum")
                    # Sum over the global batch / its target count; x world undoes the ranks' average.
                    (loss * (dist_info.world / n_targets)).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            for opt in opts:
                opt.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss_value = float(_all_reduce(loss_sum, dist_info)) / n_targets
            if not math.isfinite(loss_value):
                raise UserError(f"{label}: loss became {loss_value} at step {step + 1}; lower {label}.lr")
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt
            mfu = tok_s * flops_tok / peak
            done = step + 1
            record = {"step": done, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(float(_full(grad_norm)), 6),
                      "tokens": done * tokens_per_step, "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 4)}
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
                    "tokens": done * tokens_per_step, "loss": loss_value, "env": env}, dist_info)
                if dist_info.main:
                    prune_checkpoints(out, cfg.keep_last, cfg.keep_every)
                _barrier(dist_info)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if last_ckpt is None:
        last_ckpt = list_checkpoints(out)[-1][1]
    if dist_info.main and stop_step is None:
        plot_metrics(metrics_path, out / "loss.png", title=label)
    if dist_info.started_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return TrainResult(last_step, last_step * tokens_per_step, loss_value, val_loss, val_bpb,
                       time.perf_counter() - t_start, last_ckpt)


# --------------------------------------------------------------------------- replay

def replay(out: Path, model_cfg: ModelConfig, train_set: Examples, cfg: TrainConfig, seed: int,
           recipe_hash: str, from_step: int, to_step: int, init_weights: Path | None = None,
           workdir: Path | None = None) -> dict:
    """Re-run steps from_step..to_step of the training in `out` and compare with its kept checkpoint.

    Starts from out/checkpoints/step_{from_step} (from_step 0: from the seed's initial weights,
    or init_weights for fine-tuning), trains to to_step in a scratch folder with the same
    schedule, and returns {"from_step", "to_step", "model_sha256", "optimizer_sha256",
    "expected_model_sha256", "expected_optimizer_sha256", "match"}; the expected values are
    None where `out` kept no checkpoint at to_step. Bit-identical on the same hardware, software,
    world size and thread count.
    """
    import tempfile

    from glassforge.runfolder import sha256_file

    kept = dict(list_checkpoints(Path(out)))
    if from_step and from_step not in kept:
        raise UserError(f"{out}: no checkpoint at step {from_step} (kept: {sorted(kept) or 'none'})")
    if not from_step < to_step <= cfg.steps:
        raise UserError(f"replay: need 0 <= from_step < to_step <= steps ({cfg.steps}); got {from_step}, {to_step}")
    with tempfile.TemporaryDirectory(prefix="glassforge-replay-", dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        if from_step:
            shutil.copytree(kept[from_step], tmp / "checkpoints" / kept[from_step].name)
        result = train(model_cfg, train_set, None, cfg, tmp, seed, recipe_hash,
                       init_weights=None if from_step else init_weights, label="replay", stop_step=to_step)
        got = {name: sha256_file(result.checkpoint / f"{name}.safetensors") for name in ("model", "optimizer")}
    want = {name: sha256_file(kept[to_step] / f"{name}.safetensors") if to_step in kept else None
            for name in ("model", "optimizer")}
    return {"from_step": from_step, "to_step": to_step,
            "model_sha256": got["model"], "optimizer_sha256": got["optimizer"],
            "expected_model_sha256": want["model"], "expected_optimizer_sha256": want["optimizer"],
            "match": want["model"] is not None and got == want}


# --------------------------------------------------------------------------- logs

def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again),
    and a last line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    with AtomicFile(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """loss.png: training and validation loss, learning rate and throughput against step."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows], label="train", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        axes[0].plot(*zip(*val), "o-", label="validation", ms=3)
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title=f"{title} loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows])
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    axes[2].plot(steps, [r["tokens_per_s"] for r in rows], lw=1)
    axes[2].set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    with AtomicFile(out_png) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return out_png


def latest_weights(folder: Path) -> Path:
    ckpts = list_checkpoints(folder)
    if not ckpts:
        raise UserError(f"{folder}: no checkpoint")
    return ckpts[-1][1] / "model.safetensors"
