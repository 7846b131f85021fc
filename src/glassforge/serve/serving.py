"""What the OpenAI routes share: one request's way into the engine and its answer back, streamed or whole.

`Server` holds the engine, the model's name, the metrics and the trace index,
and does for every route what must be done once and alike:

- **One context check.** `check_prompt` asks the engine's `check_prompt` (the
  prompt plus `max_tokens` must fit the context; `max_tokens` 0 for
  embeddings and scoring) and turns a refusal into a 400
  `context_length_exceeded` naming the parameter.
- **One missing-trace error.** A release without a trace index (no
  release/trace/) answers 400 `invalid_request_error`, code
  `trace_unavailable`, wherever tracing is asked for: `POST /v1/trace` and
  `trace: true` on a completion alike. 400 rather than 404: the route exists
  and the request is well formed; what it asks for is something this release
  cannot do, which is how OpenAI answers a feature a model lacks.
- **One stream.** `stream` is the server-sent-events generator of completions
  and chat both; an API differs only in how an event becomes a `choices`
  entry (its `Choices`). A role chunk where the API has one, content deltas,
  one final chunk per choice carrying `finish_reason`, a usage chunk with
  `choices: []` when `stream_options.include_usage` is set (and `usage: null`
  on every other chunk then), then `data: [DONE]`. All chunks share one `id`
  and `created`. An error after the stream started is a
  `data: {"error": ...}` event, and the stream ends without `[DONE]`.
- **Few wake-ups.** Events reach the event loop through a `Delivery`: a
  stream's first and last events go out at once, those between at most every
  `--stream-interval-ms` (10 ms), several tokens to a chunk when the engine is
  faster; waking the event loop for every token cost a third of one stream's
  speed, the engine thread waiting on the GIL meanwhile (docs/PERFORMANCE.md).
- A client that disconnects cancels its sequences, so its cache slot is free
  before the next decode step. A full queue is a 429 with `Retry-After`.
- **Bounded work, off the event loop.** The routes check a request's sizes
  against `Limits` before any work (`Server.check_text`, `check_count`,
  `stop_list`: a 400 naming the field, the limit and its flag), then
  tokenize long text, trace and build grammar matchers on `Work`'s threads
  (limits.py), so the event loop keeps answering `/health` and other clients.
  An error in a sequence names the request's id (the Guard's, guard.py),
  never the exception, which goes to the log.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import threading
import time
from typing import Any, AsyncIterator, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glassforge.core.errors import UserError
from glassforge.core.runfolder import Release
from glassforge.release.trace import Tracer
from glassforge.serve.engine import Engine
from glassforge.serve.sequence import Sequence
from glassforge.serve.limits import FLAGS, Limits, Work
from glassforge.serve.metrics import Metrics
from glassforge.serve.protocol import APIError, ChatMessage, Prompt, SamplingFields, Stop, error_body
from glassforge.serve.types import ContextTooLong, Event, QueueFull, SamplingParams, internal_error_message
from glassforge.tokenizer.bpe import render_chat

# a stream's events reach the event loop at most this often (its first and last at once): below what a
# reader can see, and each wake-up of the loop costs the engine thread its GIL time (docs/PERFORMANCE.md)
STREAM_INTERVAL_MS = 10.0
MAX_SEQUENCES_PER_REQUEST = 64
NO_TRACE_INDEX = "this release has no trace index (no release/trace/ folder)"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger("glassforge.serve")


def stream_interval_seconds(ms: float | None) -> float:
    """The stream interval in seconds from --stream-interval-ms, else $GLASSFORGE_STREAM_INTERVAL_MS, else
    STREAM_INTERVAL_MS."""
    if ms is None:
        text = os.environ.get("GLASSFORGE_STREAM_INTERVAL_MS", "").strip()
        try:
            ms = float(text) if text else STREAM_INTERVAL_MS
        except ValueError:
            raise UserError(f"GLASSFORGE_STREAM_INTERVAL_MS={text!r}: not a number of milliseconds") from None
    if not 0 <= ms <= 1000:
        raise UserError(f"--stream-interval-ms {ms:g}: must be 0..1000")
    return ms / 1000


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def json_answer(body: dict) -> JSONResponse:
    """A whole JSON answer, serialised by json.dumps (in C). A dict returned from a route goes through FastAPI's
    jsonable_encoder, which walks every value in Python on the event loop: 125 ms for the 110,000 ids of one
    /tokenize at the text limit (json.dumps: 17 ms), while /health waited."""
    return JSONResponse(body)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: the prompt tokens the prefix cache served (prefix.py)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def too_long(param: str, got: int, limits: Limits, name: str, what: str) -> APIError:
    """The 400 for a field over one of `Limits`: OpenAI's wording and codes, plus the flag that sets it."""
    limit = getattr(limits, name)
    kind, code = ("string", "string_above_max_length") if what == "characters" else ("array", "array_above_max_length")
    return APIError(400, f"Invalid '{param}': {kind} too long. Expected at most {limit} {what}, but got {got} "
                         f"(this server's limit: glassforge serve {FLAGS[name]}).", param=param, code=code)


