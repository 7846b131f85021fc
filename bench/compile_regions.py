"""Compiling by regions against compiling the whole model: cold compile time and step time.

The trainer compiles each decoder layer and the output head with its loss
(`Llama.compile_for_training`); the usual alternative is `torch.compile(model)`.
Both are timed as a default build meets them: in one process, pretraining's
shape (16 rows of 256 tokens, causal) and then fine-tuning's (32 packed rows
of 128), two micro-batches a step, bf16 autocast, deterministic kernels, from a
cold inductor cache (a fresh `TORCHINDUCTOR_CACHE_DIR` per process).

Each variant runs once cold in its own process, first: its first step is the
compile. That process then also compiles the other variant (on a cache the
first has warmed, so that compile is not reported) and times steady steps of
both, one of each per round, so a neighbour's load falls on both alike.
Printed: the cold first steps, the steady medians of both processes, ratios.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/compile_regions.py
    .venv/bin/python bench/compile_regions.py --rounds 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"pretraining": (16, 256, False), "fine-tuning": (32, 128, True)}  # rows, tokens, packed


def child(first: str, rounds: int) -> dict:
    import torch

    from glassforge.core.recipe import load_recipe
    from glassforge.model.llama import Llama
    from glassforge.train.device import deterministic, pick_dtype
    from glassforge.train.loop import autocast

    cfg = load_recipe("default").model
    device = torch.device("cpu")
    dtype = pick_dtype(load_recipe("default").pretrain, device)
    out = {"first": first, "cold_first_step_s": {}, "steady_s": {}}
    for shape, (rows, tokens, packed) in SHAPES.items():
        torch._dynamo.reset()  # as the trainer does before each compiled stage
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (rows, tokens), generator=g) for _ in range(2)]
        kw = {"segments": (torch.arange(tokens) // 72).expand(rows, tokens).contiguous()} if packed else {}
        models = {}
        for variant in (first, "whole" if first == "regions" else "regions"):
            torch.manual_seed(0)
            model = Llama(cfg).train()
            if variant == "regions":
                model.compile_for_training()
                models[variant] = (model, model)
            else:
                models[variant] = (model, torch.compile(model))

        def step(variant):
            model, forward = models[variant]
            t = time.perf_counter()
            for x in batches:
                with autocast(device, dtype):
                    _, loss = forward(x, x, reduction="sum", **kw)
                loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        with deterministic():
            out["cold_first_step_s"][shape] = round(step(first), 2)
            step("whole" if first == "regions" else "regions")  # its compile, on a warmed cache: not reported
            times = {v: [] for v in models}
            for _ in range(rounds):
                for v in models:
                    times[v].append(step(v))
        out["steady_s"][shape] = {v: round(statistics.median(t[1:]), 4) for v, t in times.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="steady rounds per shape (one step of each variant)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return 0
    results = {}
    for first in ("whole", "regions"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            done = subprocess.run([sys.executable, __file__, "--child", first, "--rounds", str(args.rounds)],
                                  env=env, capture_output=True, text=True, check=True)
            results[first] = json.loads(done.stdout.strip().splitlines()[-1])
    print("cold compile (first step, fresh inductor cache; pretraining then fine-tuning in one process):")
    for shape in SHAPES:
        w, r = results["whole"]["cold_first_step_s"][shape], results["regions"]["cold_first_step_s"][shape]
        print(f"  {shape:12s} whole model {w:6.1f} s   by regions {r:6.1f} s   whole/regions {w / r:.2f}x")
    whole = sum(results["whole"]["cold_first_step_s"].values())
    regions = sum(results["regions"]["cold_first_step_s"].values())
    print(f"  {'both':12s} whole model {whole:6.1f} s   by regions {regions:6.1f} s   whole/regions "
          f"{whole / regions:.2f}x")
    print("steady step (forward and backward of two micro-batches), medians, interleaved in each process:")
    for shape in SHAPES:
        for first, res in results.items():
            s = res["steady_s"][shape]
            print(f"  {shape:12s} (process cold on {first:7s}) whole {s['whole']:.3f} s   regions "
                  f"{s['regions']:.3f} s   whole/regions {s['whole'] / s['regions']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
