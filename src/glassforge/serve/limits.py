"""What one request may ask of the server, and where its long work runs: so no request can take it down.

Measured on the server before these limits (issue 18): three 6 MiB traces took it from 406 MiB to a 9.7 GB
peak, a 6 MB prompt was tokenized on the event loop for 3.6 s before its 400, 5,000 embedding inputs held
a chat request for 12 s. So:

- `Limits` bounds what a request may ask for: characters of text to tokenize, trace or embed, inputs in
  one embeddings batch, stop strings and their length, the body and how long it may take to arrive. Each
  is a `glassforge serve` flag (`FLAGS`) and a `create_app` parameter, and each is checked before any
  work, as an OpenAI-shaped 400 naming the field, the limit and the flag (serving.py).
- `Work` runs the long work (tokenizing long text, tracing, compiling a grammar) on a few threads of its
  own: off the event loop, so `/health` and other clients keep answering; never more than `work_threads`
  at once, so eight grammars cost two cores, not sixteen. Text below `INLINE_CHARS` is tokenized where it
  stands: a thread hop would cost more than the work. Every tokenizer, trace and grammar call of the
  library releases the GIL while it works, which is what makes the threads worth having.
- glibc keeps freed memory in its per-thread arenas, so after a large request the process stayed
  gigabytes above its baseline; `Work` hands it back (`malloc_trim`) after work on large inputs.

The CLI imports this module to build `glassforge serve --help` from `FLAGS` and `HELP`, so what only the
server needs (asyncio, the thread pool, ctypes) is imported where it is used: asyncio alone would add
40 ms to every `glassforge` command.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable, TypeVar

from glassforge.core.errors import UserError

T = TypeVar("T")

#: Text shorter than this is tokenized on the event loop (well under a millisecond).
INLINE_CHARS = 4096
#: Work on at least this many characters gives its freed memory back to the system afterwards.
TRIM_CHARS = 1 << 16

#: The `glassforge serve` flag of each limit, named in the errors that enforce it.
FLAGS = {"max_body_bytes": "--max-body-bytes", "max_text_chars": "--max-text-chars",
         "max_trace_chars": "--max-trace-chars", "max_embedding_inputs": "--max-embedding-inputs",
         "max_stop_strings": "--max-stop-strings", "max_stop_chars": "--max-stop-chars",
         "request_timeout": "--request-timeout", "work_threads": "--work-threads"}
#: What each flag bounds, for --help.
HELP = {"max_body_bytes": "largest request body in bytes, else 413",
        "max_text_chars": "characters of text one request may ask to tokenize: prompts, messages, embedding "
                          "inputs, /tokenize; also ids to /detokenize",
        "max_trace_chars": "characters of text one POST /v1/trace may trace",
        "max_embedding_inputs": "inputs in one embeddings request",
        "max_stop_strings": "stop strings in one request", "max_stop_chars": "characters of each stop string",
        "request_timeout": "seconds a request's headers may take to arrive, and then its body, else 408",
        "work_threads": "threads for long tokenizing, tracing and grammar compiling, off the event loop"}


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for. The defaults fit the 8 MiB body with room to spare: at the text
    limit, tokenizing takes about 0.2 s and 70 MB on the reference machine, at the trace limit tracing
    0.15 s and 30 MB."""

    max_body_bytes: int = 8 << 20  # the request body, however it is sent (413 beyond)
    max_text_chars: int = 1 << 18  # characters one request asks to tokenize: prompts, messages, inputs
    max_trace_chars: int = 1 << 16  # characters of text in one POST /v1/trace
    max_embedding_inputs: int = 2048  # inputs in one embeddings request (OpenAI's limit)
    max_stop_strings: int = 64
    max_stop_chars: int = 1024  # characters of each stop string
    request_timeout: float = 30.0  # seconds for a request's headers to arrive, then as many for its body
    work_threads: int = 2  # long tokenizing, tracing and grammar compiling at once

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{FLAGS[f.name]} {value}: must be a positive number")


@functools.lru_cache(maxsize=1)
def _trim_function() -> Callable[[], object] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return functools.partial(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim, 0)
    except (OSError, AttributeError):
        return None


def give_back_memory() -> None:
    """Return the memory freed in every malloc arena to the system (ctypes drops the GIL meanwhile)."""
    trim = _trim_function()
    if trim is not None:
        trim()


class Work:
    """A few threads for long CPU work, off the event loop; at most `threads` jobs run at once."""

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="glassforge-work")

    async def run(self, fn: Callable[[], T], size: int | None = None) -> T:
        """fn() where it costs the event loop least: inline when size (characters of input) is small, else
        on the pool (always, when size is None), giving freed memory back after a large job."""
        import asyncio

        if size is not None and size < INLINE_CHARS:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._job, fn, size)

    @staticmethod
    def _job(fn: Callable[[], T], size: int | None) -> T:
        try:
            return fn()
        finally:
            if size is None or size >= TRIM_CHARS:
                give_back_memory()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
