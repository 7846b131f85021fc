"""`glassforge chat`: a streaming chat with a release in the terminal.

It runs the same engine as the server in-process (no HTTP, no browser), renders
the conversation with the release's chat template and prints the reply as it is
generated. Commands: `/reset` forgets the conversation, `/exit` (or Ctrl-D)
quits. When the conversation no longer fits the context, the oldest turns are
dropped (the system message, if any, is kept) rather than failing.
"""

from __future__ import annotations

import queue
import sys
from pathlib import Path
from typing import IO

from glassforge.serve.engine import Engine
from glassforge.serve.types import Event, SamplingParams
from glassforge.tokenizer.bpe import render_chat


def fit_conversation(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest non-system turns until prompt + max_tokens fits; return them and the prompt ids."""
    messages = list(messages)
    while True:
        ids = engine.encode(render_chat(messages, True, engine.chat_template))
        if len(ids) + max_tokens <= engine.max_context:
            return messages, ids
        drop = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
        if drop is None:  # only the newest message is left: trim the reply budget instead
            return messages, ids[-max(engine.max_context - max_tokens, 1):]
        del messages[drop]


def reply(engine: Engine, messages: list[dict], temperature: float, max_tokens: int, out: IO[str], *,
          top_p: float = 1.0, seed: int | None = None) -> str:
    """Stream one assistant reply to out; return its text (the same as the server's for the same settings)."""
    max_tokens = max(1, min(max_tokens, engine.max_context - 1))
    messages[:], ids = fit_conversation(engine, messages, max_tokens)
    max_tokens = min(max_tokens, engine.max_context - len(ids))
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    q: queue.SimpleQueue[Event] = queue.SimpleQueue()
    seqs = engine.submit([(0, ids, params)], q.put)
    text = ""
    try:
        while True:
            ev = q.get()
            if ev.error:
                raise RuntimeError(ev.error)
            out.write(ev.text)
            out.flush()
            text += ev.text
            if ev.finish_reason:
                return text
    except KeyboardInterrupt:
        engine.cancel(seqs)
        return text


def chat(run: Path | str, temperature: float = 0.7, max_tokens: int = 256,
         stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """Read user turns from stdin, stream replies to stdout, until /exit or end of input."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    engine = Engine(run, max_batch=1)
    interactive = stdin.isatty()
    messages: list[dict] = []
    try:
        if interactive:
            print(f"glassforge chat with {engine.folder} (/reset to start over, /exit or Ctrl-D to quit)", file=stdout)
        while True:
            if interactive:
                stdout.write("\n> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                messages.clear()
                continue
            messages.append({"role": "user", "content": line})
            text = reply(engine, messages, temperature, max_tokens, stdout)
            stdout.write("\n")
            stdout.flush()
            messages.append({"role": "assistant", "content": text})
    finally:
        engine.close()
