"""The `generate` command: text from a release, one prompt at a time, with a KV cache.

The prompt is prefilled in one forward pass; each new token then costs one
single-position pass over the cache. Sampling: temperature 0 is greedy;
otherwise softmax sampling with optional top-k and top-p, from a generator
seeded per request, so a seed reproduces its output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glassforge.errors import UserError
from glassforge.model import KVCache, Llama


def resolve_release(path: Path | str) -> Path:
    """A run folder or its release/: the folder that holds the model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    for candidate in (path, path / "release"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(f"{path}: holds no model (no release/ with config.json and model.safetensors); "
                    f"run `glassforge build` first")


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model: Llama, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_ids: set[int] | None = None):
    """Yield generated token ids one by one."""
    cfg = model.cfg
    if not prompt_ids:
        raise UserError("the prompt is empty")
    total = min(cfg.max_seq_len, len(prompt_ids) + max_tokens)
    if len(prompt_ids) >= cfg.max_seq_len:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {cfg.max_seq_len}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(cfg, 1, total)
    slots = torch.zeros(1, dtype=torch.long)
    ids = torch.tensor([prompt_ids])
    positions = torch.arange(len(prompt_ids))[None]
    for _ in range(total - len(prompt_ids)):
        logits = model.forward_cached(ids, positions, cache, slots)[:, -1]
        nxt = sample(logits, temperature, top_k, top_p, gen)
        token = int(nxt[0])
        yield token
        if stop_ids and token in stop_ids:
            return
        ids = nxt[:, None]
        positions = positions[:, -1:] + 1


def generate(path: Path | str, prompt: str, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None, chat: bool = False) -> str:
    """Generate a continuation of prompt (or, with chat=True, an assistant reply to it)."""
    from glassforge.tokenizer import END, ENDOFTEXT, chat_template_of, load_tokenizer, render_chat

    folder = resolve_release(path)
    model = Llama.from_pretrained(folder)
    tok = load_tokenizer(folder)
    text = render_chat([{"role": "user", "content": prompt}], True, chat_template_of(folder)) if chat else prompt
    ids = tok.encode(text, add_special_tokens=False).ids
    stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
    out = [t for t in generate_ids(model, ids, max_tokens, temperature, seed=seed, stop_ids=stop) if t not in stop]
    return tok.decode(out)
