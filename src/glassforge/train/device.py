"""Where training runs: processes (torchrun), threads, precision and whether to compile.

Every choice here is made from the recipe and the machine before the first
step and recorded in each checkpoint's trainer.json (`env`), because bit-for-bit
replay needs the same ones: the same world size, thread count, dtype and
compile decision give the same reductions in the same order.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from glassforge.core.errors import UserError
from glassforge.core.recipe import TrainConfig


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
        # its own generator: drawing from the global one would move the RNG state a checkpoint saves, so a
        # resumed run (which probes again at start) would save other bits than an uninterrupted one
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
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


def all_reduce(t: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(dist_info: Dist) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1



@contextmanager
def deterministic():
    """Deterministic kernels for the block: the same inputs, threads and platform give the same bits.

    torch.compile's CPU code for the embedding's backward adds each token's
    gradient into its row with parallel atomic adds, so the order of the float
    additions (and the last bits of the sum) changed from run to run: two
    compiled trainings of the default recipe gave different weights after a
    few steps, and so did a kill -9 resume. With deterministic algorithms on,
    inductor lowers that scatter-add (and every other index_put with
    accumulate) to aten's sorted, deterministic kernel instead; the cost is
    measured in docs/PERFORMANCE.md ("Deterministic compiled training").
    Uninitialised memory is not filled with NaN (torch's default in this
    mode): nothing here reads memory it did not write, and the fill costs a
    pass over every new tensor. On CUDA, cuBLAS needs a fixed workspace to be
    deterministic, which must be set before its first call.
    """
    import torch.utils.deterministic as det

    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]
