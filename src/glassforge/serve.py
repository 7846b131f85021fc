"""`glassforge serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`,
`POST /v1/embeddings`, `POST /v1/trace`, the tokenizer routes that
lm-evaluation-harness probes (`/tokenize`, `/detokenize`, `/tokenizer_info`),
`GET /health` and `GET /metrics` (Prometheus text format).

Choices that clients depend on:

- Request bodies are pydantic models with `extra="forbid"`: a parameter we do
  not implement (tools, suffix, audio, ...) is a 400 that names it, never
  silently ignored. Wrong types or out-of-range values are 400s naming the
  parameter too, as OpenAI answers them; only a body that is not JSON at all is
  a 422. Every error body is OpenAI's `{"error": {message, type, param, code}}`.
- With an API key, every route but `/health` and the schema (`/openapi.json`,
  `/docs`) needs `Authorization: Bearer KEY`, compared in constant time; the
  Host header plays no part. Without a key any key is accepted (the openai
  client refuses to start without one).
- Streams are Server-Sent Events: a role chunk (chat), content deltas, one
  final chunk per choice carrying `finish_reason`, a usage chunk with
  `choices: []` when `stream_options.include_usage` is set (and `usage: null`
  on every other chunk then), then `data: [DONE]`. All chunks share one `id`
  and `created`. An error after the stream started is a `data: {"error": ...}`
  event. A stream's first and last chunks go out at once, and those between
  at most every `--stream-interval-ms` (10 ms), several tokens to a chunk when
  the engine is faster: waking the event loop for every token cost a third of
  one stream's speed, the engine thread waiting on the GIL meanwhile.
- A client that disconnects cancels its sequences, so its cache slot is free
  before the next decode step. A full queue is a 429 with `Retry-After`; a
  prompt plus `max_tokens` beyond the context is a 400 `context_length_exceeded`.
- Completions `echo` with `logprobs` returns prompt log-probs (first entry
  null) in the legacy shape, and the sampled token is always in
  `top_logprobs`, so lm-evaluation-harness's log-likelihood and greedy checks
  work; `max_tokens: 0` with echo scores the prompt only.
- `response_format` json_object/json_schema is constrained decoding with
  llguidance (a small Rust library that builds its token tables offline from
  our tokenizer.json): at each step only tokens that keep the output a valid
  prefix of the schema are allowed, and the reply ends when the JSON is
  complete. Without llguidance installed it is a 400 naming the parameter.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import math
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassforge.engine import ContextTooLong, Engine, Event, QueueFull, SamplingParams, TokenLogprob
from glassforge.errors import UserError
from glassforge.web import is_public_path

MAX_BODY_BYTES = 8 << 20
# a stream's events reach the event loop at most this often (its first and last at once): below what a
# reader can see, and each wake-up of the loop costs the engine thread its GIL time (docs/PERFORMANCE.md)
STREAM_INTERVAL_MS = 10.0
MAX_SEQUENCES_PER_REQUEST = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# --- request bodies ----------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool | None = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Prompt = Union[str, list[str], list[int], list[list[int]]]
Stop = Union[str, list[str], None]


class SamplingFields(Strict):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension: sample from the k most likely tokens (0 or -1: all)")
    n: int | None = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Stop = Field(None, description="a string or a list of strings, excluded from the output")
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(False, description="extension: keep generating past end-of-text tokens")
    trace: bool | None = Field(False, description="extension: add the training-data spans found in each choice")


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=16)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class EmbeddingRequest(Strict):
    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class TokenizeRequest(Strict):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = False
    add_generation_prompt: bool | None = True
    model: str | None = None


class DetokenizeRequest(Strict):
    tokens: list[int]
    model: str | None = None


class TraceRequest(Strict):
    text: str
    min_tokens: int | None = Field(8, ge=1, le=4096)
    max_docs: int | None = Field(5, ge=1, le=100)
    model: str | None = None


# --- metrics -----------------------------------------------------------------------------

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(LATENCY_BUCKETS):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(LATENCY_BUCKETS, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.total}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.in_flight = 0

    def record(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            self.latency.setdefault(path, Histogram()).observe(seconds)

    def render(self, engine: Engine) -> str:
        s = engine.stats
        lines = [
            "# HELP glassforge_requests_total HTTP requests by route and status.",
            "# TYPE glassforge_requests_total counter",
        ]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'glassforge_requests_total{{route="{path}",status="{status}"}} {n}')
            lines += ["# HELP glassforge_request_duration_seconds Time from request to the last byte of the answer.",
                      "# TYPE glassforge_request_duration_seconds histogram"]
            for path, h in sorted(self.latency.items()):
                lines += h.lines("glassforge_request_duration_seconds", f'route="{path}"')
            lines += ["# HELP glassforge_time_to_first_token_seconds Time from submission to the first token.",
                      "# TYPE glassforge_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("glassforge_time_to_first_token_seconds")
        lines += [
            "# HELP glassforge_prompt_tokens_total Prompt tokens prefilled.",
            "# TYPE glassforge_prompt_tokens_total counter",
            f"glassforge_prompt_tokens_total {s['prompt_tokens']}",
            "# HELP glassforge_generation_tokens_total Tokens generated.",
            "# TYPE glassforge_generation_tokens_total counter",
            f"glassforge_generation_tokens_total {s['completion_tokens']}",
            "# HELP glassforge_queue_depth Sequences waiting for a cache slot.",
            "# TYPE glassforge_queue_depth gauge",
            f"glassforge_queue_depth {engine.queue_depth}",
            "# HELP glassforge_running_sequences Sequences in the running batch.",
            "# TYPE glassforge_running_sequences gauge",
            f"glassforge_running_sequences {engine.batch_size}",
            "# HELP glassforge_requests_in_flight HTTP requests being answered.",
            "# TYPE glassforge_requests_in_flight gauge",
            f"glassforge_requests_in_flight {self.in_flight}",
            "# HELP glassforge_decode_steps_total Batched decode steps run.",
            "# TYPE glassforge_decode_steps_total counter",
            f"glassforge_decode_steps_total {s['decode_steps']}",
            "# HELP glassforge_rejected_total Sequences refused because the queue was full.",
            "# TYPE glassforge_rejected_total counter",
            f"glassforge_rejected_total {s['rejected']}",
            "# HELP glassforge_cancelled_total Sequences cancelled by a client disconnect.",
            "# TYPE glassforge_cancelled_total counter",
            f"glassforge_cancelled_total {s['cancelled']}",
        ]
        return "\n".join(lines) + "\n"


# --- the ASGI guard: body size, API key, request metrics -----------------------------------

PUBLIC_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


class Guard:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, max_body: int):
        self.app, self.api_key, self.metrics, self.max_body = app, api_key, metrics, max_body

    async def _send_error(self, send, status: int, body: dict, headers: list | None = None):
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status_box = [500]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if self.api_key and path not in PUBLIC_PATHS and not is_public_path(path):
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    status_box[0] = 401
                    return await self._send_error(send, 401, error_body(
                        "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                        "invalid_request_error", None, "invalid_api_key"),
                        [(b"www-authenticate", b"Bearer")])
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                status_box[0] = 413
                return await self._send_error(send, 413, error_body(
                    f"request body larger than {self.max_body} bytes", "invalid_request_error", None,
                    "request_too_large"))
            seen = [0]

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body:
                        raise APIError(413, f"request body larger than {self.max_body} bytes",
                                       code="request_too_large")
                return message

            await self.app(scope, receive_limited, send_wrapped)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.record(route, status_box[0], time.perf_counter() - started)


KNOWN_ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/trace",
                "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/metrics", "/openapi.json"}


# --- helpers -----------------------------------------------------------------------------

def _stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 64:
        raise APIError(400, "at most 64 stop sequences are supported", param="stop")
    return [s for s in stops if s]


def _prompts(prompt: Prompt, param: str) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, f"'{param}' is empty", param=param)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """State shared by the routes: the engine, its name, the tracer."""

    def __init__(self, engine: Engine, model_name: str, stream_interval: float = 0.0):
        self.engine = engine
        self.model_name = model_name
        self.stream_interval = stream_interval  # seconds: streamed events reach the event loop at most this often
        self.created = int(time.time())
        self._tracer = None
        self._tracer_lock = threading.Lock()

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def tracer(self):
        trace_dir = self.engine.folder / "trace"
        if not (trace_dir / "index.json").is_file():
            return None
        with self._tracer_lock:
            if self._tracer is None:
                from glassforge.trace import Tracer

                try:
                    self._tracer = Tracer(trace_dir)
                except (UserError, OSError, ValueError) as e:
                    raise APIError(500, f"the release's trace index cannot be used: {e}", "server_error",
                                   code="trace_unavailable") from None
        return self._tracer

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
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=req.seed,
            stop=_stop_list(req.stop),
            ignore_eos=bool(req.ignore_eos),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def submit(self, requests, loop: asyncio.AbstractEventLoop):
        q: asyncio.Queue = asyncio.Queue()
        # One wake-up of the event loop per batch of events, not per event: while the loop has not yet
        # run `deliver`, the engine thread only appends (no self-pipe write, no extra loop turn), and
        # the stream then folds what arrived into one chunk (merge_pending). And at most one wake-up per
        # stream_interval, but for a request's first and last events: each wake-up holds the GIL for a
        # while, which the engine thread waits out between its steps (docs/PERFORMANCE.md). Events held
        # back go with the sequence's next one, which always comes (the finish at the latest); a step that
        # adds no text and no log-probs sends none, so a held event can wait longer than the interval.
        arrived: collections.deque = collections.deque()
        scheduled = [False]
        last_wake = [-math.inf]
        interval = self.stream_interval

        def deliver() -> None:
            scheduled[0] = False  # before draining: an event appended from now on schedules a new call
            while arrived:
                q.put_nowait(arrived.popleft())

        def sink(ev: Event) -> None:
            arrived.append(ev)
            if not scheduled[0]:
                now = time.monotonic()
                if now - last_wake[0] >= interval or ev.finish_reason or ev.error:
                    scheduled[0] = True
                    last_wake[0] = now
                    loop.call_soon_threadsafe(deliver)

        try:
            seqs = self.engine.submit(requests, sink)
        except ContextTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except UserError as e:
            raise APIError(400, str(e)) from None
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        return q, seqs

    async def collect(self, request: Request, q: asyncio.Queue, seqs, count: int) -> dict[int, Event]:
        """Wait for every sequence to finish (non-streaming), cancelling at once if the client leaves."""
        gone = object()

        async def watch_disconnect():
            # After the body is read, receive() returns only when the client goes away.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.engine.cancel(seqs)
            q.put_nowait(gone)

        watcher = asyncio.create_task(watch_disconnect())
        merged: dict[int, Event] = {}
        finished = 0
        try:
            while finished < count:
                ev = await q.get()
                if ev is gone:
                    raise APIError(499, "client disconnected")
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                finished += merged.setdefault(ev.index, Event(index=ev.index)).absorb(ev)
        except BaseException:
            self.engine.cancel(seqs)
            raise
        finally:
            watcher.cancel()
        return merged

    def observe_ttft(self, metrics: Metrics, seqs) -> None:
        for s in seqs:
            if s.first_token_at is not None:
                metrics.ttft.observe(s.first_token_at - s.submitted)

    async def trace_text(self, text: str) -> dict:
        tracer = self.tracer()
        if tracer is None:
            raise APIError(400, "this release has no trace index (no release/trace/ folder)", param="trace",
                           code="trace_unavailable")
        return await asyncio.to_thread(tracer.trace, text)


def merge_pending(ev: Event, q: asyncio.Queue) -> Event:
    """Fold events of the same choice that are already waiting into ev: one SSE chunk instead of many.

    When clients or the network are slower than the engine, this keeps the
    number of chunks (and their JSON) from growing with the backlog.
    """
    if ev.error or ev.finish_reason:
        return ev
    while not q.empty():
        nxt = q._queue[0]  # peek: only the same choice, and never past a finish or an error
        if nxt.index != ev.index or nxt.error or nxt.prompt_logprobs is not None:
            break
        q.get_nowait()
        if ev.absorb(nxt):
            break
    return ev


def legacy_logprobs(entries: list[TokenLogprob], base_offset: int = 0) -> dict:
    top = []
    for e in entries:
        if e.top is None:
            top.append(None)
            continue
        d = {tok: lp for _, tok, lp in e.top}
        d.setdefault(e.token, e.logprob)  # the sampled token is always reported
        top.append(d)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": [base_offset + e.offset for e in entries]}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    def item(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    content = []
    for e in entries:
        d = item(e.token, e.logprob)
        d["top_logprobs"] = [item(t, lp) for _, t, lp in (e.top or [])]
        content.append(d)
    return {"content": content, "refusal": None}


# --- the app -------------------------------------------------------------------------------

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


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body: int = MAX_BODY_BYTES, stream_interval_ms: float | None = None) -> FastAPI:
    """The FastAPI app over a running engine (the caller owns the engine's lifetime)."""
    from glassforge import __version__

    if model_name is None:
        folder = engine.folder
        model_name = folder.parent.name if folder.name == "release" else folder.name
    app = FastAPI(title="glassforge", version=__version__,
                  description="OpenAI-compatible API over a glassforge release.")
    server = Server(engine, model_name, stream_interval_seconds(stream_interval_ms))
    metrics = Metrics()
    app.state.server = server
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        kind = first.get("type", "")
        if kind == "json_invalid" or (not loc and kind in ("model_attributes_type", "dict_type")):
            return error_response(422, f"the request body is not a JSON object: {first.get('msg', '')}",
                                  code="invalid_json")
        if kind == "extra_forbidden":
            return error_response(400, f"Unsupported parameter: '{'.'.join(loc)}' is not supported by this server.",
                                  param=".".join(loc), code="unsupported_parameter")
        if kind == "missing":
            return error_response(400, f"Missing required parameter: '{'.'.join(loc)}'.", param=".".join(loc),
                                  code="missing_required_parameter")
        return error_response(400, f"Invalid value for '{'.'.join(loc) or 'body'}': {first.get('msg', 'invalid')}",
                              param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, msg, kind, None, None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        print(f"glassforge serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return error_response(500, "internal server error", "server_error")

    @app.get("/health")
    async def health() -> dict:
        # decode_compile: whether decode steps already run compiled; decode_aot: the same for the steps
        # compiled ahead of time after them (benchmarks wait for both to leave "waiting"/"compiling")
        return {"status": "ok", "decode_compile": engine.compile_state, "decode_aot": engine.aot_state}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "glassforge",
                "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        server.check_model(model)
        return model_card()

    # --- tokenizer routes -------------------------------------------------------------

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        from glassforge.tokenizer import END, PAD

        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END, "eos_token_id": engine.end_id,
                "bos_token": None, "bos_token_id": None, "pad_token": PAD,
                "pad_token_id": engine.tokenizer.token_to_id(PAD), "chat_template": engine.chat_template,
                "vocab_size": engine.vocab_size, "model_max_length": engine.max_context}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        text = req.prompt if req.prompt is not None else render_messages(engine, req.messages,
                                                                         bool(req.add_generation_prompt))
        ids = engine.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        server.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return {"prompt": engine.decode(req.tokens)}

    # --- trace ------------------------------------------------------------------------

    @app.post("/v1/trace")
    async def trace(req: TraceRequest) -> dict:
        server.check_model(req.model)
        tracer = server.tracer()
        if tracer is None:
            raise APIError(404, "this release has no trace index (no release/trace/ folder)", "not_found_error",
                           code="trace_unavailable")
        return await asyncio.to_thread(tracer.trace, req.text, req.min_tokens or 8, req.max_docs or 5)

    # --- embeddings -------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        import numpy as np

        server.check_model(req.model)
        if req.dimensions is not None and req.dimensions != engine.cfg.d_model:
            raise APIError(400, f"'dimensions' must be {engine.cfg.d_model} for this model (no truncation)",
                           param="dimensions")
        batch = []
        for item in _prompts(req.input, "input"):
            ids = engine.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, "an input is empty", param="input")
            if len(ids) > engine.max_context:
                raise APIError(400, f"an input has {len(ids)} tokens; the maximum context is {engine.max_context}",
                               param="input", code="context_length_exceeded")
            if any(not 0 <= t < engine.vocab_size for t in ids):
                raise APIError(400, "a token id is outside the vocabulary", param="input")
            batch.append(ids)
        vectors = await asyncio.wrap_future(engine.call(lambda: engine.embed(batch)))
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if req.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(b) for b in batch)
        return {"object": "list", "data": data, "model": server.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    # --- completions ------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        n = req.n or 1
        if req.best_of not in (None, 1, n):
            raise APIError(400, "'best_of' other than n is not supported", param="best_of")
        prompts = _prompts(req.prompt, "prompt")
        if len(prompts) * n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"at most {MAX_SEQUENCES_PER_REQUEST} prompts x n per request", param="n")
        texts, id_lists = [], []
        for p in prompts:
            if isinstance(p, str):
                ids = engine.encode(p)
                texts.append(p)
            else:
                ids = list(p)
                if any(not 0 <= t < engine.vocab_size for t in ids):
                    raise APIError(400, "a prompt token id is outside the vocabulary", param="prompt")
                texts.append(engine.decode(ids))
            if not ids:
                raise APIError(400, "a prompt is empty", param="prompt")
            id_lists.append(ids)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        prompt_k = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = server.params(req, max_tokens, req.logprobs, prompt_k)
        if req.trace:
            server.tracer() or _raise_no_trace()
        rid = f"cmpl-{secrets.token_hex(12)}"
        created = int(time.time())

        if max_tokens == 0:  # score (echo) only
            for ids in id_lists:
                if len(ids) > engine.max_context:
                    raise APIError(400, f"the prompt has {len(ids)} tokens; the maximum context is "
                                   f"{engine.max_context}", code="context_length_exceeded")
            scored = []
            for ids in id_lists:
                k = req.logprobs if (req.echo and req.logprobs is not None) else None
                lp = await asyncio.wrap_future(engine.call(lambda ids=ids, k=k: engine.score(ids, k)))
                scored.append(lp)
            choices = []
            for pi, (text, ids, lp) in enumerate(zip(texts, id_lists, scored)):
                for j in range(n):
                    choices.append({"index": pi * n + j, "text": text if req.echo else "",
                                    "logprobs": legacy_logprobs(lp) if lp is not None else None,
                                    "finish_reason": "length"})
            ptoks = sum(len(ids) for ids in id_lists)
            usage = {"prompt_tokens": ptoks, "completion_tokens": 0, "total_tokens": ptoks}
            if req.stream:
                async def gen0():
                    for c in choices:
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": server.model_name, "choices": [c],
                                    **({"usage": None} if _include_usage(req) else {})})
                    if _include_usage(req):
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": server.model_name, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                return StreamingResponse(gen0(), media_type="text/event-stream")
            return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": usage}

        requests = [(pi * n + j, ids, params) for pi, ids in enumerate(id_lists) for j in range(n)]
        q, seqs = server.submit(requests, asyncio.get_running_loop())
        prompt_of = {pi * n + j: pi for pi in range(len(id_lists)) for j in range(n)}

        if not req.stream:
            merged = await server.collect(request, q, seqs, len(requests))
            server.observe_ttft(metrics, seqs)
            choices = []
            for idx in range(len(requests)):
                ev = merged[idx]
                ptext = texts[prompt_of[idx]]
                text = (ptext if req.echo else "") + ev.text
                lp = None
                if req.logprobs is not None:
                    entries = (ev.prompt_logprobs or []) if req.echo else []
                    gen = legacy_logprobs(ev.tokens, len(ptext) if req.echo else 0)
                    pre = legacy_logprobs(entries)
                    lp = {k: pre[k] + gen[k] for k in gen}
                choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}
                if req.trace:
                    choice["trace"] = await server.trace_text(ev.text)
                choices.append(choice)
            ptoks = sum(len(ids) for ids in id_lists)  # each prompt counted once, whatever n
            ctoks = sum(merged[i].completion_tokens for i in merged)
            return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": choices,
                    "usage": {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks}}

        include_usage = _include_usage(req)

        async def stream():
            totals = {"p": 0, "c": 0}
            texts_so_far = {i: "" for i in range(len(requests))}
            base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
            extra = {"usage": None} if include_usage else {}
            finished = 0
            try:
                first_seen: set[int] = set()
                while finished < len(requests):
                    ev = merge_pending(await q.get(), q)
                    if ev.error:
                        yield _sse(error_body(ev.error, "server_error"))
                        return
                    idx = ev.index
                    text = ev.text
                    lp = None
                    ptext = texts[prompt_of[idx]]
                    if idx not in first_seen:
                        first_seen.add(idx)
                        if req.echo:
                            text = ptext + text
                    texts_so_far[idx] += ev.text
                    if req.logprobs is not None:
                        pre = legacy_logprobs(ev.prompt_logprobs or []) if (req.echo and ev.prompt_logprobs) else None
                        gen = legacy_logprobs(ev.tokens, len(ptext) if req.echo else 0)
                        lp = {k: (pre[k] if pre else []) + gen[k] for k in gen}
                    if text or lp and lp["tokens"]:
                        yield _sse({**base, "choices": [{"index": idx, "text": text, "logprobs": lp,
                                                         "finish_reason": None}], **extra})
                    if ev.finish_reason:
                        finished += 1
                        if idx % n == 0:  # each prompt counted once, whatever n
                            totals["p"] += ev.prompt_tokens
                        totals["c"] += ev.completion_tokens
                        choice = {"index": idx, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}
                        if req.trace:
                            choice["trace"] = await server.trace_text(texts_so_far[idx])
                        yield _sse({**base, "choices": [choice], **extra})
                server.observe_ttft(metrics, seqs)
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": {
                        "prompt_tokens": totals["p"], "completion_tokens": totals["c"],
                        "total_tokens": totals["p"] + totals["c"]}})
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            except Exception as e:  # noqa: BLE001 - the stream has started: report in band
                yield _sse(error_body(f"internal error: {type(e).__name__}", "server_error"))
            finally:
                engine.cancel(seqs)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- chat -------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        server.check_model(req.model)
        grammar = None
        rf = req.response_format
        if rf is not None and rf.type != "text":
            schema = None
            if rf.type == "json_schema":
                spec = rf.json_schema or {}
                schema = spec.get("schema")
                if not isinstance(schema, dict):
                    raise APIError(400, "response_format json_schema needs {'name': ..., 'schema': {...}}",
                                   param="response_format")
            try:
                grammar = await asyncio.to_thread(engine.json_grammar, schema)
            except UserError as e:
                raise APIError(400, f"response_format: {e}", param="response_format") from None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        n = req.n or 1
        text = render_messages(engine, req.messages, True)
        ids = engine.encode(text)
        limit = req.max_completion_tokens or req.max_tokens
        max_tokens = limit if limit is not None else max(engine.max_context - len(ids), 1)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = server.params(req, max_tokens, logprobs)
        params.grammar = grammar
        if req.trace:
            server.tracer() or _raise_no_trace()
        try:
            engine.check_request(ids, params)
        except ContextTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        q, seqs = server.submit([(j, ids, params) for j in range(n)], asyncio.get_running_loop())
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        base = {"id": rid, "created": created, "model": server.model_name, "system_fingerprint": None}

        if not req.stream:
            merged = await server.collect(request, q, seqs, n)
            server.observe_ttft(metrics, seqs)
            choices = []
            for j in range(n):
                ev = merged[j]
                choice = {"index": j, "message": {"role": "assistant", "content": ev.text, "refusal": None},
                          "logprobs": chat_logprobs(ev.tokens) if req.logprobs else None,
                          "finish_reason": ev.finish_reason}
                if req.trace:
                    choice["trace"] = await server.trace_text(ev.text)
                choices.append(choice)
            ptoks = merged[0].prompt_tokens
            ctoks = sum(merged[j].completion_tokens for j in range(n))
            return {**base, "object": "chat.completion", "choices": choices,
                    "usage": {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks}}

        include_usage = _include_usage(req)

        async def stream():
            chunk = {**base, "object": "chat.completion.chunk"}
            extra = {"usage": None} if include_usage else {}
            ctoks = 0
            so_far = {j: "" for j in range(n)}
            try:
                for j in range(n):
                    yield _sse({**chunk, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}], **extra})
                finished = 0
                while finished < n:
                    ev = merge_pending(await q.get(), q)
                    if ev.error:
                        yield _sse(error_body(ev.error, "server_error"))
                        return
                    so_far[ev.index] += ev.text
                    lp = chat_logprobs(ev.tokens) if req.logprobs and ev.tokens else None
                    if ev.text or lp:
                        yield _sse({**chunk, "choices": [{"index": ev.index, "delta": {"content": ev.text},
                                                          "logprobs": lp, "finish_reason": None}], **extra})
                    if ev.finish_reason:
                        finished += 1
                        ctoks += ev.completion_tokens
                        choice = {"index": ev.index, "delta": {}, "logprobs": None,
                                  "finish_reason": ev.finish_reason}
                        if req.trace:
                            choice["trace"] = await server.trace_text(so_far[ev.index])
                        yield _sse({**chunk, "choices": [choice], **extra})
                server.observe_ttft(metrics, seqs)
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": {
                        "prompt_tokens": len(ids), "completion_tokens": ctoks, "total_tokens": len(ids) + ctoks}})
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            except Exception as e:  # noqa: BLE001
                yield _sse(error_body(f"internal error: {type(e).__name__}", "server_error"))
            finally:
                engine.cancel(seqs)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(Guard, api_key=api_key, metrics=metrics, max_body=max_body)
    return app


