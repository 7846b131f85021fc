"""`glassforge serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Routes (routes/): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, `POST /v1/embeddings` (openai.py),
`POST /v1/responses` (responses.py, stateless), `POST /v1/trace` (trace.py), the tokenizer routes that lm-evaluation-harness
probes, `/tokenize`, `/detokenize`, `/tokenizer_info` (tokenizer.py), and
`GET /health` and `GET /metrics` in Prometheus's text format (ops.py); the web
page (web.py) is mounted beside them by `serve`. The wire format is
protocol.py's, the logic the routes share (context check, streams, the queue)
serving.py's.

This module wires them together, with what holds for every route:

- Errors are OpenAI's `{"error": {message, type, param, code}}` whatever raised
  them: an `APIError`, pydantic's validation (a 400 naming the parameter; a
  body that is not JSON at all is a 422; text that is not valid Unicode a 400
  `invalid_text`), an unknown route (404), or a bug (500 naming the request's
  id; the traceback goes to the log under that id, guard.py).
- guard.py's `Guard` middleware checks the Host (DNS-rebinding protection),
  the API key, the body's size and time, and counts every request; its
  `http_protocol` times out requests whose headers never finish.
- The limits of one request (limits.py's `Limits`) are `create_app`'s
  `limits` and `serve`'s flags; the Host allow-list is `allowed_hosts`.
- No /docs or /redoc: their pages load Swagger and ReDoc from a CDN, which an
  air-gapped machine cannot reach and the page's CSP forbids. The schema is at
  /openapi.json, for any OpenAPI viewer.
- `serve` binds 127.0.0.1 unless told otherwise, and checks the port before
  loading the model, so a taken port fails in a second, not after the load.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassforge import __version__
from glassforge.core.errors import UserError
from glassforge.serve.engine import Engine
from glassforge.serve.guard import Guard, HostCheck, http_protocol
from glassforge.serve.limits import Limits
from glassforge.serve.protocol import APIError, error_body
from glassforge.serve.routes import openai, ops, responses, tokenizer, trace
from glassforge.serve.serving import Server, stream_interval_seconds
from glassforge.serve.web import mount


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """pydantic's errors as OpenAI's 400s naming the parameter; a body that is not a JSON object is a 422."""
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    kind = first.get("type", "")
    if kind == "invalid_text":
        param = first.get("ctx", {}).get("param")
        return error_response(400, first.get("msg", "invalid text"), param=param, code="invalid_text")
    if kind == "json_invalid" or (not loc and kind in ("model_attributes_type", "dict_type")):
        return error_response(422, f"the request body is not a JSON object: {first.get('msg', '')}",
                              code="invalid_json")
    if kind == "extra_forbidden":
        return error_response(400, f"Unsupported parameter: '{where}' is not supported by this server.",
                              param=where, code="unsupported_parameter")
    if kind == "missing":
        return error_response(400, f"Missing required parameter: '{where}'.", param=where,
                              code="missing_required_parameter")
    return error_response(400, f"Invalid value for '{where or 'body'}': {first.get('msg', 'invalid')}",
                          param=where or None, code="invalid_value")


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
    return error_response(e.status_code, msg, kind, None, None, getattr(e, "headers", None))


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None,
               stream_interval_ms: float | None = None, limits: Limits | None = None,
               allowed_hosts: Iterable[str] = ()) -> FastAPI:
    """The FastAPI app over a running engine (the caller owns the engine's lifetime).

    limits: what one request may ask for (limits.py; the defaults without). allowed_hosts: Host names
    answered besides the loopback names and IP addresses ("*": any; guard.py says why)."""
    if model_name is None:  # a release/ folder is named after its run folder
        folder = engine.folder
        model_name = folder.parent.name if folder.name == "release" else folder.name
    app = FastAPI(title="glassforge", version=__version__, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a glassforge release.")
    limits = limits or Limits()
    server = Server(engine, model_name, stream_interval_seconds(stream_interval_ms), limits=limits)
    app.state.server = server
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for api in (ops, openai, responses, tokenizer, trace):
        app.include_router(api.router)
    app.add_middleware(Guard, api_key=api_key, metrics=server.metrics, limits=limits,
                       hosts=HostCheck(allowed_hosts))
    return app


def uvicorn_settings(limits: Limits) -> dict:
    """The uvicorn.Config settings that go with an app made with these limits: the timed protocol."""
    return {"http": http_protocol(limits)}


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
          stream_interval_ms: float | None = None, limits: Limits | None = None,
          allowed_hosts: Iterable[str] = (), prefix_cache: bool | None = None) -> None:
    """Load the release and serve the API and the web page until interrupted."""
    import uvicorn

    limits = limits or Limits()

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be 0..65535")
    stream_interval_ms = stream_interval_seconds(stream_interval_ms) * 1000  # a bad value fails before loading
    try:  # fail before loading the model if the address is taken
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    engine = Engine(run, max_batch=max_batch, max_context=max_context, max_queue=max_queue,
                    decode_weights=decode_weights, prefix_cache=prefix_cache)
    app = create_app(engine, api_key=api_key, stream_interval_ms=stream_interval_ms, limits=limits,
                     allowed_hosts=[host, *allowed_hosts])
    model = app.state.server.model_name
    mount(app, engine.folder, {"model": model, "auth_required": bool(api_key), "max_context": engine.max_context})
    if banner:
        print(banner_text(host, port, model, api_key), flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                    **uvicorn_settings(limits))
    finally:
        engine.close()
