"""The engine's forward passes: prefill and decode kernels built from the model's weights, and their compiled forms.

`Llama.forward` with a `KVCache` is general (any slots, any positions, any
length); the engine only ever needs two shapes, and on a CPU the per-operation
overhead of a small model dominates, so `FastPath` gives them their own code:
the same arithmetic, fewer and larger operations (tests/test_engine.py checks
its f32 logits and cache writes against the model's forward).

Decode steps are bound by reading the weights and by per-operation overhead at
small batch, so by default their matrices are int8 (per-row scales; activations
int8 too from INT8_ROWS_FROM rows; prefill keeps f32), and the step is compiled
with torch.compile in a background thread while the engine decodes eagerly,
then once more ahead of time (torch.export and AOTInductor: one call into C++
per step; batch 1 first). `BackgroundCompile` runs that and reports how far it
got (`CompileState`, with the reason of a failure beside it).
`GLASSFORGE_DECODE_WEIGHTS=f32|bf16|int8`, `GLASSFORGE_DECODE_COMPILE=0` and
`GLASSFORGE_DECODE_AOT=0` change that (measurements and tolerances in
docs/PERFORMANCE.md, "Serving").

Decode steps run on one intra-op thread by default: on two shared cores a
second thread spent most of each small operation waiting to be scheduled.
`ThreadTuner` measures instead when asked to (GLASSFORGE_DECODE_THREADS=auto).
"""

from __future__ import annotations

import threading
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F

from glassforge.core.errors import UserError
from glassforge.model.llama import KVCache, Llama

AOT_GRAPHS = ("batch 1", "batches", "int8 rows")  # compiled ahead of time in this order (batch 1 matters most)
INT8_ROWS_FROM = 8  # int8 decode steps of at least this many rows use int8 activations too (FastPath._linear_int8_rows)
DEFAULT_DECODE_WEIGHTS = "int8"  # FastPath weights for decode steps; see docs/PERFORMANCE.md for the measurements
# torch.compile and torch.export are not safe to run in two threads at once (two engines compiling together
# failed one time in two with "RuntimeError when making fake tensor call"), so engines in a process take turns
COMPILE_LOCK = threading.Lock()

DECODE_WEIGHTS = ("f32", "bf16", "int8")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row (weight-only): (int8 [N, K], bf16 scales [N]), w ~ q * scale."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


def one_line(e: BaseException) -> str:
    """An exception as its type and the first line of its message (compiler errors run to pages)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def compile_settings() -> None:
    """Dynamo settings for the compiled decode step; call in every thread that compiles or runs it.

    Every FastPath compiles its own entries of the same code object (their guards check `self`), so
    a process with several engines (tests, benchmarks) would pass dynamo's default recompile limit
    of 8. The settings are thread-local in torch 2.13, hence a function and not a module import effect.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