def stop_list(stop: Stop, limits: Limits) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > limits.max_stop_strings:
        raise too_long("stop", len(stops), limits, "max_stop_strings", "stop strings")
    for i, s in enumerate(stops):
        if len(s) > limits.max_stop_chars:
            raise too_long("stop" if isinstance(stop, str) else f"stop.{i}", len(s), limits, "max_stop_chars",
                           "characters")
    return [s for s in stops if s]


def prompt_list(prompt: Prompt, param: str) -> list[str | list[int]]:
    """A prompt field's prompts: one string, one list of ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, f"'{param}' is empty", param=param)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def message_texts(messages: list[ChatMessage]) -> list[str]:
    """The text of each message's content (what the limit on text counts)."""
    return [m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or []) for m in messages]


def render_messages(engine: Engine, messages: list[ChatMessage], add_generation_prompt: bool,
                    tools: list[dict] | None = None) -> str:
    """Chat messages (and the tools they may call) as the prompt text the release's chat template makes."""
    if tools and "tools" not in engine.chat_template:
        raise APIError(400, "this release's chat template does not render tools (it was made before glassforge "
                            "had tool calling); rebuild the release to use 'tools'", param="tools")
    plain = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        elif content is None:
            message["content"] = ""
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        plain.append(message)
    try:
        return render_chat(plain, add_generation_prompt, engine.chat_template, tools)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # a template error is the template's, reported as such
        raise APIError(400, f"chat template failed: {e}", param="messages") from None


class Delivery:
    """One request's events, from the engine thread to the request's coroutine.

    One wake-up of the event loop per batch of events, not per event: while the loop has not yet run
    `_deliver`, the engine thread only appends (no self-pipe write, no extra loop turn), and the stream
    then folds what arrived into one chunk (`next_merged`). And at most one wake-up per interval, but
    for a request's first and last events: each wake-up holds the GIL for a while, which the engine
    thread waits out between its steps (docs/PERFORMANCE.md). Events held back go with the sequence's
    next one, which always comes (the finish at the latest); a step that adds no text and no log-probs
    sends none, so a held event can wait longer than the interval.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float):
        self.loop, self.interval = loop, interval
        self.arrived: collections.deque[Event] = collections.deque()  # appended on the engine thread
        self.ready: collections.deque[Event] = collections.deque()  # moved here, and read, on the loop
        self.scheduled = False
        self.last_wake = -math.inf
        self.woken = asyncio.Event()
        self.failure: APIError | None = None

    def sink(self, ev: Event) -> None:
        """The engine's callback (engine thread)."""
        self.arrived.append(ev)
        if not self.scheduled:
            now = time.monotonic()
            if now - self.last_wake >= self.interval or ev.finish_reason or ev.error:
                self.scheduled = True
                self.last_wake = now
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self.scheduled = False  # before draining: an event appended from now on schedules a new call
        while self.arrived:
            self.ready.append(self.arrived.popleft())
        self.woken.set()

    def fail(self, error: APIError) -> None:
        """Make the waiting coroutine raise error (event loop; the client went away)."""
        self.failure = error
        self.woken.set()

    async def get(self) -> Event:
        while True:
            if self.failure is not None:
                raise self.failure
            if self.ready:
                return self.ready.popleft()
            self.woken.clear()
            await self.woken.wait()

    async def next_merged(self) -> Event:
        """The next event, with its choice's events already waiting folded in: one SSE chunk, not many.

        When clients or the network are slower than the engine, this keeps the number of chunks (and their
        JSON) from growing with the backlog. Only the same choice's events are folded, and never past a
        finish or an error.
        """
        ev = await self.get()
        if ev.error or ev.finish_reason:
            return ev
        while self.ready:
            nxt = self.ready[0]
            if nxt.index != ev.index or nxt.error or nxt.prompt_logprobs is not None:
                break
            self.ready.popleft()
            if ev.absorb(nxt):
                break
        return ev


