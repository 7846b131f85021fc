"""The one sampler: next-token logits to token ids, row by row, reproducible from a seed.

Every path that samples goes through `sample`: the server's engine (and with it
`glassforge generate` and `glassforge chat`), evaluation's greedy generation
and reinforcement learning's rollouts. So the same prompt, settings and seed
give the same text wherever it is asked, as long as the logits are the same.

Per row, in order: logit bias, then presence and frequency penalties
(OpenAI's: subtracted once per token seen, and per occurrence) and the
repetition penalty (CTRL's, as vLLM and transformers apply it: a seen token's
positive logit is divided by it, a negative one multiplied) over the tokens
the caller counts; temperature 0 is then greedy. Otherwise the logits are
divided by the temperature, cut by top-k, top-p (the smallest prefix of the
sorted distribution whose mass reaches p) and min-p (tokens below min_p times
the top token's probability), and a token is drawn.

The draw is an exponential race: with E_i = -log U_i ~ Exp(1) from the row's own
`torch.Generator`, argmax(p_i / E_i) is exactly a draw from p, and each row's
draws depend only on its own generator, never on what else shares the batch.
A row's generator is seeded from the request's seed and the choice's index
(`generator_for`), so choice 2 of a request with seed 7 is the same text
whether it runs alone or beside fifteen others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Sampling:
    """How one sequence's next token is chosen from its logits."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def generator_for(seed: int | None, index: int = 0) -> torch.Generator:
    """The generator of choice `index` of a request with `seed` (None: a fresh random seed)."""
    seed = seed if seed is not None else random.getrandbits(62)
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def adjusted_logits(logits: torch.Tensor, params: Sequence[Sampling],
                    counts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """logits [B, V] (f32) with each row's bias and penalties applied; the input is left unchanged."""
    out = None
    for i, p in enumerate(params):
        c = counts[i] if counts is not None else None
        if not p.logit_bias and (c is None or not p.penalised):
            continue
        if out is None:
            out = logits.clone()
        row = out[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()))
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype))
        if c is not None and p.penalised:
            seen = c > 0
            if p.repetition_penalty != 1.0:
                scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, scaled, row))
            row -= p.frequency_penalty * c + p.presence_penalty * seen.float()
    return logits if out is None else out


def sample(logits: torch.Tensor, params: Sequence[Sampling], generators: Sequence[torch.Generator | None],
           counts: Sequence[torch.Tensor | None] | None = None) -> list[int]:
    """One token id per row of logits [B, V]; row i follows params[i] and draws from generators[i].

    counts[i] (optional, [V]) says how often each token occurred so far, for the penalties. Rows
    whose logits were masked to -inf (a grammar) never draw a masked token.
    """
    logits = adjusted_logits(logits.float(), params, counts)
    B, V = logits.shape
    best = logits.argmax(-1)
    if all(p.greedy for p in params):
        return best.tolist()
    # a row masked to -inf (a grammar) must not turn into NaN under temperature
    logits = logits.nan_to_num(neginf=torch.finfo(torch.float32).min)
    temps = torch.tensor([max(p.temperature, 1e-5) for p in params])[:, None]
    scaled = logits / temps
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = scaled.sort(-1, descending=True)
        ranks = torch.arange(V)[None, :]
        ks = torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params])[:, None]
        drop = ranks >= ks
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        ps = torch.tensor([p.top_p for p in params])[:, None]
        drop |= (probs.cumsum(-1) - probs) > ps
        drop[:, 0] = False
        mask = torch.zeros_like(drop).scatter(-1, order, drop)
        scaled = scaled.masked_fill(mask, float("-inf"))
    probs = scaled.softmax(-1)
    if any(p.min_p > 0 for p in params):
        floor = torch.tensor([p.min_p for p in params])[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    # Exp(1) noise as -log(U): the same distribution as Tensor.exponential_, whose CPU kernel was the largest
    # single cost of an RL rollout's generation at a 4,096-token vocabulary (docs/PERFORMANCE.md, "RL")
    noise = torch.stack([torch.rand(V, generator=g) for g in generators]).log_().neg_()
    sampled = (probs / noise).argmax(-1)
    return [int(best[i]) if p.greedy else int(sampled[i]) for i, p in enumerate(params)]