class FastPath:
    """The model's inference arithmetic with fewer, larger operations.

    The model's cached forward is general (any slots, any positions, any
    length); the engine only ever needs two shapes, and on a CPU the
    per-operation overhead of a small model dominates, so they get their own
    code, built from the model's weights (the q, k, v and the gate, up
    matrices concatenated once, here rather than at every call):

    - prefill: one whole prompt into one slot, from position 0 (plain causal
      attention, keys written by slicing), always with the f32 weights;
    - decode: one token for each of the slots 0..S-1 (a view of the cache, no
      gather); free slots in that range ride along as dummy rows.

    Q, K and V are one matmul, gate and up another; the rotary tables are the
    model's own (`rope_cos`, `rope_sin`), with the sine's sign folded in;
    grouped-query attention uses `enable_gqa` instead of copying heads.

    Decode steps read every weight once per step, and at batch 1 that read is
    most of the step, so their matrices can be kept smaller (`weights`):
    "f32" (the model's own, results equal to the reference forward), "bf16"
    (half the bytes, AVX512-bf16 matmuls; activations, norms, the residual
    stream and the cache stay f32) or "int8" (a quarter: symmetric per-row
    int8 through `aten._weight_int8pack_mm`, activations rounded to bf16 for
    the product; from INT8_ROWS_FROM rows, where a step is no longer bound by
    reading the weights, activations rounded to int8 per row and multiplied
    by `torch._int_mm`). Prompts are packed: the prompts admitted together
    share one forward. `compile()` returns the decode step through torch.compile
    (inductor), which fuses the small elementwise operations between matmuls.
    """

    def __init__(self, model: Llama, max_len: int, weights: str = "f32"):
        if weights not in DECODE_WEIGHTS:
            raise UserError(f"decode weights {weights!r}: expected one of {', '.join(DECODE_WEIGHTS)}")
        cfg = model.cfg
        self.cfg = cfg
        self.weights = weights
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                a.o_proj.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                m.down_proj.weight.detach(),
            ))
        self.embed = model.model.embed_tokens.weight.detach()
        self.norm = model.model.norm.weight.detach()
        self.head = model.lm_head.weight.detach()
        self.dtype = self.embed.dtype
        # the decode step's copies of the matrices, in the chosen format (f32: the same tensors)
        self.dec_layers = [(ln1, self._pack(wqkv), self._pack(wo), ln2, self._pack(wgu), self._pack(wdown))
                           for ln1, wqkv, wo, ln2, wgu, wdown in self.layers]
        self.dec_head = self._pack(self.head)
        cos, sin = model.rope_cos[:max_len].float(), model.rope_sin[:max_len].float()
        half = cfg.head_dim // 2
        self.cos = cos.to(self.dtype)
        # rotate-half as a swap of the halves times a signed sine: 3 operations instead of 6
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], -1).to(self.dtype)
        self.q_dim = cfg.n_heads * cfg.head_dim
        self.kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.gqa = cfg.n_heads != cfg.n_kv_heads
        self.kv_heads = torch.arange(cfg.n_kv_heads)
        # int8 weights: from INT8_ROWS_FROM rows on, activations are rounded to int8 as well, where
        # torch._int_mm takes these shapes (it wants K above 16 and K, N multiples of 8)
        self.int8_activations = weights == "int8" and all(
            m.shape[1] > 16 and m.shape[0] % 8 == 0 and m.shape[1] % 8 == 0
            for layer in self.layers for m in (layer[1], layer[2], layer[4], layer[5])) and self.head.shape[0] % 8 == 0
        self.step = self._decode  # replaced by the compiled step once it is ready
        # decode steps compiled ahead of time (compile_aot), by AOT_GRAPHS name, each used once ready
        self.aot: dict[str, Callable] = {}
        self._span_like = torch.empty(max_len + 1, 0)  # their span travels as a size: a slice of this
        self.compile_error: str | None = None  # why the compiled step was dropped, if it was
        self._views: tuple[int, list, list] | None = None

    def _pack(self, w: torch.Tensor):
        if self.weights == "bf16":
            return w.to(torch.bfloat16).contiguous()
        if self.weights == "int8":
            return quantize_int8(w)
        return w

    def _linear(self, x: torch.Tensor, w) -> torch.Tensor:
        """x @ w.T for a decode matrix in the chosen format; f32 in, f32 out."""
        if self.weights == "bf16":
            return F.linear(x.to(torch.bfloat16), w).float()
        if self.weights == "int8":
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w[0], w[1]).float()
        return F.linear(x, w)

    @staticmethod
    def _linear_int8_rows(x: torch.Tensor, w) -> torch.Tensor:
        """x @ w.T for an int8 matrix with x rounded to int8 too, one scale per row (f32 in, f32 out).

        int8 x int8 products with int32 sums (`torch._int_mm`) beat the weight-only kernel from
        about 8 rows (bench/decode_kernels.py: 3.5x its speed at 16 rows); a batch-16 step is 18%
        faster, at twice the logit error (docs/PERFORMANCE.md). K stays far below the 133,000 where
        int32 sums of 127 x 127 could overflow.
        """
        q, scale = w
        x_scale = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        rows = (x / x_scale).round().to(torch.int8)
        return torch._int_mm(rows, q.t()).float() * x_scale * scale.float()

    def _norm(self, x, w):
        if x.dtype == torch.float32:  # one fused operation
            return F.rms_norm(x, (x.shape[-1],), w, self.cfg.norm_eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.norm_eps).to(x.dtype) * w  # as HF does

    @staticmethod
    def _rope(x, cos, signed_sin):
        """Hugging Face's rotary embedding (rotate half) on the last dimension."""
        swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
        return x * cos + swapped * signed_sin

    def _mlp(self, x, w_gu, w_down):
        gate, up = F.linear(x, w_gu).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)

    def prefill(self, ids: list[int], cache: KVCache, slot: int, all_logits: bool) -> torch.Tensor:
        """One prompt into one slot: the logits of its last position, or of every position."""
        return self.prefill_packed([(ids, slot)], cache, all_logits)

    def prefill_packed(self, prompts: list[tuple[list[int], int]], cache: KVCache,
                       all_logits: bool = False, starts: list[int] | None = None) -> torch.Tensor:
        """Several prompts (ids, slot) in one forward: [n prompts, V] logits of their last positions
        (all_logits: [tokens, V] for every position, for a single prompt). starts: where each prompt's
        computing begins (the positions before are in its slot already: the prefix cache, prefix.py);
        0 for all by default.

        Prompts arriving together are packed into one sequence of tokens, so each matmul reads the
        weights once for all of them instead of once per prompt (16 prompts of 35 tokens: about
        6 ms each alone on the reference CPU); attention and the cache writes run prompt by prompt,
        so no prompt sees another's keys.
        """
        cfg, hd = self.cfg, self.cfg.head_dim
        starts = starts or [0] * len(prompts)
        lengths = [len(ids) - start for (ids, _), start in zip(prompts, starts)]  # the positions computed
        offsets = [0]
        for T in lengths:
            offsets.append(offsets[-1] + T)
        N = offsets[-1]
        positions = torch.cat([torch.arange(start, start + T) for start, T in zip(starts, lengths)]) \
            if len(prompts) > 1 or starts[0] else torch.arange(N)
        x = F.embedding(torch.tensor([t for (ids, _), start in zip(prompts, starts) for t in ids[start:]]),
                        self.embed)  # [N, d]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        H, KV = cfg.n_heads, cfg.n_kv_heads
        for i, (ln1, wqkv, wo, ln2, wgu, wdown) in enumerate(self.layers):
            qkv = F.linear(self._norm(x, ln1), wqkv)
            qk = self._rope(qkv[:, :self.q_dim + self.kv_dim].view(N, H + KV, hd), cos, sin)
            v = qkv[:, self.q_dim + self.kv_dim:].view(N, KV, hd)
            ys = []
            for (_, slot), offset, start, T in zip(prompts, offsets, starts, lengths):
                q_p = qk[offset:offset + T, :H].transpose(0, 1)  # [H, T, hd]
                k_p = qk[offset:offset + T, H:].transpose(0, 1)  # [KV, T, hd]
                v_p = v[offset:offset + T].transpose(0, 1)
                cache.k[i, slot, :, start:start + T] = k_p
                cache.v[i, slot, :, start:start + T] = v_p
                if start == 0:
                    y = F.scaled_dot_product_attention(q_p[None], k_p[None], v_p[None], is_causal=True,
                                                       enable_gqa=self.gqa)
                else:  # the new positions attend to the cached ones and, causally, to each other
                    end = start + T
                    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
                    y = F.scaled_dot_product_attention(q_p[None], cache.k[i, slot, :, :end][None],
                                                       cache.v[i, slot, :, :end][None], attn_mask=mask,
                                                       enable_gqa=self.gqa)
                ys.append(y[0].transpose(0, 1).reshape(T, -1))
            x = x + F.linear(ys[0] if len(ys) == 1 else torch.cat(ys), wo)
            x = x + self._mlp(self._norm(x, ln2), wgu, wdown)
        if not all_logits:
            x = x[torch.tensor(offsets[1:]) - 1]
        return F.linear(self._norm(x, self.norm), self.head)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, positions: [S] for slots 0..S-1; returns logits [S, V]."""
        if self._views is None or self._views[0] is not cache:
            # per-layer views made once: the compiled step takes them as plain inputs it writes in place
            self._views = (cache, list(cache.k.unbind(0)), list(cache.v.unbind(0)))
        span = int(positions.max()) + 1
        S = tokens.shape[0]
        aot = self.aot.get(self.aot_graph(S))
        if aot is not None and S < cache.k.shape[1] and span < cache.max_len:  # within the graphs' ranges
            return aot(tokens, positions, self._span_like[:span], *self._views[1], *self._views[2])
        args = (tokens, positions, self._views[1], self._views[2], span, self.int8_rows(S))
        if self.step is self._decode:
            return self._decode(*args)
        try:
            return self.step(*args)
        except Exception as e:  # noqa: BLE001 - a recompile that fails (limit, compiler) must not fail requests
            self.step = self._decode
            self.compile_error = one_line(e)
            return self._decode(*args)

    def aot_graph(self, batch: int) -> str:
        """Which ahead-of-time graph (AOT_GRAPHS) runs a decode step of this many rows."""
        return "batch 1" if batch == 1 else "int8 rows" if self.int8_rows(batch) else "batches"

    def int8_rows(self, batch: int) -> bool:
        """Whether a decode step of this many rows rounds its activations to int8 too (see `_linear`)."""
        return self.int8_activations and batch >= INT8_ROWS_FROM

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, ks: list[torch.Tensor],
                vs: list[torch.Tensor], span: int, int8_rows: bool = False) -> torch.Tensor:
        cfg, hd = self.cfg, self.cfg.head_dim
        S = tokens.shape[0]
        rows = torch.arange(S)[:, None]
        where = (rows, self.kv_heads[None, :], positions[:, None])  # [S, KV] index into [slots, KV, len]
        x = F.embedding(tokens, self.embed)  # [S, d]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        mask = None
        if S > 1:
            mask = (torch.arange(span)[None, :] <= positions[:, None])[:, None, None, :]
        H, KV = cfg.n_heads, cfg.n_kv_heads
        lin = self._linear_int8_rows if int8_rows else self._linear
        for i, (ln1, wqkv, wo, ln2, wgu, wdown) in enumerate(self.dec_layers):
            qkv = lin(self._norm(x, ln1), wqkv)
            qk = self._rope(qkv[:, :self.q_dim + self.kv_dim].view(S, H + KV, hd), cos, sin)
            ks[i].index_put_(where, qk[:, H:])
            vs[i].index_put_(where, qkv[:, self.q_dim + self.kv_dim:].view(S, KV, hd))
            y = F.scaled_dot_product_attention(qk[:, :H, None], ks[i][:S, :, :span], vs[i][:S, :, :span],
                                               attn_mask=mask, enable_gqa=self.gqa)
            x = x + lin(y.reshape(S, -1), wo)
            gate, up = lin(self._norm(x, ln2), wgu).chunk(2, dim=-1)
            x = x + lin(F.silu(gate) * up, wdown)
        return lin(self._norm(x, self.norm), self.dec_head)

    def compile_aot(self, cache: KVCache, threads: int, graph: str) -> Callable:
        """One decode graph (AOT_GRAPHS) compiled ahead of time: torch.export, then AOTInductor to C++.

        A torch.compile'd step pays, on every call, dynamo's frame hook and guards, the autograd
        wrapper and inductor's Python wrapper, which calls the fused C++ kernels one by one: about
        a third of a 0.6 ms batch-1 step here. An AOT step is one call into C++. It also holds the GIL
        for the whole step instead of handing it to the event loop between kernels, and in the
        server that measured better still (docs/PERFORMANCE.md: one stream 1.65x, 4 streams 1.31x).

        The step's arguments are those of `_decode` with the span as the length of a slice of
        `_span_like` (export takes sizes, not ints, as dynamic) and the caches' layers spread out;
        keys and values are written in place, as by the compiled step. Rows and spans are dynamic up
        to one less than the cache's slots and length (a size equal to the whole dimension would be
        specialised), which is why the engine's cache has one slot and one position to spare.
        Compiling takes 15 to 40 s per graph on the reference machine, in the engine's compile thread.
        """
        import tempfile
        import warnings

        # torch.export's own use of a deprecated pytree check warns on every export (torch 2.13); it is
        # not the user's to act on, and would land in the server's terminal
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        fast, n, int8_rows = self, self.cfg.n_layers, graph == "int8 rows"
        lo = {"batch 1": 1, "batches": 2, "int8 rows": INT8_ROWS_FROM}[graph]
        hi = 1 if graph == "batch 1" else cache.k.shape[1] - 1

        class DecodeStep(torch.nn.Module):
            def forward(self, tokens, positions, span_like, *layers):
                return fast._decode(tokens, positions, list(layers[:n]), list(layers[n:]), span_like.shape[0],
                                    int8_rows)

        torch.set_num_threads(threads)
        scratch = KVCache(self.cfg, cache.k.shape[1], cache.max_len, dtype=cache.k.dtype)
        args = (torch.zeros(lo, dtype=torch.long), torch.ones(lo, dtype=torch.long), self._span_like[:2],
                *scratch.k.unbind(0), *scratch.v.unbind(0))
        span = torch.export.Dim("span", min=2, max=cache.max_len - 1)
        rows = None if lo == hi else {0: torch.export.Dim("rows", min=lo, max=hi)}
        with torch.no_grad():
            program = torch.export.export(DecodeStep(), args,
                                          dynamic_shapes=(rows, rows, {0: span}, (None,) * (2 * n)))
            with tempfile.TemporaryDirectory(prefix="glassforge-aot-") as tmp:
                package = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/step.pt2")
                return torch._inductor.aoti_load_package(package)  # loads the library: the folder may go

    def compile(self, cache: KVCache, threads: int, stop: Callable[[], bool] = lambda: False):
        """The decode step through torch.compile, compiled and warmed up on a scratch cache of cache's shape.

        Sizes are dynamic (one graph for batch 1, one for every other batch size and span, and with
        int8 weights one for batches of INT8_ROWS_FROM rows or more), so serving does not recompile;
        a scratch cache because the real one is in use while this runs. The graphs are guarded on
        torch's intra-op thread count, so they are made with the count decode steps run with
        (`threads`); the caller must not change it while this runs. Returns None when stop() turns
        true between the graphs (the engine closed meanwhile).
        """
        compile_settings()
        torch.set_num_threads(threads)
        # Inductor's wrapper checks every input's sizes and strides on each call (78 checks a step here);
        # dynamo's guards already pick the graph by them, and dropping the checks made a batch-1 step 7%
        # faster (docs/PERFORMANCE.md)
        step = torch.compile(self._decode, dynamic=True, fullgraph=True,
                             options={"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False})
        scratch = KVCache(self.cfg, cache.k.shape[1], cache.max_len, dtype=cache.k.dtype)
        ks, vs = list(scratch.k.unbind(0)), list(scratch.v.unbind(0))
        with torch.no_grad():  # as the engine thread runs it: inference-mode tensors would not match the guards
            # the graphs serving uses: batch 1, other batches, and batches that round activations to int8
            for S in sorted({1, 2, INT8_ROWS_FROM if self.int8_activations else 2}):
                if S > scratch.k.shape[1]:
                    break
                if stop():
                    return None
                step(torch.zeros(S, dtype=torch.long), torch.arange(1, S + 1), ks, vs, S + 1, self.int8_rows(S))
        return step


class ThreadTuner:
    """Pick the intra-op thread count for decode steps by measuring, per batch-size bucket.

    On an idle machine two threads read the weights faster than one (about
    15% at batch 1, 40% at batch 16 on the reference machine); on a busy one
    each small operation with two threads waits for a core and a step can be
    ten times slower. So each bucket keeps a moving average of step time per
    option, uses the faster, and now and then tries the other one again, less
    often each time it loses.
    """

    def __init__(self, options: list[int]):
        self.options = options
        self.avg: dict[tuple[int, int], float] = {}
        self.steps: dict[int, int] = {}
        self.next_try: dict[int, int] = {}
        self.interval: dict[int, int] = {}

    def pick(self, batch: int) -> int:
        if len(self.options) == 1:
            return self.options[0]
        b = batch.bit_length()
        n = self.steps[b] = self.steps.get(b, 0) + 1
        untried = [t for t in self.options if (b, t) not in self.avg]
        if untried:
            return untried[0]
        best = min(self.options, key=lambda t: self.avg[(b, t)])
        if n >= self.next_try.get(b, 0):  # explore the other option once
            self.interval[b] = min(self.interval.get(b, 32) * 2, 4096)
            self.next_try[b] = n + self.interval[b]
            return next(t for t in self.options if t != best)
        return best

    def record(self, batch: int, threads: int, seconds: float) -> None:
        if len(self.options) == 1:
            return
        key = (batch.bit_length(), threads)
        old = self.avg.get(key)
        if old is not None and seconds < old and threads != min(self.options, key=lambda t: self.avg.get(
                (key[0], t), float("inf"))):
            self.interval[key[0]] = 32  # the other option got faster: look again sooner
        self.avg[key] = seconds if old is None else 0.8 * old + 0.2 * seconds



class CompileState(str, Enum):
    """How far the background compile of the decode step (or of its ahead-of-time graphs) has got."""

    OFF = "off"  # not asked for, or stopped because the engine closed
    WAITING = "waiting"  # the ahead-of-time graphs wait for the torch.compile step
    COMPILING = "compiling"
    ON = "on"  # decode steps of those sizes run compiled
    FAILED = "failed"  # the reason is beside the state; decode steps keep the step they had

    def __str__(self) -> str:
        return self.value


class BackgroundCompile:
    """Compile the decode step beside the running engine, which decodes eagerly until this is done.

    Compiling takes seconds to tens of seconds (less with inductor's on-disk cache), so it never
    blocks start-up or requests; any failure (no C++ compiler, an unsupported operation) leaves
    the eager step, with the reason in `reason`. After the torch.compile step, the AOT_GRAPHS are
    compiled ahead of time one by one (`aot`, `aot_reason`), each taken by the next decode step of
    its sizes once it is ready. Each swap is one attribute or dict store, which the engine thread
    reads between steps, so no lock is needed.
    """

    def __init__(self, fast: FastPath, cache: KVCache, threads: int, closed: Callable[[], bool],
                 compile_step: bool, ahead_of_time: bool):
        self.fast, self.cache, self.threads, self.closed = fast, cache, threads, closed
        self.state = CompileState.COMPILING if compile_step else CompileState.OFF
        self.reason: str | None = None
        self.aot = CompileState.WAITING if compile_step and ahead_of_time else CompileState.OFF
        self.aot_reason: str | None = None
        # not a daemon: a process that exits while inductor compiles is aborted from C++
        # ("terminate called without an active exception"), so exit waits for the graph being made
        self.thread = threading.Thread(target=self._run, name="glassforge-compile") if compile_step else None

    def start(self) -> None:
        if self.thread is not None:
            self.thread.start()

    def join(self, timeout: float | None = None) -> CompileState:
        """Block until the compile (and the ahead-of-time graphs after it) has finished or timeout."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.state

    def health(self) -> dict[str, str]:
        """The states as /health reports them: "off", "waiting", "compiling", "on" or "failed: why"."""
        def told(state: CompileState, reason: str | None) -> str:
            return f"{state}: {reason}" if state is CompileState.FAILED else str(state)

        return {"decode_compile": told(self.state, self.reason), "decode_aot": told(self.aot, self.aot_reason)}

    def _run(self) -> None:
        try:
            with COMPILE_LOCK:
                step = self.fast.compile(self.cache, self.threads, self.closed)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: keep the eager step
            self.state, self.reason = CompileState.FAILED, one_line(e)
            if self.aot is CompileState.WAITING:  # it waited for this step: it will never start
                self.aot = CompileState.OFF
            return
        if step is None or self.closed():
            self.state = self.aot = CompileState.OFF
            return
        self.fast.step = step  # picked up by the next decode step (one attribute store: atomic)
        self.state = CompileState.ON
        if self.aot is not CompileState.WAITING:
            return
        self.aot = CompileState.COMPILING
        slots = self.cache.k.shape[1]
        for graph in AOT_GRAPHS:
            if (graph == "int8 rows" and not (self.fast.int8_activations and INT8_ROWS_FROM < slots)
                    or graph == "batches" and slots < 3):
                continue  # no batch of that size ever runs
            try:
                with COMPILE_LOCK:
                    aot = self.fast.compile_aot(self.cache, self.threads, graph)
            except Exception as e:  # noqa: BLE001 - any failure keeps the compiled step for those batches
                self.aot, self.aot_reason = CompileState.FAILED, f"{graph}: {one_line(e)}"
                return
            if self.closed():
                self.aot = CompileState.OFF
                return
            self.fast.aot[graph] = aot  # steps of those sizes take it from the next one on (a dict store)
        self.aot = CompileState.ON
