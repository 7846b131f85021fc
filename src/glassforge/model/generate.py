"""Generation with the model's own forward and a KV cache: for evaluation and for RL's rollouts.

A batch of prompts is prefilled into one cache row each (prompts of one length
in one forward), then every row decodes one token per step together, each at
its own position. The rows still decoding keep cache slots 0..n-1 (a
finished row's slot takes the last live row's keys and values), so each layer
reads them as a view of the cache instead of gathering every key at every step.
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
    order = list(range(B)) if max_tokens > 0 else []  # order[i]: the live row whose keys are in cache slot i
    while order:
        for b, tok in zip(order, sample(logits, [sampling] * len(order), [generators[b] for b in order])):
            out[b].append(tok)
        # A finished row's slot takes the last live row's keys and values: the live rows keep filling slots
        # 0..n-1, so every layer reads them as a view of the cache (CacheStep.rows) instead of gathering them
        # at every step, for one row copied per finished row.
        written = max(len(prompts[b]) + len(out[b]) - 1 for b in order)
        for i in reversed(range(len(order))):
            b = order[i]
            if out[b][-1] in stop_ids or len(out[b]) >= budget[b]:
                if i != len(order) - 1:
                    for kv in (cache.k, cache.v):
                        kv[:, i, :, :written] = kv[:, len(order) - 1, :, :written]
                    order[i] = order[-1]
                order.pop()
        if not order:
            break
        idx = torch.tensor([[out[b][-1]] for b in order])
        positions = torch.tensor([[len(prompts[b]) + len(out[b]) - 1] for b in order])
        logits, _ = model(idx, cache=cache, positions=positions, slots=torch.arange(len(order)))
        logits = logits[:, -1]
    return out


def generate_ids(model: Llama, prompt_ids: list[int], max_tokens: int, sampling: Sampling | None = None,
                 seed: int | None = None, stop_ids: set[int] | frozenset = frozenset()) -> list[int]:
    """One prompt's generated ids (a stop id, if reached, is the last one)."""
    return generate_batch(model, [prompt_ids], max_tokens, sampling, [seed], stop_ids)[0]
