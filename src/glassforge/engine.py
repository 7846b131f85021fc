"""The inference engine behind `glassforge serve` and `glassforge chat`.

One background thread owns the model and a `KVCache` with one slot per running
sequence (`max_batch` slots of `max_context` positions). It loops:

1. drop sequences whose client went away (their slot is free at once);
2. admit waiting sequences into free slots and prefill each prompt in one
   forward pass (the `n` choices of one prompt share a prefill: the cache rows
   are copied, not recomputed);
3. run one decode step for every running sequence together: one forward pass
   over `[B, 1]` tokens, each at its own position in its own slot.

So requests that arrive while others decode join between two steps
(continuous batching) and never wait for a whole batch to finish. Only one
thread touches torch, which keeps the two CPU cores to one set of matmuls at a
time; other work that needs the model (embeddings) is queued to that thread too.

Sampling is batched over rows with per-row parameters. Randomness comes from
one `torch.Generator` per sequence (seeded from the request's seed and the
choice index), drawn as exponential noise over the vocabulary: the token is
`argmax(p / E)`, which is exactly a draw from `p` and keeps each sequence's
draws independent of what else shares its batch, so a seed reproduces its
output. Log-probabilities are those of the model (raw logits), as OpenAI and
vLLM report them; penalties, bias, temperature, top-k and top-p change only
what is sampled.

Text is decoded incrementally (a window of ids re-decoded so that multi-byte
characters split across tokens are never emitted half-way) and stop strings
are matched on the text, so a stop that spans tokens is found, cut from the
output, and any text that could still be the start of a stop string is held
back until it is known not to be one: nothing of a stop ever leaks into a
stream.

`response_format` JSON is constrained decoding with llguidance (imported only
when asked for): each step, tokens that cannot continue a valid prefix are
masked out before sampling, and the sequence stops when the grammar is done.

The forward passes do not go through `Llama.forward_cached` but through
`FastPath` (same arithmetic, fewer and larger operations), and decode steps
run on one intra-op thread by default: on two shared cores a second thread
spent most of each small operation waiting to be scheduled. A decode step at
small batch is bound by reading the weights and by per-operation overhead, so
by default its matrices are int8 (per-row scales; activations int8 too from
8 rows; prefill keeps f32) and the step is compiled with torch.compile in a background thread while
the engine decodes eagerly, then once more ahead of time (torch.export and
AOTInductor: one call into C++ per step; batch 1 first);
`GLASSFORGE_DECODE_WEIGHTS=f32|bf16|int8`, `GLASSFORGE_DECODE_COMPILE=0` and
`GLASSFORGE_DECODE_AOT=0` change that (measurements and tolerances in
docs/PERFORMANCE.md, "Serving").

Results leave the engine as `Event`s through a callback the caller supplies
(the server hands events to its event loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import collections
import os
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from glassforge.errors import UserError
from glassforge.model import KVCache, Llama, rope_tables


PREFILL_PARALLEL_TOKENS = 128  # prompts at least this long are prefilled with every intra-op thread
AOT_GRAPHS = ("batch 1", "batches", "int8 rows")  # compiled ahead of time in this order (batch 1 matters most)
INT8_ROWS_FROM = 8  # int8 decode steps of at least this many rows use int8 activations too (FastPath._linear_int8_rows)
PACKED_PREFILL_TOKENS = 2048  # prompts arriving together are prefilled in one forward up to this many tokens
DEFAULT_DECODE_WEIGHTS = "int8"  # FastPath weights for decode steps; see docs/PERFORMANCE.md for the measurements
# torch.compile and torch.export are not safe to run in two threads at once (two engines compiling together
# failed one time in two with "RuntimeError when making fake tensor call"), so engines in a process take turns
COMPILE_LOCK = threading.Lock()


class QueueFull(Exception):
    """The waiting queue has no room: the caller should retry later."""


class ContextTooLong(UserError):
    """Prompt plus max_tokens exceed the engine's maximum context."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    prompt_logprobs: int | None = None  # the same over the prompt (completions `echo`)
    grammar: str | None = None  # an llguidance grammar (from `Engine.json_grammar`): constrained decoding


