"""The matrix products of one decode step, timed with each CPU kernel torch offers for them.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/decode_kernels.py [--rows 1,16] [--threads 1]

A decode step of the `default` shape (d_model 256, 4 layers, 4096-token
vocabulary) multiplies its activations by 17 matrices: per layer q/k/v
(512x256), output (256x256), gate/up (1536x256) and down (256x768), then the
head (4096x256). At batch 1 those products are most of the step, so the choice
of weight format and kernel sets the pace. For each format this times all 17
products back to back (median of 300 passes, weights hot in cache as they are
while serving) at each row count:

- int8 `aten._weight_int8pack_mm` (the engine's default: int8 weights, one
  scale per row, bf16 activations);
- int8 `torch._int_mm` (int8 weights and activations, int32 result; the
  activations' quantisation is left out of the time, so this is its best case);
- int8 fbgemm dynamic quantised linear (`torch.ao` dynamic `Linear`);
- int8 as an inductor-generated reduction (`(w.float() * x).sum(-1) * scale`
  under torch.compile), at one row only;
- bf16 `F.linear` (oneDNN, AVX512-bf16) and f32 `F.linear`.

Prints microseconds per pass and each against the engine's default.
"""

from __future__ import annotations

import argparse
import time
import warnings
from statistics import median

SHAPES = [(512, 256), (256, 256), (1536, 256), (256, 768)] * 4 + [(4096, 256)]


def timed(fn, passes: int = 300) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,16", help="batch sizes (rows of activations), comma-separated")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (the engine decodes on 1)")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from glassforge.serve.fastpath import compile_settings, quantize_int8

    warnings.filterwarnings("ignore")  # torch.ao's quantised tensors are deprecated; still the fbgemm path
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    compile_settings()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for o, i in SHAPES]
    packed = [quantize_int8(w) for w in weights]
    as_bf16 = [w.to(torch.bfloat16) for w in weights]
    int8_cols = [q.t().contiguous().t() for q, _ in packed]  # _int_mm wants the weight column-major

    dynamic = None
    if "fbgemm" in torch.backends.quantized.supported_engines:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        torch.backends.quantized.engine = "fbgemm"
        dynamic = []
        for w in weights:
            m = DynamicLinear(w.shape[1], w.shape[0], bias_=False)
            scale = w.abs().amax(1) / 127
            m.set_weight_bias(torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0,
                                                         torch.qint8), None)
            dynamic.append(m)

    def reduction(xs, qs, scales):
        return [(q.float() * x).sum(-1) * s.float() for x, q, s in zip(xs, qs, scales)]

    compiled_reduction = torch.compile(reduction, fullgraph=True)

    print(f"17 products of a default-shape decode step, {args.threads} thread(s), microseconds per pass")
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        xs_bf16 = [x.to(torch.bfloat16) for x in xs]
        xs_int8 = [(x / (x.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8) for x in xs]
        results = {
            "int8 _weight_int8pack_mm (default)": timed(lambda: [
                torch.ops.aten._weight_int8pack_mm(x, q, s) for x, (q, s) in zip(xs_bf16, packed)]),
        }
        try:
            results["int8 torch._int_mm"] = timed(lambda: [torch._int_mm(x, w.t()) for x, w in zip(xs_int8, int8_cols)])
        except RuntimeError as e:
            print(f"  torch._int_mm at {rows} rows: {str(e).splitlines()[0]}")
        if dynamic is not None:
            results["int8 fbgemm dynamic linear"] = timed(lambda: [m(x) for m, x in zip(dynamic, xs)])
        if rows == 1:
            qs, scales = [q for q, _ in packed], [s for _, s in packed]
            results["int8 inductor reduction"] = timed(lambda: compiled_reduction(xs, qs, scales))
        results["bf16 F.linear"] = timed(lambda: [F.linear(x, w) for x, w in zip(xs_bf16, as_bf16)])
        results["f32 F.linear"] = timed(lambda: [F.linear(x, w) for x, w in zip(xs, weights)])
        base = results["int8 _weight_int8pack_mm (default)"]
        print(f"{rows} row(s):")
        for name, us in results.items():
            print(f"  {name:<38} {us:9.1f}  {base / us:5.2f}x the default's speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
