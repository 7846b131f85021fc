"""The model: a Llama-architecture decoder, readable top to bottom.

RMSNorm, rotary position embeddings (the "rotate half" layout Hugging Face uses),
SwiGLU feed-forward, grouped-query causal attention through PyTorch's
scaled_dot_product_attention. Module and parameter names are exactly those of
Hugging Face `LlamaForCausalLM`, so `state_dict()` is a Hugging Face checkpoint
with no renaming: `model.layers.0.self_attn.q_proj.weight` and so on. The
configuration (`ModelConfig`) is the recipe's `[model]` section.

Initialisation: every linear and embedding weight is drawn from N(0, 0.02);
the two projections that write into the residual stream (`o_proj`, `down_proj`)
are scaled by 1/sqrt(2 * n_layers) so the residual's variance stays flat with
depth (GPT-2's rule); norms start at one.

Speed without renaming anything: q, k and v are one matmul over the three
weights concatenated, and gate and up likewise (the parameters keep their
Hugging Face names and shapes); grouped-query attention goes through SDPA's
`enable_gqa` rather than copying keys and values per group; the rotary tables
are computed once for the whole context and sliced. Training rows of up to 128
tokens on a CPU take explicit attention scores instead of SDPA (see
`explicit_attention`: its flash kernel's backward is the slower one there).
`tests/test_model.py` checks logits, loss and gradients against transformers.

One forward: whole sequences with a causal mask (training, scoring), or, given
a `KVCache`, tokens at explicit positions in explicit cache slots, each
attending to its own slot's keys up to its own position, so sequences of
different lengths share one batch (generation). Fine-tuning packs several
conversations into a row: `segments` numbers them, and each token attends only
to earlier tokens of its own conversation, at positions counted from that
conversation's start, so a packed conversation is computed as it would be alone.

Compiled training compiles regions, not the whole model (`compile_for_training`):
one decoder layer's graph, which all the layers share, and the output head
with its loss. A cold compile is then one layer's work instead of every
layer's, and evaluation and generation on the same weights stay eager.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from glassforge.core.recipe import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as Hugging Face does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for the given positions, shape positions.shape + (head_dim,)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values for `slots` sequences of up to `max_len` positions each."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


class CacheStep:
    """Where a cached forward reads and writes: each row's cache slot and its tokens' positions."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor):
        self.cache, self.slots, self.positions = cache, slots, positions
        # Rows in slots 0..B-1, in order, read their keys and values as a view of the cache; any other slots
        # are gathered, a copy of every key and value the step attends to, in every layer.
        self.rows = slice(0, len(slots)) if torch.equal(slots, torch.arange(len(slots), device=slots.device)) else slots
        span = int(positions.max()) + 1
        # query (b, t) sees its own slot's keys at positions up to its own: [B, 1, T, span]
        self.mask = (torch.arange(span, device=positions.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1)


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows numbered by segment [B, T]: each token's position within its segment, and the
    attention mask [B, 1, T, T] letting a token see only earlier tokens of its own segment."""
    T = segments.shape[1]
    t = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return t - first, ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)


#: Rows up to this length attend through explicit scores on a CPU when not decoding (see explicit_attention).
EXPLICIT_ATTENTION_MAX_T = 128


def explicit_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Causal (or masked) grouped-query attention as two matmuls and a softmax.

    On a CPU, SDPA's flash kernel spends most of a training step in its
    backward at short rows: at the default shape, a compiled forward and
    backward of 32 packed rows of 128 tokens took 900 ms through SDPA and 548
    ms through this (the two tie at 256 tokens, and SDPA wins at 512;
    docs/PERFORMANCE.md, "Fine-tuning's attention"). mask [B, 1, T, T] is True
    where a query may look, or None for causal.
    """
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    q = q.view(B, k.shape[1], groups, T, D)  # a head group shares its key and value head, with no copy
    scores = (q @ k.unsqueeze(2).transpose(-1, -2)) * (1.0 / math.sqrt(D))
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if mask is None else mask.unsqueeze(2)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), dim=-1).to(v.dtype)
    return (probs @ v.unsqueeze(2)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, step: CacheStep | None = None, segment_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        hd, nq, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        # One matmul for q, k and v: one large product beats three small ones, and the
        # concatenated weight is tiny next to the activations it multiplies.
        w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        q, k, v = F.linear(x, w).split((nq * hd, nkv * hd, nkv * hd), dim=-1)
        q = q.view(B, T, nq, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        # Rotate in the activations' dtype (bf16 under autocast), as Hugging Face does.
        cos, sin = cos.to(q.dtype).unsqueeze(-3), sin.to(q.dtype).unsqueeze(-3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step is None:  # causal, within each packed conversation when segment_mask is given
            mask, causal = segment_mask, segment_mask is None
        else:  # write this step's keys and values at their positions, then attend over the slot's cache
            cache, slots, pos = step.cache, step.slots, step.positions
            cache.k[self.layer][slots[:, None], :, pos] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[self.layer][slots[:, None], :, pos] = v.transpose(1, 2).to(cache.v.dtype)
            span = step.mask.shape[-1]
            k = cache.k[self.layer][step.rows, :, :span].to(q.dtype)
            v = cache.v[self.layer][step.rows, :, :span].to(q.dtype)
            mask, causal = step.mask, False
        if step is None and q.device.type == "cpu" and T <= EXPLICIT_ATTENTION_MAX_T:
            y = explicit_attention(q, k, v, mask)
        else:  # grouped-query attention without copying keys and values per head group
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=nkv != nq)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        # gate and up in one matmul (see Attention.forward), then SwiGLU.
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, step: CacheStep | None = None, segment_mask: torch.Tensor | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, segment_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's `LlamaModel`: embeddings, layers, final norm (the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not part of the checkpoint (persistent=False): a function of the config alone.
        cos, sin = rope_tables(cfg, torch.arange(cfg.max_seq_len))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # compile_for_training's compiled layers and head: a plain attribute, so no state_dict key
        self._training_regions: tuple[list, object] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        residual_scale = 1 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            else:
                std = 0.02 * (residual_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, step: CacheStep | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d] (used for embeddings too)."""
        mask = None
        if step is not None:
            cos, sin = self.rope_cos[step.positions], self.rope_sin[step.positions]
        elif segments is None:  # whole sequences from position 0
            cos, sin = self.rope_cos[:idx.shape[1]], self.rope_sin[:idx.shape[1]]
        else:  # packed rows: positions restart at each segment, attention stays inside it
            positions, mask = segment_positions_and_mask(segments)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.model.embed_tokens(idx)
        for layer in self._regions()[0]:
            x = layer(x, cos, sin, step, mask)
        return self.model.norm(x)

    def compile_for_training(self) -> None:
        """Compile each decoder layer and the output head with its loss (torch.compile), for training steps only.

        The layers share one compiled graph (their code is the same, their weights are its inputs), so a cold
        compile costs one layer instead of all of them: at the default's shapes, 69.2 s for pretraining's and
        fine-tuning's graphs against 100.7 s for the whole model, for fine-tuning steps 4-5% slower
        (docs/PERFORMANCE.md, "Compiling by regions"). Evaluation and generation (no gradient) stay eager and compile nothing."""
        self._training_regions = ([torch.compile(layer) for layer in self.model.layers],
                                  torch.compile(self.loss_only))

    def _regions(self):
        if self._training_regions is not None and self.training and torch.is_grad_enabled():
            return self._training_regions
        return self.model.layers, self.logits_and_loss

    def logits_and_loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        """The output head on final hidden states h [B, T, d], and the cross-entropy against targets."""
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction=reduction)
        return logits, loss

    def loss_only(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        """(None, the loss): a compiled training step's head. Nothing reads a training step's logits, and a
        compiled graph that returns them writes them all out (a fine-tuning step was 10-20% slower)."""
        return None, self.logits_and_loss(h, targets, reduction)[1]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean", *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """Logits for every position; with targets, also the cross-entropy (-100 is ignored).

        Without a cache, idx [B, T] are whole sequences from position 0, or, with
        segments [B, T] (non-decreasing numbers along each row), packed sequences,
        each from position 0 at its first token. With a cache,
        idx and positions [B, T] are tokens at those positions of the sequences in
        cache rows slots [B]: their keys and values are written there and each
        attends to its own row up to its own position.
        """
        step = None if cache is None else CacheStep(cache, slots, positions)
        h = self.hidden_states(idx, step, segments)  # a compiled training step returns no logits (loss_only)
        if targets is None:
            return self.lm_head(h), None
        return self._regions()[1](h, targets, reduction)

    # Weights on disk are always safetensors: never pickle.
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)  # Hugging Face stores tied weights once
        return sd

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        if self.cfg.tie_embeddings:
            sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (the layers and the
    output head, tied or not) plus the attention scores (PaLM, appendix B)."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff
    matmul_weights = cfg.n_layers * per_layer + d * cfg.vocab_size
    return 6 * matmul_weights + 12 * cfg.n_layers * d * seq_len
