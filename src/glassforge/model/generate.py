"""Generation with the model's own forward and a KV cache: for evaluation and for RL's rollouts.

A batch of prompts is prefilled into one cache row each (prompts of one length
in one forward), then every row decodes one token per step together, each at
its own position.
Tokens are chosen by the one sampler (`sampling.py`), each row with its own
generator, so a row's draws do not depend on what else shares its batch
(tests/test_model.py checks that a batch gives each prompt what it gets alone).
The server has its own faster decode path (serve/fastpath.py), built from the
same weights and tested against this forward.
"""

from __future__ import annotations

import torch

from glassforge.core.errors import UserError
from glassforge.model.llama import KVCache, Llama
from glassforge.model.sampling import Sampling, generator_for, sample


@torch.inference_mode()
def generate_batch(model: Llama, prompts: list[list[int]], max_tokens: int, sampling: Sampling | None = None,
                   seeds: list[int | None] | None = None, stop_ids: set[int] | frozenset = frozenset()
                   ) -> list[list[int]]:
    """For each prompt, up to max_tokens generated ids (a stop id ends a row and is kept as its last id)."""
    cfg = model.cfg
    sampling = sampling or Sampling(temperature=0.0)
    if not prompts:
        return []
    for ids in prompts:
        if not ids:
            raise UserError("the prompt is empty")
        if len(ids) >= cfg.max_seq_len:
            raise UserError(f"the prompt has {len(ids)} tokens; the model's context is {cfg.max_seq_len}")
    B = len(prompts)
    seeds = seeds if seeds is not None else [None] * B
    generators = [generator_for(seed, 0) for seed in seeds]
    budget = [min(max_tokens, cfg.max_seq_len - len(ids)) for ids in prompts]
    length = max(len(ids) + n for ids, n in zip(prompts, budget))  # no longer than the longest row needs
    cache = KVCache(cfg, B, length, dtype=next(model.parameters()).dtype)
    # Prompts of one length prefill in one forward (an RL prompt's group of samples, most of an evaluation
    # batch), not one forward each.
    by_length: dict[int, list[int]] = {}
    for b, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(b)
    last: list[torch.Tensor] = [torch.empty(0)] * B
    for n, rows in by_length.items():
        logits, _ = model(torch.tensor([prompts[b] for b in rows]), cache=cache,
                          positions=torch.arange(n).expand(len(rows), n), slots=torch.tensor(rows))
        for b, row_logits in zip(rows, logits[:, -1]):
            last[b] = row_logits
    logits = torch.stack(last)
    out: list[list[int]] = [[] for _ in prompts]
    live = [b for b in range(B) if budget[b] > 0]
    while live:
        tokens = sample(logits, [sampling] * len(live), [generators[b] for b in live])
        still = []
        for b, tok in zip(live, tokens):
            out[b].append(tok)
            if tok not in stop_ids and len(out[b]) < budget[b]:
                still.append(b)
        live = still
        if not live:
            break
        idx = torch.tensor([[out[b][-1]] for b in live])
        positions = torch.tensor([[len(prompts[b]) + len(out[b]) - 1] for b in live])
        logits, _ = model(idx, cache=cache, positions=positions, slots=torch.tensor(live))
        logits = logits[:, -1]
    return out


def generate_ids(model: Llama, prompt_ids: list[int], max_tokens: int, sampling: Sampling | None = None,
                 seed: int | None = None, stop_ids: set[int] | frozenset = frozenset()) -> list[int]:
    """One prompt's generated ids (a stop id, if reached, is the last one)."""
    return generate_batch(model, [prompt_ids], max_tokens, sampling, [seed], stop_ids)[0]