def _include_usage(req: SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _raise_no_trace():
    raise APIError(400, "this release has no trace index (no release/trace/ folder)", param="trace",
                   code="trace_unavailable")


def render_messages(engine: Engine, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    from glassforge.tokenizer import render_chat

    plain = []
    for m in messages:
        content = m.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if m.role == "developer" else m.role
        plain.append({"role": role, "content": content})
    try:
        return render_chat(plain, add_generation_prompt, engine.chat_template)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # a template error is the template's, reported as such
        raise APIError(400, f"chat template failed: {e}", param="messages") from None


def banner_text(host: str, port: int, model: str, api_key: str | None) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{port}/v1"
    key = "$GLASSFORGE_API_KEY" if api_key else "none"
    auth = ' -H "Authorization: Bearer $GLASSFORGE_API_KEY"' if api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    return "\n".join([
        f"glassforge: serving '{model}' at {url}",
        f"  web chat (see where answers come from): http://{shown}:{port}/",
        "",
        "  curl:",
        f"    curl {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
        "",
        "  python (pip install openai):",
        "    from openai import OpenAI",
        f"    client = OpenAI(base_url=\"{url}\", api_key=\"{key}\")",
        f"    print(client.chat.completions.create(model=\"{model}\", "
        "messages=[{\"role\": \"user\", \"content\": \"Hello!\"}]).choices[0].message.content)",
        "",
        "  Ctrl-C stops the server.",
    ])


def serve(run: Path | str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_context: int | None = None, banner: bool = False,
          max_queue: int | None = None, decode_weights: str | None = None,
          stream_interval_ms: float | None = None) -> None:
    """Load the release and serve the API until interrupted."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be 0..65535")
    stream_interval_ms = stream_interval_seconds(stream_interval_ms) * 1000  # a bad value fails before loading
    import socket

    try:  # fail before loading the model if the address is taken
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    engine = Engine(run, max_batch=max_batch, max_context=max_context, max_queue=max_queue,
                    decode_weights=decode_weights)
    app = create_app(engine, api_key=api_key, stream_interval_ms=stream_interval_ms)
    model = app.state.server.model_name
    from glassforge.web import mount

    mount(app, engine.folder, {"model": model, "auth_required": bool(api_key), "max_context": engine.max_context})
    if banner:
        print(banner_text(host, port, model, api_key), flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close()
