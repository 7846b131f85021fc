"""The `generate` command: one prompt's continuation (or, with --chat, an assistant reply), printed.

It runs the server's engine in-process, so the same prompt, settings and seed
give the same text here, in `glassforge chat` and from the HTTP API: one
tokenizer, one decode path, one sampler (`model.sampling`). The engine's
background compile is off, as a single prompt would not wait for it.
"""

from __future__ import annotations

from pathlib import Path

from glassforge.serve.engine import Engine
from glassforge.serve.types import SamplingParams
from glassforge.tokenizer.bpe import render_chat


def generate(path: Path | str, prompt: str, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None, chat: bool = False, top_p: float = 1.0, top_k: int = 0) -> str:
    """Generate a continuation of prompt (or, with chat=True, an assistant reply to it)."""
    engine = Engine(path, max_batch=1, compile_decode=False)
    try:
        text = render_chat([{"role": "user", "content": prompt}], True, engine.chat_template) if chat else prompt
        ids = engine.encode(text)
        params = SamplingParams(max_tokens=max(1, min(max_tokens, engine.max_context - len(ids))),
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        engine.check_request(ids, params)
        return engine.generate(ids, params)[0].text
    finally:
        engine.close()