@dataclass
class TokenLogprob:
    id: int
    token: str
    logprob: float | None
    top: list[tuple[int, str, float]] | None
    offset: int  # characters of output text before this token


@dataclass
class Event:
    """What one sequence produced since its last event."""

    index: int
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def absorb(self, ev: "Event") -> bool:
        """Fold a later event of the same choice into this one; True when it finished the choice."""
        self.text += ev.text
        self.tokens += ev.tokens
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
            return True
        return False


Sink = Callable[[Event], None]


class Sequence:
    """One choice being generated: its tokens, text state and cache slot."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, sink: Sink, group: int):
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.group = group  # sequences of one prompt of one request share a prefill
        self.slot = -1
        self.out_ids: list[int] = []
        self.pending: list[TokenLogprob] = []
        self.text = ""  # decoded output so far (stop strings not yet cut)
        self.sent = 0  # characters of text already emitted
        self.prefix_offset = 0
        self.read_offset = 0
        self.done = False
        self.cancelled = False
        self.first_event = True
        self.counts: torch.Tensor | None = None
        self.matcher = None  # llguidance matcher when params.grammar is set
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def position(self) -> int:
        """Position of the next token to feed (the last generated one)."""
        return len(self.prompt_ids) + len(self.out_ids) - 1


DECODE_WEIGHTS = ("f32", "bf16", "int8")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row (weight-only): (int8 [N, K], bf16 scales [N]), w ~ q * scale."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


def _one_line(e: BaseException) -> str:
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

    `model.forward_cached` is general (any slots, any positions, any length); the
    engine only ever needs two shapes, and on a CPU the per-operation overhead
    of a small model dominates, so they get their own code:

    - prefill: one whole prompt into one slot, from position 0 (plain causal
      attention, keys written by slicing), always with the f32 weights;
    - decode: one token for each of the slots 0..S-1 (a view of the cache, no
      gather); free slots in that range ride along as dummy rows.

    Q, K and V are one matmul, gate and up another; rotary tables are computed
    once; grouped-query attention uses `enable_gqa` instead of copying heads.

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
        cos, sin = rope_tables(cfg, torch.arange(max_len))
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
                       all_logits: bool = False) -> torch.Tensor:
        """Several prompts (ids, slot), each from position 0, in one forward: [n prompts, V] logits of
        their last positions (all_logits: [tokens, V] for every position, for a single prompt).

        Prompts arriving together are packed into one sequence of tokens, so each matmul reads the
        weights once for all of them instead of once per prompt (16 prompts of 35 tokens: about
        6 ms each alone on the reference CPU); attention and the cache writes run prompt by prompt,
        so no prompt sees another's keys.
        """
        cfg, hd = self.cfg, self.cfg.head_dim
        lengths = [len(ids) for ids, _ in prompts]
        starts = [0]
        for T in lengths:
            starts.append(starts[-1] + T)
        N = starts[-1]
        positions = torch.cat([torch.arange(T) for T in lengths]) if len(prompts) > 1 else torch.arange(N)
        x = F.embedding(torch.tensor([t for ids, _ in prompts for t in ids]), self.embed)  # [N, d]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        H, KV = cfg.n_heads, cfg.n_kv_heads
        for i, (ln1, wqkv, wo, ln2, wgu, wdown) in enumerate(self.layers):
            qkv = F.linear(self._norm(x, ln1), wqkv)
            qk = self._rope(qkv[:, :self.q_dim + self.kv_dim].view(N, H + KV, hd), cos, sin)
            v = qkv[:, self.q_dim + self.kv_dim:].view(N, KV, hd)
            ys = []
            for (_, slot), start, T in zip(prompts, starts, lengths):
                q_p = qk[start:start + T, :H].transpose(0, 1)  # [H, T, hd]
                k_p = qk[start:start + T, H:].transpose(0, 1)  # [KV, T, hd]
                v_p = v[start:start + T].transpose(0, 1)
                cache.k[i, slot, :, :T] = k_p
                cache.v[i, slot, :, :T] = v_p
                y = F.scaled_dot_product_attention(q_p[None], k_p[None], v_p[None], is_causal=True,
                                                   enable_gqa=self.gqa)
                ys.append(y[0].transpose(0, 1).reshape(T, -1))
            x = x + F.linear(ys[0] if len(ys) == 1 else torch.cat(ys), wo)
            x = x + self._mlp(self._norm(x, ln2), wgu, wdown)
        if not all_logits:
            x = x[torch.tensor(starts[1:]) - 1]
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
            self.compile_error = _one_line(e)
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


class Engine:
    """Continuous-batching generation over one model; thread-safe `submit`."""

    def __init__(self, folder: Path | str, max_batch: int = 16, max_context: int | None = None,
                 max_queue: int | None = None, dtype: torch.dtype = torch.float32,
                 decode_threads: int | None = None, decode_weights: str | None = None,
                 compile_decode: bool | None = None, decode_aot: bool | None = None):
        from glassforge.generate import resolve_release
        from glassforge.tokenizer import END, ENDOFTEXT, chat_template_of, load_tokenizer

        if max_batch < 1:
            raise UserError(f"--max-batch {max_batch}: must be at least 1")
        self.folder = resolve_release(folder)
        self.model = Llama.from_pretrained(self.folder, dtype=dtype)
        self.cfg = self.model.cfg
        self.tokenizer = load_tokenizer(self.folder)
        self.chat_template = chat_template_of(self.folder)
        self.end_id = self.tokenizer.token_to_id(END)
        self.eot_id = self.tokenizer.token_to_id(ENDOFTEXT)
        self.eos_ids = {i for i in (self.end_id, self.eot_id) if i is not None}
        self.vocab_size = self.cfg.vocab_size
        if max_context is None:
            max_context = self.cfg.max_seq_len
        if not 2 <= max_context <= self.cfg.max_seq_len:
            raise UserError(f"--max-context {max_context}: must be between 2 and the model's "
                            f"{self.cfg.max_seq_len}")
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_queue = max_queue if max_queue is not None else max(64, 8 * max_batch)
        # at least 2 slots (a dimension of size 1 would be specialised by the compiled step, and recompile),
        # and one slot and one position more than are used: the ahead-of-time graphs cover sizes below
        # the cache's (FastPath.compile_aot)
        self.cache = KVCache(self.cfg, max(max_batch, 2) + 1, max_context + 1, dtype=dtype)
        # GLASSFORGE_DECODE_WEIGHTS: f32, bf16 or int8 matrices for decode steps (FastPath; the measured
        # choice is DEFAULT_DECODE_WEIGHTS, docs/PERFORMANCE.md); prefill always uses f32.
        weights = decode_weights or os.environ.get("GLASSFORGE_DECODE_WEIGHTS", "").strip().lower() or (
            DEFAULT_DECODE_WEIGHTS if dtype == torch.float32 else "f32")
        self.fast = FastPath(self.model, max_context, weights)
        if compile_decode is None:
            compile_decode = os.environ.get("GLASSFORGE_DECODE_COMPILE", "1").strip().lower() not in ("0", "off", "")
        self.compile_state = "off"  # off | compiling | on | failed: <why>
        # GLASSFORGE_DECODE_AOT=0: no ahead-of-time batch-1 step (FastPath.compile_aot) after the compile
        if decode_aot is None:
            decode_aot = os.environ.get("GLASSFORGE_DECODE_AOT", "1").strip().lower() not in ("0", "off", "")
        self.aot_state = "waiting" if compile_decode and decode_aot and max_context > 2 else "off"
        self._compiler: threading.Thread | None = None
        if compile_decode:
            self.compile_state = "compiling"
            # not a daemon: a process that exits while inductor compiles is aborted from C++
            # ("terminate called without an active exception"), so exit waits for the graph being made
            self._compiler = threading.Thread(target=self._compile, name="glassforge-compile")
        # Threads: decode steps are many small operations, where a second intra-op thread mostly waits
        # for the scheduler (on 2 shared cores, and with the HTTP side needing a core, one thread was
        # several times faster, see docs/PERFORMANCE.md); long prompts are big matmuls and get them all.
        self.all_threads = torch.get_num_threads()
        # GLASSFORGE_DECODE_THREADS: a number pins it; "auto" measures 1 against all (ThreadTuner). The
        # default is 1: in the server the HTTP side and its clients need the other core, and the tuner lost
        # to a pinned single thread there (docs/PERFORMANCE.md).
        env_threads = os.environ.get("GLASSFORGE_DECODE_THREADS", "").strip().lower()
        if decode_threads is None and env_threads == "auto":
            self.tuner = ThreadTuner(sorted({1, self.all_threads}))
        else:
            fixed = decode_threads or (int(env_threads) if env_threads.isdigit() else 1)
            self.tuner = ThreadTuner([max(1, fixed)])
        self.decode_threads = self.tuner.options[0]
        self.free_slots = list(range(max_batch - 1, -1, -1))  # popped from the end: lowest first
        self.running: list[Sequence] = []
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.cond = threading.Condition()
        self._groups = 0
        self._closed = False
        # counters read by /metrics
        self.stats = collections.Counter()
        self.decode_time = 0.0
        self._token_cache: dict[int, str] = {}
        self._lltok = None
        self.thread = threading.Thread(target=self._loop, name="glassforge-engine", daemon=True)
        self.thread.start()
        if self._compiler is not None:
            self._compiler.start()

    def _compile(self) -> None:
        """Compile the decode step beside the running engine, which decodes eagerly until this is done.

        Compiling takes seconds to tens of seconds (less with inductor's on-disk cache), so it never
        blocks start-up or requests; any failure (no C++ compiler, an unsupported operation) leaves
        the eager step, with the reason in `compile_state`.
        """
        try:
            with COMPILE_LOCK:
                step = self.fast.compile(self.cache, self.decode_threads, lambda: self._closed)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: keep the eager step
            self.compile_state = f"failed: {_one_line(e)}"
            return
        if step is None or self._closed:
            self.compile_state = "off"
            self.aot_state = "off"
            return
        self.fast.step = step  # picked up by the next decode step (one attribute store: atomic)
        self.compile_state = "on"
        if self.aot_state != "waiting":
            return
        self.aot_state = "compiling"
        slots = self.cache.k.shape[1]
        for graph in AOT_GRAPHS:
            if (graph == "int8 rows" and not (self.fast.int8_activations and INT8_ROWS_FROM < slots)
                    or graph == "batches" and slots < 3):
                continue  # no batch of that size ever runs
            try:
                with COMPILE_LOCK:
                    aot = self.fast.compile_aot(self.cache, self.decode_threads, graph)
            except Exception as e:  # noqa: BLE001 - any failure keeps the compiled step for those batches
                self.aot_state = f"failed: {graph}: {_one_line(e)}"
                return
            if self._closed:
                self.aot_state = "off"
                return
            self.fast.aot[graph] = aot  # steps of those sizes take it from the next one on (a dict store)
        self.aot_state = "on"

    def wait_compiled(self, timeout: float | None = None) -> str:
        """Block until the background compile (and the ahead-of-time batch-1 step after it) has finished
        or timeout; returns `compile_state`."""
        if self._compiler is not None:
            self._compiler.join(timeout)
        return self.compile_state

    # --- the public side ------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_str(self, token_id: int) -> str:
        s = self._token_cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_cache[token_id] = s
        return s

    def grammar_tokenizer(self):
        """llguidance's view of our tokenizer (built once, offline, from tokenizer.json)."""
        if self._lltok is None:
            try:
                import llguidance.hf
                from transformers import PreTrainedTokenizerFast
            except ImportError as e:
                raise UserError(f"constrained decoding needs llguidance and transformers ({e.name} is not "
                                f"installed): pip install llguidance transformers") from None
            from glassforge.tokenizer import END

            hf = PreTrainedTokenizerFast(tokenizer_file=str(self.folder / "tokenizer.json"), eos_token=END)
            self._lltok = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.end_id)
        return self._lltok

    def json_grammar(self, schema: dict | None) -> str:
        """An llguidance grammar for JSON matching schema (None: any JSON object); UserError if invalid."""
        lltok = self.grammar_tokenizer()
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema if schema is not None else {"type": "object"}, defaults={"whitespace_flexible": False})
        except Exception as e:  # noqa: BLE001 - the library reports schema errors as various types
            raise UserError(f"invalid JSON schema: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise UserError(f"invalid JSON schema: {error}")
        return grammar

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise UserError (or ContextTooLong) for a request the engine cannot run."""
        if not prompt_ids:
            raise UserError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        need = len(prompt_ids) + max(params.max_tokens, 1)
        if need > self.max_context:
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens.")

    def submit(self, requests: list[tuple[int, list[int], SamplingParams]], sink: Sink) -> list[Sequence]:
        """Queue sequences (choice index, prompt ids, params), all or none; events go to sink."""
        for _, ids, params in requests:
            self.check_request(ids, params)
        with self.cond:
            if self._closed:
                raise QueueFull("the engine is shutting down")
            if len(self.waiting) + len(requests) > self.max_queue + max(0, len(self.free_slots)):
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (queue limit {self.max_queue})")
            seqs = []
            groups: dict[tuple, int] = {}
            for index, ids, params in requests:
                key = (tuple(ids), id(params))
                if key not in groups:
                    self._groups += 1
                    groups[key] = self._groups
                seq = Sequence(index, ids, params, sink, groups[key])
                if params.grammar is not None:
                    import llguidance

                    seq.matcher = llguidance.LLMatcher(self.grammar_tokenizer(), params.grammar, log_level=0)
                seqs.append(seq)
            self.waiting.extend(seqs)
            self.cond.notify()
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences and free their slots before the next step."""
        with self.cond:
            for s in seqs:
                s.cancelled = True
            self.cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the engine thread (between steps); its result comes back in a Future."""
        fut: Future = Future()
        self.jobs.put((fn, fut))
        with self.cond:
            self.cond.notify()
        return fut

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Event]:
        """Blocking: run one prompt to the end; one merged Event per choice."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.submit([(i, prompt_ids, params) for i in range(n)], q.put)
        merged = {i: Event(index=i) for i in range(n)}
        finished = 0
        while finished < n:
            ev = q.get()
            if ev.error:
                raise RuntimeError(ev.error)
            finished += merged[ev.index].absorb(ev)
        return [merged[i] for i in range(n)]

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def close(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify()
        self.thread.join(timeout=10)
        torch.set_num_threads(self.all_threads)  # the setting is process-wide: give it back

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states, L2-normalised (call on the engine thread via `call`)."""
        out = []
        for ids in batch:
            h = self.model.hidden_states(torch.tensor([ids]))[0].float().mean(0)
            out.append(F.normalize(h, dim=-1).tolist())
        return out

    @torch.inference_mode()
    def score(self, ids: list[int], k: int | None) -> list[TokenLogprob] | None:
        """Log-probs of a prompt's own tokens (call on the engine thread via `call`)."""
        if k is None:
            return None
        logits, _ = self.model(torch.tensor([ids]))
        return self._prompt_logprobs(ids, logits[0, :-1], k)

    # --- the engine thread --------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        compile_settings()
        while True:
            with self.cond:
                while (not self._closed and not self.waiting and not self.running and self.jobs.empty()):
                    self.cond.wait(timeout=1.0)
                if self._closed:
                    break
            try:
                self._run_jobs()
                self._reap()
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # a bug: fail the running sequences, keep serving
                import traceback

                traceback.print_exc()
                for s in self.running + list(self.waiting):
                    self._finish(s, "abort", error=f"internal error: {type(e).__name__}: {e}")
                self.waiting.clear()
        for s in self.running + list(self.waiting):
            self._finish(s, "abort", error="the server is shutting down")

    def _run_jobs(self) -> None:
        while not self.jobs.empty():
            fn, fut = self.jobs.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

    def _reap(self) -> None:
        with self.cond:
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        for s in gone:
            s.done = True
            self.stats["cancelled"] += 1
        for s in [s for s in self.running if s.cancelled]:
            self._release(s)
            self.stats["cancelled"] += 1

    def _release(self, s: Sequence) -> None:
        s.done = True
        if s in self.running:
            self.running.remove(s)
        if s.slot >= 0:
            self.free_slots.append(s.slot)
            s.slot = -1

    def _admit(self) -> None:
        """Prefill waiting sequences into free slots, the prompts that fit a budget in one forward."""
        while True:
            batch = self._take_prefill_batch()
            if not batch:
                return
            self._prefill(batch)

    def _take_prefill_batch(self) -> list[list[Sequence]]:
        """Groups (the choices of one prompt) to prefill together, their slots assigned.

        A prompt that asks for its log-probs is prefilled alone (it needs every position's logits);
        the others are packed up to PACKED_PREFILL_TOKENS, and a longer one goes alone.
        """
        batch: list[list[Sequence]] = []
        tokens = 0
        while self.free_slots:
            with self.cond:
                if not self.waiting:
                    break
                first = self.waiting[0]
                T = len(first.prompt_ids)
                alone = first.params.prompt_logprobs is not None
                if batch and (alone or tokens + T > PACKED_PREFILL_TOKENS):
                    break
                self.waiting.popleft()
                group = [first]
                while (self.waiting and self.waiting[0].group == first.group
                       and len(group) < len(self.free_slots)):
                    group.append(self.waiting.popleft())
            group = [s for s in group if not s.cancelled]
            if not group:
                continue
            self.free_slots.sort(reverse=True)
            for s in group:
                s.slot = self.free_slots.pop()
            batch.append(group)
            tokens += T
            if alone:
                break
        return batch

    def _prefill(self, batch: list[list[Sequence]]) -> None:
        firsts = [group[0] for group in batch]
        want_all = len(batch) == 1 and firsts[0].params.prompt_logprobs is not None
        tokens = sum(len(s.prompt_ids) for s in firsts)
        # while the decode step compiles, the thread count stays that of its graphs (they are guarded on it)
        long_prompt = tokens >= PREFILL_PARALLEL_TOKENS and self.compile_state != "compiling"
        torch.set_num_threads(self.all_threads if long_prompt else self.decode_threads)
        logits = self.fast.prefill_packed([(s.prompt_ids, s.slot) for s in firsts], self.cache, want_all)
        for group in batch:  # the other choices of the same prompt: copy the cache rows
            first, T = group[0], len(group[0].prompt_ids)
            for s in group[1:]:
                self.cache.k[:, s.slot, :, :T] = self.cache.k[:, first.slot, :, :T]
                self.cache.v[:, s.slot, :, :T] = self.cache.v[:, first.slot, :, :T]
            self.stats["prompt_tokens"] += T * len(group)
        self.stats["prefills"] += len(batch)
        self.stats["prefill_passes"] += 1
        prompt_lp = None
        if want_all:
            first = firsts[0]
            prompt_lp = self._prompt_logprobs(first.prompt_ids, logits[:-1], first.params.prompt_logprobs)
            logits = logits[-1:]
        seqs = [s for group in batch for s in group]
        self.running.extend(seqs)
        rows = torch.tensor([j for j, group in enumerate(batch) for _ in group])
        self._sample_and_emit(seqs, logits[rows], prompt_lp)

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob]:
        lp = torch.log_softmax(logits.float(), -1)
        chosen = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        tops = lp.topk(k, -1) if k > 0 else None
        strs = [self.token_str(t) for t in ids]
        out = [TokenLogprob(ids[0], strs[0], None, None, 0)]
        offset = len(strs[0])
        texts = self.tokenizer.decode_batch([ids[:i] for i in range(1, len(ids))], skip_special_tokens=False)
        for i in range(1, len(ids)):
            top = None
            if tops is not None:
                top = [(t, self.token_str(t), v) for t, v in zip(tops.indices[i - 1].tolist(),
                                                                 tops.values[i - 1].tolist())]
            offset = len(texts[i - 1])
            out.append(TokenLogprob(ids[i], strs[i], chosen[i - 1], top, offset))
        return out

    def _step(self) -> None:
        batch = self.running
        t0 = time.perf_counter()
        S = max(s.slot for s in batch) + 1
        tokens = [0] * S
        positions = [0] * S
        for s in batch:
            tokens[s.slot] = s.out_ids[-1]
            positions[s.slot] = s.position
        # free slots below S ride along as dummy rows at position 0 (their cache is rewritten on admission)
        threads = self.tuner.pick(S) if self.compile_state != "compiling" else self.decode_threads
        torch.set_num_threads(threads)
        t_step = time.perf_counter()
        all_logits = self.fast.decode(torch.tensor(tokens), torch.tensor(positions), self.cache)
        self.tuner.record(S, threads, time.perf_counter() - t_step)
        slots = [s.slot for s in batch]
        logits = all_logits if slots == list(range(S)) else all_logits[torch.tensor(slots)]
        self.decode_time += time.perf_counter() - t0
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(batch)
        self._sample_and_emit(list(batch), logits, None)

    # --- sampling -----------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        logits = logits.float()
        B, V = logits.shape
        greedy = [s.params.temperature <= 0 for s in seqs]
        adjusted = None
        for i, s in enumerate(seqs):
            p = s.params
            if p.logit_bias or p.presence_penalty or p.frequency_penalty or s.matcher is not None:
                if adjusted is None:
                    adjusted = logits.clone()
                row = adjusted[i]
                if s.matcher is not None:
                    import llguidance.torch as lt

                    mask = lt.allocate_token_bitmask(1, self.vocab_size)
                    lt.fill_next_token_bitmask(s.matcher, mask, 0)
                    lt.apply_token_bitmask_inplace(adjusted[i:i + 1], mask)
                if p.logit_bias:
                    ids = torch.tensor(list(p.logit_bias.keys()))
                    row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype))
                if s.counts is not None:
                    row -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0).float()
        if adjusted is not None:
            logits = adjusted
        if all(greedy):
            return logits.argmax(-1).tolist()
        if adjusted is not None:  # a -inf row from a grammar must not turn into NaN under temperature
            logits = logits.nan_to_num(neginf=torch.finfo(torch.float32).min)
        temps = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs])[:, None]
        scaled = logits / temps
        if any(s.params.top_k > 0 or s.params.top_p < 1.0 for s in seqs):
            sorted_logits, order = scaled.sort(-1, descending=True)
            ranks = torch.arange(V)[None, :]
            ks = torch.tensor([s.params.top_k if s.params.top_k > 0 else V for s in seqs])[:, None]
            drop = ranks >= ks
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            ps = torch.tensor([s.params.top_p for s in seqs])[:, None]
            drop |= (probs.cumsum(-1) - probs) > ps
            drop[:, 0] = False
            mask = torch.zeros_like(drop).scatter(-1, order, drop)
            scaled = scaled.masked_fill(mask, float("-inf"))
        probs = scaled.softmax(-1)
        noise = torch.stack([torch.empty(V).exponential_(generator=s.generator) for s in seqs])
        sampled = (probs / noise).argmax(-1)
        best = logits.argmax(-1)
        return [int(best[i]) if greedy[i] else int(sampled[i]) for i in range(B)]

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor,
                         prompt_lp: list[TokenLogprob] | None) -> None:
        tokens = self._sample(seqs, logits)
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps = {}
        if want_lp:
            rows = torch.log_softmax(logits[want_lp].float(), -1)
            kmax = max(seqs[i].params.logprobs for i in want_lp)
            tops = rows.topk(kmax, -1) if kmax > 0 else None
            for j, i in enumerate(want_lp):
                k = seqs[i].params.logprobs
                top = None
                if tops is not None:
                    top = [(t, self.token_str(t), v) for t, v in
                           zip(tops.indices[j, :k].tolist(), tops.values[j, :k].tolist())]
                lps[i] = (float(rows[j, tokens[i]]), top)
        now = time.perf_counter()
        for i, (s, tok) in enumerate(zip(seqs, tokens)):
            if s.first_token_at is None:
                s.first_token_at = now
            self._append(s, tok, lps.get(i), prompt_lp)

    def _append(self, s: Sequence, tok: int, lp, prompt_lp) -> None:
        p = s.params
        s.out_ids.append(tok)
        self.stats["completion_tokens"] += 1
        if p.presence_penalty or p.frequency_penalty:
            if s.counts is None:
                s.counts = torch.zeros(self.vocab_size)
            s.counts[tok] += 1
        offset = len(s.text)
        is_stop_token = tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids)
        if lp is not None:
            s.pending.append(TokenLogprob(tok, self.token_str(tok), lp[0], lp[1], offset))
        finish = None
        grammar_done = False
        if s.matcher is not None:
            s.matcher.consume_token(tok)
            grammar_done = s.matcher.is_stopped() or s.matcher.is_error()
            is_stop_token = is_stop_token or tok == self.end_id
        if is_stop_token:
            finish = "stop"
        else:
            delta = self._detokenize(s)
            if delta:
                before = len(s.text)
                s.text += delta
                if p.stop:
                    cut = self._find_stop(s.text, before, p.stop)
                    if cut is not None:
                        s.text = s.text[:cut]
                        finish = "stop"
            if grammar_done:  # the grammar is complete: nothing more may follow
                finish = "stop"
        if finish is None and len(s.out_ids) >= p.max_tokens:
            finish = "length"
        if finish is None and s.position + 1 >= self.max_context:
            finish = "length"
        if finish is None:
            upto = len(s.text) - self._holdback(s.text, p.stop) if p.stop else len(s.text)
            if upto > s.sent or s.pending or prompt_lp is not None:
                self._emit(s, s.text[s.sent:upto], prompt_lp)
                s.sent = max(s.sent, upto)
        else:
            if finish == "length" or grammar_done:  # flush any undecoded bytes
                s.text += self._flush_detokenize(s)
            self._finish(s, finish, prompt_lp=prompt_lp)

    def _emit(self, s: Sequence, text: str, prompt_lp, finish: str | None = None, error: str | None = None):
        ev = Event(index=s.index, text=text, tokens=s.pending, finish_reason=finish, error=error,
                   prompt_logprobs=prompt_lp if s.first_event else None,
                   prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.out_ids))
        s.pending = []
        s.first_event = False
        try:
            s.sink(ev)
        except Exception:  # the receiver is gone: treat like a disconnect
            s.cancelled = True

    def _finish(self, s: Sequence, reason: str, prompt_lp=None, error: str | None = None) -> None:
        if s.done:
            return
        text = s.text[s.sent:] if error is None else ""
        s.sent = len(s.text)
        self._release(s)
        self.stats["finished"] += 1
        self._emit(s, text, prompt_lp, finish=reason, error=error)

    # --- text ---------------------------------------------------------------------

    def _detokenize(self, s: Sequence) -> str:
        """New complete text from the latest token (a window re-decode, never half a character)."""
        ids = s.out_ids
        prefix = self.tokenizer.decode(ids[s.prefix_offset:s.read_offset])
        full = self.tokenizer.decode(ids[s.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            s.prefix_offset, s.read_offset = s.read_offset, len(ids)
            return full[len(prefix):]
        return ""

    def _flush_detokenize(self, s: Sequence) -> str:
        ids = s.out_ids
        prefix = self.tokenizer.decode(ids[s.prefix_offset:s.read_offset])
        full = self.tokenizer.decode(ids[s.prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    @staticmethod
    def _find_stop(text: str, new_from: int, stops: list[str]) -> int | None:
        """Earliest index where a stop string occurs, looking only where new text could complete one."""
        best = None
        for stop in stops:
            i = text.find(stop, max(0, new_from - len(stop) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    @staticmethod
    def _holdback(text: str, stops: list[str]) -> int:
        """Characters at the end of text that could begin a stop string."""
        hold = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold


def load_engine(run: Path | str, max_batch: int = 16, max_context: int | None = None,
                max_queue: int | None = None) -> Engine:
    """The engine for a run folder or its release/ folder."""
    return Engine(run, max_batch=max_batch, max_context=max_context, max_queue=max_queue)