class Choices(Protocol):
    """How one API turns engine events into entries of `choices` (completions and chat differ only here)."""

    object: str  # the whole answer's "object"
    chunk_object: str  # a stream chunk's

    def opening(self) -> list[dict]:
        """Choices streamed before any event (chat's role chunks)."""

    def delta(self, ev: Event) -> dict | None:
        """A stream chunk's choice for what ev adds; None when it adds nothing to send."""

    def final(self, index: int, finish_reason: str) -> dict:
        """The stream chunk that ends one choice."""

    def whole(self, ev: Event) -> dict:
        """One choice of a whole (not streamed) answer, from its merged event."""


class Server:
    """State shared by the routes: the engine, its name, the metrics, the tracer."""

    def __init__(self, engine: Engine, model_name: str, stream_interval: float = 0.0,
                 metrics: Metrics | None = None, limits: Limits | None = None):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or Limits()
        self.work = Work(self.limits.work_threads)
        self.stream_interval = stream_interval  # seconds: streamed events reach the event loop at most this often
        self.metrics = metrics or Metrics(model_name)
        self.created = int(time.time())
        self._tracer = None
        self._tracer_lock = threading.Lock()

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], max_tokens: int, param: str) -> None:
        """The engine's one context (and vocabulary) check, as OpenAI-shaped 400s naming param."""
        try:
            self.engine.check_prompt(ids, max_tokens)
        except ContextTooLong as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except UserError as e:
            raise APIError(400, str(e), param=param) from None

    def tracer(self, param: str | None) -> Tracer:
        """The release's trace index, loaded once; the one missing-index error (400) where it has none."""
        if not Release(self.engine.folder).trace_index.is_file():
            raise APIError(400, NO_TRACE_INDEX, param=param, code="trace_unavailable")
        with self._tracer_lock:
            if self._tracer is None:
                try:
                    self._tracer = Tracer(Release(self.engine.folder).trace)
                except (UserError, OSError, ValueError) as e:
                    raise APIError(500, f"the release's trace index cannot be used: {e}", "server_error",
                                   code="trace_unavailable") from None
        return self._tracer

    async def trace_text(self, text: str, min_tokens: int = 8, max_docs: int = 5, param: str | None = "trace") -> dict:
        tracer = self.tracer(param)
        return await self.work.run(lambda: tracer.trace(text, min_tokens, max_docs))

    async def encode(self, text: str) -> list[int]:
        """Token ids of text, off the event loop when it is long (its size was checked by the route)."""
        return await self.work.run(lambda: self.engine.encode(text), len(text))

    def check_text(self, param: str, texts: list[str], name: str = "max_text_chars") -> int:
        """The characters of a request's texts (returned), checked against a limit before they are tokenized."""
        n = sum(len(t) for t in texts)
        self.check_count(param, n, name, "characters")
        return n

    def check_count(self, param: str, n: int, name: str, what: str) -> None:
        if n > getattr(self.limits, name):
            raise too_long(param, n, self.limits, name, what)

    def params(self, req: SamplingFields, max_tokens: int, logprobs: int | None,
               prompt_logprobs: int | None = None) -> SamplingParams:
        bias: dict[int, float] = {}
        for k, v in (req.logit_bias or {}).items():
            try:
                tid = int(k)
            except ValueError:
                raise APIError(400, f"logit_bias key {k!r} is not a token id", param="logit_bias") from None
            if not 0 <= tid < self.engine.vocab_size:
                raise APIError(400, f"logit_bias token id {tid} is outside the vocabulary", param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias value {v} is outside -100..100", param="logit_bias")
            bias[tid] = float(v)
        if req.top_k is not None and req.top_k > self.engine.vocab_size:
            raise APIError(400, f"Invalid 'top_k': {req.top_k} is more than the {self.engine.vocab_size} tokens of "
                                f"the vocabulary (0 or -1: all of them)", param="top_k", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            stop=stop_list(req.stop, self.limits),
            ignore_eos=bool(req.ignore_eos),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    async def submit(self, request: Request, requests: list[tuple[int, list[int], SamplingParams]],
                     grammar_param: str = "response_format") -> tuple[Delivery, list[Sequence]]:
        """Queue the sequences of one request (its route has passed them through check_prompt), their grammar
        matchers built on the work threads; their events come through the returned Delivery."""
        matchers = None
        grammar = requests[0][2].grammar
        if grammar is not None:  # the route's choices share one params, so one grammar
            try:
                matchers = await self.work.run(lambda: self.engine.grammars.matchers(grammar, len(requests)))
            except UserError as e:
                raise APIError(400, f"{grammar_param}: {e}", param=grammar_param) from None
        delivery = Delivery(asyncio.get_running_loop(), self.stream_interval)
        try:
            seqs = self.engine.submit(requests, delivery.sink, matchers, request_id(request))
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        return delivery, seqs

    async def answer(self, request: Request, req: SamplingFields, requests: list, base: dict,
                     prompt_tokens: int, choices: Choices, grammar_param: str = "response_format"
                     ) -> JSONResponse | StreamingResponse:
        """Run a request's sequences: a stream when it asked for one, else the whole answer."""
        delivery, seqs = await self.submit(request, requests, grammar_param)
        if req.stream:
            return self.stream({**base, "object": choices.chunk_object}, choices, req.include_usage,
                               prompt_tokens, bool(req.trace), delivery, seqs, len(requests), request_id(request))
        merged = await self.collect(request, delivery, seqs, len(requests))
        self.metrics.observe_finished(seqs)
        out = []
        for i in range(len(requests)):
            choice = choices.whole(merged[i])
            if req.trace:
                choice["trace"] = await self.trace_text(merged[i].text)
            out.append(choice)
        completion_tokens = sum(ev.completion_tokens for ev in merged.values())
        cached_tokens = sum(ev.cached_tokens for ev in merged.values())  # a prompt's first choice carries it
        return json_answer({**base, "object": choices.object, "choices": out,
                            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})

    async def collect(self, request: Request, delivery: Delivery, seqs: list[Sequence],
                      count: int) -> dict[int, Event]:
        """Wait for every sequence to finish (non-streaming), cancelling at once if the client leaves."""
        async def watch_disconnect():
            # After the body is read, receive() returns only when the client goes away.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.engine.cancel(seqs)
            delivery.fail(APIError(499, "client disconnected"))

        watcher = asyncio.create_task(watch_disconnect())
        merged: dict[int, Event] = {}
        finished = 0
        try:
            while finished < count:
                ev = await delivery.get()
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                finished += merged.setdefault(ev.index, Event(index=ev.index)).absorb(ev)
        except BaseException:
            self.engine.cancel(seqs)
            raise
        finally:
            watcher.cancel()
        return merged

    def stream(self, base: dict, choices: Choices, include_usage: bool, prompt_tokens: int, trace: bool,
               delivery: Delivery | None = None, seqs: list[Sequence] | None = None,
               count: int = 0, rid: str = "") -> StreamingResponse:
        """The one server-sent-events stream: choices.opening(), then count sequences' events, usage, [DONE]."""
        extra = {"usage": None} if include_usage else {}
        seqs = seqs or []

        async def chunks() -> AsyncIterator[str]:
            texts: dict[int, str] = collections.defaultdict(str)
            completion_tokens = cached_tokens = finished = 0
            try:
                for choice in choices.opening():
                    yield sse({**base, "choices": [choice], **extra})
                while finished < count:
                    ev = await delivery.next_merged()
                    if ev.error:
                        raise APIError(500, ev.error, "server_error")
                    texts[ev.index] += ev.text
                    choice = choices.delta(ev)
                    if choice is not None:
                        yield sse({**base, "choices": [choice], **extra})
                    if ev.finish_reason:
                        finished += 1
                        completion_tokens += ev.completion_tokens
                        cached_tokens += ev.cached_tokens
                        choice = choices.final(ev.index, ev.finish_reason)
                        if trace:
                            choice["trace"] = await self.trace_text(texts[ev.index])
                        yield sse({**base, "choices": [choice], **extra})
                self.metrics.observe_finished(seqs)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens,
                                                                           cached_tokens)})
                yield "data: [DONE]\n\n"
            except APIError as e:  # the stream has started: report in band
                yield sse(e.body())
            except Exception:  # likewise, the details only in the log
                log.exception("glassforge serve: request %s failed mid-stream", rid or "-")
                yield sse(error_body(internal_error_message(rid), "server_error", code="internal_error"))
            finally:
                self.engine.cancel(seqs)

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=SSE_HEADERS)


def request_id(request: Request) -> str:
    """The id the Guard gave this request (guard.py): in its error messages, its X-Request-Id and the log."""
    return getattr(request.state, "request_id", "")


def server_of(request: Request) -> Server:
    """The routes' dependency: the `Server` that create_app put on the app."""
    return request.app.state.server
