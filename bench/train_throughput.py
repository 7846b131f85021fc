"""Training throughput: glassforge's Llama against Hugging Face `LlamaForCausalLM`.

For each width (d_model 256, 512, 768 by default) both models get the same
shape, batch, precision (bf16 autocast where the hardware has it) and
optimiser (AdamW, decay on matrices only, the trainer's `build_optimizers`),
and run full training steps: forward, loss, backward, clipping, optimiser
step. We report steady-state tokens/s and MFU, where MFU is measured against
this machine's bf16 matmul peak, which this script measures itself on a 2048^2
product, at the start and once per round, keeping the best (a busy neighbour
can only lower it, which would flatter MFU; the best is the conservative one).
Models take turns, one step each per round, so a neighbour's load falls on all
of them alike; we report the median step and the fastest (least disturbed) one.

glassforge runs as the trainer runs it (torch.compile per `--compile`, with
deterministic kernels, `train.device.deterministic`); HF runs eager, the way
`Trainer` runs it by default. Compile time is reported separately: it is paid
once per run and counts on short runs. `--deterministic both` adds compiled
glassforge without deterministic kernels, side by side in the same rounds:
what determinism costs.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --sizes 256 --vocab 4096 --batch 16 --no-hf --deterministic both
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from glassforge.core.recipe import ModelConfig
from glassforge.model.llama import Llama, flops_per_token
from glassforge.core.recipe import TrainConfig
from glassforge.train.device import deterministic, pick_dtype
from glassforge.train.loop import autocast
from glassforge.train.optim import build_optimizers


def matmul_peak(dtype: torch.dtype, n: int = 2048, tries: int = 5, reps: int = 4) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type",
                                                                          "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def make_step(model, forward, opts, x, y, dtype, clip=1.0, exact: bool = False):
    device = torch.device("cpu")

    def step():
        with deterministic() if exact else nullcontext():
            with autocast(device, dtype):
                loss = forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,512,768")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed rounds: one step of each model per round (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", default="on", choices=["on", "off", "both"],
                   help="glassforge with torch.compile, without, or both")
    p.add_argument("--deterministic", default="on", choices=["on", "off", "both"],
                   help="compiled glassforge with deterministic kernels (as the trainer runs), without, or both")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    tcfg = TrainConfig(dtype=args.dtype)
    dtype = pick_dtype(tcfg, torch.device("cpu"))
    peak = matmul_peak(dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}; "
          f"measured matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    rows = []
    for d in [int(s) for s in args.sizes.split(",")]:
        cfg = ModelConfig(vocab_size=args.vocab, d_model=d, n_layers=args.layers, n_heads=d // 64,
                          n_kv_heads=d // 64, max_seq_len=args.seq, tie_embeddings=False)
        x = torch.randint(0, args.vocab, (args.batch, args.seq))
        y = torch.randint(0, args.vocab, (args.batch, args.seq))
        flops_tok = flops_per_token(cfg, args.seq)
        tokens = args.batch * args.seq
        variants = []
        if not args.no_hf:
            variants.append(("HF LlamaForCausalLM", "hf", False, False))
        if args.compile in ("off", "both"):
            variants.append(("glassforge eager", "gf", False, args.deterministic != "off"))
        if args.compile in ("on", "both"):
            if args.deterministic in ("on", "both"):
                variants.append(("glassforge compiled", "gf", True, True))
            if args.deterministic in ("off", "both"):
                variants.append(("glassforge compiled, not deterministic", "gf", True, False))
        runners = []
        for name, kind, compiled, exact in variants:
            torch.manual_seed(0)
            if kind == "hf":
                model = hf_model(cfg).train()

                def forward(x, y, model=model):
                    return model(input_ids=x, labels=y, shift_labels=y).loss
            else:
                model = Llama(cfg).train()
                if compiled:
                    model.compile_for_training()  # as the trainer compiles: by regions

                def forward(x, y, model=model):
                    return model(x, y)[1]
            opts = build_optimizers(model, tcfg)
            step = make_step(model, forward, opts, x, y, dtype, exact=exact)
            t = time.perf_counter()
            for _ in range(args.warmup):
                step()
            runners.append((name, model, step, time.perf_counter() - t, []))
        # Round robin, one step of each model per round, with a peak measurement
        # in every round: a neighbour's load then slows every contender alike.
        for _ in range(args.steps):
            peak = max(peak, matmul_peak(dtype, tries=1))
            for name, model, step, _, times in runners:
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
        for name, model, step, warm, times in runners:
            tok_s = tokens / statistics.median(times)
            row = {"d_model": d, "model": name, "params": sum(p.numel() for p in model.parameters()),
                   "tokens_per_s": round(tok_s, 1), "best_tokens_per_s": round(tokens / min(times), 1), "flops_per_token": flops_tok, "mfu": round(tok_s * flops_tok / peak, 4),
                   "warmup_s": round(warm, 1), "step_s": [round(t, 3) for t in times]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del runners
    for r in rows:  # against the best peak seen in the whole run: the conservative MFU
        r["mfu"] = round(r["tokens_per_s"] * r["flops_per_token"] / peak, 4)
    print(f"\n| d_model | model | params | tokens/s (median) | MFU (median) | tokens/s (best) | MFU (best) | "
          f"warm-up s ({args.warmup} steps) | vs HF (median) | vs HF (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf = next((h for h in rows if h["d_model"] == r["d_model"] and h["model"].startswith("HF")), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        best_ratio = f"{r['best_tokens_per_s'] / hf['best_tokens_per_s']:.2f}x" if hf else "-"
        best_mfu = r["best_tokens_per_s"] * r["flops_per_token"] / peak
        print(f"| {r['d_model']} | {r['model']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['best_tokens_per_s']:,.0f} | {best_mfu:.1%} | {r['warmup_s']} | {ratio} | "
              f"{best_ratio} |")
    print(f"\nshape: {args.layers} layers, head_dim 64, vocab {args.vocab}, untied; batch {args.batch} x "
          f"seq {args.seq}; peak {peak / 1e12:.3f} TFLOP/s ({dtype})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
