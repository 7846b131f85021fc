"""A compiled training step's forward and backward at the default shape, attention through PyTorch's SDPA
against explicit scores (model/llama.py, `explicit_attention`), side by side in one process.

For each row length it times one step of 4,096 tokens (rows of T tokens,
packed two to four conversations a row or plainly causal), alternating the two
kernels step by step, and prints the medians and their ratio. This is what
set `EXPLICIT_ATTENTION_MAX_T`: on a CPU, SDPA's flash kernel spends most of a
short row's step in its backward.

    .venv/bin/python bench/attention_kernels.py --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import glassforge.model.llama as llama  # noqa: E402
from glassforge.core.recipe import load_recipe  # noqa: E402
from glassforge.train.device import deterministic  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "src/glassforge/core/recipes/default.toml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per kernel and shape (after two warm-ups)")
    p.add_argument("--lengths", default="128,256,512", help="row lengths, comma-separated")
    args = p.parse_args()
    torch._dynamo.config.automatic_dynamic_shapes = False  # each shape its own static kernels, as a stage's
    torch._dynamo.config.cache_size_limit = 64
    cfg = load_recipe(RECIPE).model
    torch.manual_seed(0)
    model = llama.Llama(cfg)
    model.compile_for_training()  # as the trainer compiles: by regions
    step = model
    cases = []
    for T in (int(t) for t in args.lengths.split(",")):
        B = 4096 // T
        x, y = torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))
        cases.append((f"{T} tokens, packed", x, y, (torch.arange(T) // 75).expand(B, T).contiguous()))
        cases.append((f"{T} tokens, causal", x, y, None))
    kernels = {"sdpa": 0, "explicit": 10**9}  # EXPLICIT_ATTENTION_MAX_T for each (dynamo guards on it)
    times: dict = {}
    with deterministic():
        for rep in range(args.steps + 2):
            for label, x, y, segments in cases:
                for kernel, max_t in kernels.items():
                    llama.EXPLICIT_ATTENTION_MAX_T = max_t
                    t = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        _, loss = step(x, y, reduction="sum", segments=segments)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                    if rep >= 2:
                        times.setdefault(label, {}).setdefault(kernel, []).append(time.perf_counter() - t)
    print(f"{'rows (4,096 tokens a step)':<28} {'sdpa':>9} {'explicit':>9} {'sdpa / explicit':>16}")
    for label, by_kernel in times.items():
        a, b = (statistics.median(by_kernel[k]) * 1000 for k in ("sdpa", "explicit"))
        print(f"{label:<28} {a:>7.0f} ms {b:>6.0f} ms {a / b:>15.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
