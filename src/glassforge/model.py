"""The model: a Llama-architecture decoder, readable top to bottom.

RMSNorm, rotary position embeddings (the "rotate half" layout Hugging Face uses),
SwiGLU feed-forward, grouped-query causal attention through PyTorch's
scaled_dot_product_attention. Module and parameter names are exactly those of
Hugging Face `LlamaForCausalLM`, so `state_dict()` is a Hugging Face checkpoint
with no renaming: `model.layers.0.self_attn.q_proj.weight` and so on.

Initialisation: every linear and embedding weight is drawn from N(0, 0.02);
the two projections that write into the residual stream (`o_proj`, `down_proj`)
are scaled by 1/sqrt(2 * n_layers) so the residual's variance stays flat with
depth (GPT-2's rule); norms start at one.

Speed without renaming anything: the training path computes q, k and v with
one matmul over the three weights concatenated, and gate and up likewise (the
parameters keep their Hugging Face names and shapes); grouped-query attention
goes through SDPA's `enable_gqa` rather than copying keys and values per group.
`tests/test_model.py` checks logits, loss and gradients against transformers.

Two forward paths: `forward` for training (whole sequences, causal mask) and
`forward_cached` for inference, which writes keys and values into a `KVCache`
at explicit positions, so sequences of different lengths can share one batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # fewer than n_heads gives grouped-query attention
    d_ff: int = 0  # 0: the Llama rule, about 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not a multiple of model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # Hugging Face LlamaConfig, both ways: the release's config.json is this.
    def to_hf(self, bos_token_id: int | None = None, eos_token_id=None, pad_token_id: int | None = None) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        return cls(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            d_ff=cfg["intermediate_size"],
            max_seq_len=cfg["max_position_embeddings"],
            rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def _qkv(self, x, cos, sin):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.cfg.n_heads // self.cfg.n_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def forward(self, x, cos, sin, attn_mask=None):
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
        if attn_mask is None:
            # Grouped-query attention without copying keys and values per head group.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nq)
        else:
            k, v = self._expand_kv(k), self._expand_kv(v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward_cached(self, x, cos, sin, layer: int, cache: KVCache, slots, positions, mask):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        # Write this step's keys and values at their positions, then attend over the cache.
        cache.k[layer][slots[:, None], :, positions] = k.transpose(1, 2).to(cache.k.dtype)
        cache.v[layer][slots[:, None], :, positions] = v.transpose(1, 2).to(cache.v.dtype)
        span = mask.shape[-1]
        keys = self._expand_kv(cache.k[layer][slots, :, :span]).to(q.dtype)
        values = self._expand_kv(cache.v[layer][slots, :, :span]).to(q.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, layer, cache, slots, positions, mask):
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, layer, cache, slots, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's `LlamaModel`: embeddings, layers, final norm (the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
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

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states for whole sequences (used for embeddings too)."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = rope_tables(self.cfg, positions)
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Logits for every position; with targets, also the cross-entropy (-100 is ignored)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction=reduction)
        return logits, loss

    def forward_cached(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor):
        """Inference step. idx, positions: [B, T]; slots: [B] rows of the cache.

        Each query attends to the cached keys of its own slot at positions up to
        its own, so sequences of different lengths share one forward pass.
        """
        span = int(positions.max()) + 1
        mask = (torch.arange(span, device=idx.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        cos, sin = rope_tables(self.cfg, positions)
        x = self.model.embed_tokens(idx)
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_cached(x, cos, sin, i, cache, slots, positions, mask)
        return self.lm_head(self.model.norm(x))

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

    @classmethod
    def from_pretrained(cls, folder: Path | str, dtype=torch.float32) -> "Llama":
        """Load a release folder (config.json + model.safetensors), Hugging Face layout."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        model = cls(cfg)
        model.load_hf_state_dict(load_file(folder / "model.safetensors"))
        return model.to(dtype).eval()


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (the layers and the
    output head, tied or not) plus the attention scores (PaLM, appendix B)."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff
    matmul_weights = cfg.n_layers * per_layer + d * cfg.vocab_size
    return 6 * matmul_weights + 12 * cfg.n_layers * d * seq_len
