"""Optimisers and the learning-rate schedule: AdamW everywhere, or Muon for the hidden matrices.

Muon (momentum, then an orthogonalised update by a quintic Newton-Schulz
iteration) takes the 2-D weights inside the layers; AdamW keeps the
embeddings, the output head and the norms. Both follow the same schedule:
linear warmup, then cosine or warmup-stable-decay (wsd) down to
`min_lr_ratio` of the peak.
"""

from __future__ import annotations

import math

import torch

from glassforge.core.errors import UserError
from glassforge.core.recipe import TrainConfig


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

