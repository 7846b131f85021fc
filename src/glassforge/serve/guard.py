"""What holds for every request before a route sees it: its Host, its key, its body, its time, its errors.

`Guard` is a pure ASGI middleware (streams pass through untouched). In order:

- **Host allow-list.** A page on any web site can make a browser send requests to 127.0.0.1 under its
  own name by DNS rebinding (Ollama's CVE-2024-28224), and read the answers, since to the browser they
  are same-origin. So a request whose Host is not a name this server answers to is refused: **403**
  `host_not_allowed`, with the flag that would allow it. Allowed: the loopback names (`localhost`,
  `127.0.0.1`, `::1`), the name `--host` binds, the `--allowed-host` names (`*`: any), and any IP
  address, which rebinding cannot produce (the page's origin would be the address itself). 403 rather
  than 421: it is what browsers, clients and the servers that fixed this (Ollama, Jupyter, Vite) answer.
- **API key.** With one, every route but `/health`, `/openapi.json` and the page's own files needs
  `Authorization: Bearer KEY`, compared in constant time. Without one any key is accepted (the openai
  client refuses to start without one).
- **The body, whole, before the app.** It is read here, up to `max_body_bytes` (**413**, however it is
  sent: a Content-Length over it, or a chunked body that grows past it; FastAPI turned an error raised
  while it read into a 400) and within `request_timeout` of the headers (**408**: a Content-Length
  larger than the body sent no longer holds a connection forever); then it is handed on in one piece.
- **Request ids.** Every answer carries `X-Request-Id`; an exception no handler took becomes a 500 whose
  body names that id, not the exception, which goes to the log with the id.
- **HTML headers.** Every `text/html` answer gets the page's Content-Security-Policy and nosniff.
- Every request is counted for /metrics.

`http_protocol` is uvicorn's httptools protocol with what an ASGI middleware cannot see: a request's
headers must arrive within `request_timeout` of its first byte (or of the connection opening: a
connection that sends nothing is closed too), else **408** and the connection closes; and they may not
exceed `MAX_HEADER_BYTES` (400: httptools itself has no bound).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import time
from typing import Iterable

from glassforge.serve.limits import FLAGS, Limits
from glassforge.serve.metrics import Metrics, route_label
from glassforge.serve.protocol import error_body
from glassforge.serve.types import internal_error_message
from glassforge.serve.web import CSP, is_public_path

PUBLIC_PATHS = {"/health", "/openapi.json"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_HEADER_BYTES = 64 << 10
HTML_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                (b"referrer-policy", b"no-referrer")]
log = logging.getLogger("glassforge.serve")


def host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1:].partition("]")[0]
    elif header.count(":") == 1:
        name = header.partition(":")[0]
    else:
        name = header
    return name.rstrip(".")


class HostCheck:
    """Which Host headers a server answers (module docstring: why, and why an IP address always passes)."""

    def __init__(self, names: Iterable[str] = ()):
        names = list(names)
        self.any = "*" in names
        self.names = set(LOOPBACK_NAMES) | {host_name(n) for n in names if n not in ("*", "")}

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:  # no Host at all: not a browser (HTTP/1.0)
            return True
        name = host_name(header)
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class Refusal(Exception):
    """An answer the Guard gives itself, before the app has sent anything."""

    def __init__(self, status: int, message: str, code: str, headers: list | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or []


class Guard:
    """Pure ASGI middleware: Host, API key, the body, request ids, HTML headers, metrics (module docstring)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, limits: Limits, hosts: HostCheck):
        self.app, self.api_key, self.metrics, self.limits, self.hosts = app, api_key, metrics, limits, hosts

    def _authorised(self, path: str, headers: dict[str, str]) -> bool:
        if not self.api_key or path in PUBLIC_PATHS or is_public_path(path):
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _check(self, headers: dict[str, str], path: str) -> None:
        host = headers.get("host")
        if not self.hosts.allows(host):
            name = host_name(host)
            raise Refusal(403, f"Host '{name}' is not allowed on this server (DNS-rebinding protection): start "
                               f"it with --allowed-host {name} to answer that name.", "host_not_allowed")
        if not self._authorised(path, headers):
            raise Refusal(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                          "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            raise self._too_large()

    def _too_large(self) -> Refusal:
        return Refusal(413, f"request body larger than {self.limits.max_body_bytes} bytes (this server's limit: "
                            f"glassforge serve {FLAGS['max_body_bytes']})", "request_too_large",
                       [(b"connection", b"close")])

    async def _read_body(self, receive) -> bytes | None:
        """The whole body within the size and time limits; None when the client left first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise Refusal(408, f"the request body did not arrive within {self.limits.request_timeout:g} s "
                                   f"(glassforge serve {FLAGS['request_timeout']})", "request_timeout",
                              [(b"connection", b"close")]) from None
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.limits.max_body_bytes:
                raise self._too_large()
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        started = time.perf_counter()
        rid = f"req-{secrets.token_hex(8)}"
        scope.setdefault("state", {})["request_id"] = rid
        status = [0]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
                if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                    # the one policy, whatever a route set; the other two only where a route set none
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-security-policy"]
                    have = {k.lower() for k, _ in headers}
                    headers += [h for h in HTML_HEADERS if h[0] not in have]
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight += 1
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            self._check(headers, path)
            body = await self._read_body(receive)
            if body is None:
                status[0] = 499
                return
            sent = [False]

            async def replay():
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: only the disconnect, which streams listen for

            await self.app(scope, replay, send_wrapped)
        except Refusal as e:
            if not status[0]:
                await self._send_error(send_wrapped, e.status, error_body(e.message, _error_type(e.status), None,
                                                                          e.code), e.headers)
        except Exception:  # a bug: the client gets the request's id, the log the traceback
            log.exception("glassforge serve: internal error in request %s (%s %s)", rid, scope.get("method"), path)
            if not status[0]:
                await self._send_error(send_wrapped, 500, error_body(internal_error_message(rid), "server_error",
                                                                     None, "internal_error"))
        finally:
            self.metrics.in_flight -= 1
            self.metrics.record(route_label(path), status[0] or 500, time.perf_counter() - started)

    @staticmethod
    async def _send_error(send, status: int, body: dict, headers: list | None = None):
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": data})


def _error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error"}.get(status, "invalid_request_error")


def http_protocol(limits: Limits) -> type:
    """uvicorn's httptools protocol with a deadline and a size bound on each request's headers."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(limits.request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                msg = f"request headers not received within {limits.request_timeout:g} s".encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                     b"connection: close\r\ncontent-length: " + str(len(msg)).encode() +
                                     b"\r\n\r\n" + msg)
                self.transport.close()

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > MAX_HEADER_BYTES:
                import httptools

                raise httptools.HttpParserError("request headers too large")  # uvicorn answers 400, closes

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

    return TimedHttpToolsProtocol
