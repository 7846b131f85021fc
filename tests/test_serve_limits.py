"""Issue 18, replayed: a server that one request cannot take down.

Each finding of the probe has its test here: bounded work per request, checked before the work (1, 4);
one request's failure fails only that request (2); grammars, long text, traces and embeddings leave the
event loop and other clients answering (3, 4); and protocol hygiene (5): the Host allow-list, timeouts
for incomplete requests, 413 for chunked bodies, one CSP, no /docs, invalid text, 500s naming a request
id. tests/test_serve_soak.py has the loopback soak.

Engines here decode eagerly (conftest.py): what is tested is the server."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest

from glassforge.serve.app import create_app, uvicorn_settings
from glassforge.serve.engine import Engine
from glassforge.serve.guard import HostCheck, host_name
from glassforge.serve.limits import INLINE_CHARS, Limits
from glassforge.serve.types import SamplingParams
from helpers import LiveServer, add_trace_index, metrics_of, post_concurrently, sse_events, wait_until

SMALL = Limits(max_body_bytes=64 << 10, max_text_chars=2000, max_trace_chars=1000, max_embedding_inputs=8,
               max_stop_strings=4, max_stop_chars=16, request_timeout=0.5)
MSGS = [{"role": "user", "content": "Write a function that parses JSON."}]


@pytest.fixture(scope="module")
def engine(random_model, tmp_path_factory):
    """An engine over a copy of the random model with a trace index of a few documents."""
    from glassforge.data import pystdlib

    folder = tmp_path_factory.mktemp("traced") / "release"
    shutil.copytree(random_model, folder)
    e = Engine(random_model, max_batch=8, compile_decode=False)
    add_trace_index(folder, e, [d.text for d in pystdlib.iter_documents(["json"])][:5])
    e.close()
    e = Engine(folder, max_batch=8, compile_decode=False)
    yield e
    e.close()


def serve(engine, limits: Limits = Limits(), **kw) -> LiveServer:
    app = create_app(engine, limits=limits, **kw)
    srv = LiveServer(app, **uvicorn_settings(limits))
    srv.app = app
    return srv


@pytest.fixture(scope="module")
def small(engine):
    """A server with small limits, so that every limit can be reached with small requests."""
    srv = serve(engine, SMALL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default(engine):
    srv = serve(engine)
    yield srv
    srv.stop()


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# --- 1, 4: bounded work, checked before the work --------------------------------------------------------

OVER_LIMITS = [  # (path, body, param, code, the limit and flag the message names)
    ("/v1/completions", {"prompt": "x" * 2001}, "prompt", "string_above_max_length", "2000", "--max-text-chars"),
    ("/v1/completions", {"prompt": ["x" * 1000, "y" * 1001]}, "prompt", "string_above_max_length", "2000",
     "--max-text-chars"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 1500},
                                           {"role": "user", "content": [{"type": "text", "text": "y" * 501}]}]},
     "messages", "string_above_max_length", "2000", "--max-text-chars"),
    ("/v1/embeddings", {"input": ["x" * 1001, "y" * 1000]}, "input", "string_above_max_length", "2000",
     "--max-text-chars"),
    ("/v1/embeddings", {"input": ["x"] * 9}, "input", "array_above_max_length", "8", "--max-embedding-inputs"),
    ("/tokenize", {"prompt": "x" * 2001}, "prompt", "string_above_max_length", "2000", "--max-text-chars"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x" * 2001}]}, "messages", "string_above_max_length",
     "2000", "--max-text-chars"),
    ("/detokenize", {"tokens": [1] * 2001}, "tokens", "array_above_max_length", "2000", "--max-text-chars"),
    ("/v1/trace", {"text": "x" * 1001}, "text", "string_above_max_length", "1000", "--max-trace-chars"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length", "4",
     "--max-stop-strings"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": ["a", "b" * 17]}, "stop.1", "string_above_max_length", "16",
     "--max-stop-chars"),
    ("/v1/completions", {"prompt": "x", "stop": "b" * 17}, "stop", "string_above_max_length", "16",
     "--max-stop-chars"),
]


@pytest.mark.parametrize("path,body,param,code,limit,flag", OVER_LIMITS)
def test_each_limit_is_a_400_naming_field_limit_and_flag_before_any_tokenizing(small, engine, monkeypatch, path,
                                                                               body, param, code, limit, flag):
    encoded = []
    real = engine.encode
    monkeypatch.setattr(engine, "encode", lambda text: encoded.append(len(text)) or real(text))
    err = error_of(httpx.post(small.root + path, json={**body, "max_tokens": 1} if "v1/c" in path else body))
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert f"at most {limit} " in err["message"] and flag in err["message"] and f"'{param}'" in err["message"]
    assert encoded == []  # refused before the tokenizer saw any of it


def test_requests_at_the_limits_are_served(small):
    ok = [("/v1/completions", {"prompt": "x" * 2000, "max_tokens": 1}),
          ("/v1/completions", {"prompt": "import", "max_tokens": 1, "stop": ["a", "b", "c", "d" * 16]}),
          ("/v1/embeddings", {"input": ["import json"] * 8}),
          ("/tokenize", {"prompt": "x" * 2000}), ("/detokenize", {"tokens": [1] * 2000}),
          ("/v1/trace", {"text": "import json\n" * 83})]
    for path, body in ok:
        r = httpx.post(small.root + path, json=body, timeout=60)
        assert r.status_code == 200 or r.json()["error"]["code"] == "context_length_exceeded", (path, r.text)


def test_every_number_is_bounded(small, engine):
    """top_k by the vocabulary, every other integer by a range: 400s naming the field, never a 500."""
    bad = [({"top_k": 10**30}, "top_k"), ({"top_k": 2**63}, "top_k"), ({"top_k": engine.vocab_size + 1}, "top_k"),
           ({"max_tokens": 2**63}, "max_tokens"), ({"seed": 2**64}, "seed"), ({"n": 10**20}, "n"),
           ({"logprobs": 2**40}, "logprobs"), ({"logit_bias": {str(2**63): 1}}, "logit_bias"),
           ({"logit_bias": {str(i % 500): 1 for i in range(1025)} | {f"0{i}": 1 for i in range(1025)}}, "logit_bias"),
           ({"temperature": 1e308}, "temperature"), ({"presence_penalty": -1e9}, "presence_penalty")]
    for extra, param in bad:
        err = error_of(httpx.post(f"{small.base}/completions", json={"prompt": "x", "max_tokens": 1, **extra}))
        assert err["param"] == param, (extra, err)
    err = error_of(httpx.post(f"{small.base}/embeddings", json={"input": "x", "dimensions": 2**40}))
    assert err["param"] == "dimensions"
    r = httpx.post(f"{small.base}/completions", json={"prompt": "x", "max_tokens": 1, "top_k": engine.vocab_size})
    assert r.status_code == 200


def test_a_bad_limit_is_a_one_line_error_before_anything_loads(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glassforge", "serve", str(tmp_path), "--max-text-chars", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "glassforge: error: --max-text-chars 0: must be a positive number"], r.stderr


def test_memory_returns_near_baseline_after_large_requests(default, engine):
    """At the default limits: three traces and three tokenizings at once, an embeddings batch, each at its
    limit. The server (in this process) keeps no more than a little of what they took (before: 6 MiB traces
    took it to a 9.7 GB peak and left 3.7 GB). Over the limits, nothing is even tokenized."""
    limits = Limits()
    text = "import json\nprint(json.dumps({'a': [1, 2, 3]}))\n" * (limits.max_text_chars // 48)
    big = ([("/v1/trace", {"text": text[:limits.max_trace_chars]})] * 3 +
           [("/tokenize", {"prompt": text[:limits.max_text_chars]})] * 3 +
           [("/v1/embeddings", {"input": [text[:200]] * 256})])
    results = post_concurrently(default.root, big)  # the first round loads what stays loaded (index, threads)
    base = metrics_of(default.root)["process_resident_memory_bytes"]
    for _ in range(3):
        results += post_concurrently(default.root, big)
    after = metrics_of(default.root)
    assert [r.status_code for r in results] == [200] * 28, [r.text[:200] for r in results if r.status_code != 200]
    grown = (after["process_resident_memory_bytes"] - base) / 2**20
    print(f"\nRSS before {base / 2**20:.0f} MiB, after 3 rounds of large requests "
          f"{after['process_resident_memory_bytes'] / 2**20:.0f} MiB (+{grown:.0f}), "
          f"peak {after['glassforge_resident_memory_peak_bytes'] / 2**20:.0f} MiB")
    assert grown < 64, grown
    r = httpx.post(f"{default.root}/v1/trace", json={"text": "x" * (6 << 20)}, timeout=60)
    assert error_of(r)["code"] == "string_above_max_length"


# --- 2: a request's failure is its own ------------------------------------------------------------------

class Explode:
    """A stop-token set that fails the second time the engine looks into it (the sequence's first decode step,
    beside the others): an exception while serving one sequence."""

    def __init__(self):
        self.looks = 0

    def __contains__(self, token):
        self.looks += 1
        if self.looks >= 2:
            raise ValueError("Overflow when unpacking long long")
        return False


def stream_text(base: str, out: list, body: dict) -> None:
    with httpx.stream("POST", f"{base}/completions", json=body, timeout=120) as r:
        out.append(sse_events(r.iter_lines()))


@pytest.mark.parametrize("poison", [
    lambda: SamplingParams(max_tokens=4, logit_bias={2**63: 1.0}),  # fails in the sampler, at its prefill
    lambda: SamplingParams(max_tokens=4, ignore_eos=True, stop_token_ids=Explode()),  # in a shared decode step
], ids=["sampler", "decode-step"])
def test_a_poisoned_request_beside_two_streams_fails_alone(small, engine, poison, caplog):
    """Before: the engine's catch-all ended every running and waiting sequence for one request's bad value."""
    body = {"prompt": "import", "max_tokens": 48, "ignore_eos": True, "temperature": 0.8, "seed": 1, "stream": True}
    streams: list = []
    threads = [threading.Thread(target=stream_text, args=(small.base, streams, body)) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: engine.batch_size >= 2, 30, "the two streams never ran", interval=0.005)
    got: queue.SimpleQueue = queue.SimpleQueue()
    with caplog.at_level(logging.ERROR, logger="glassforge.serve"):
        engine.submit([(0, engine.encode("x"), poison())], got.put, tag="req-poison")
        ev = got.get(timeout=30)
        while not ev.finish_reason:
            ev = got.get(timeout=30)
        # and the same kind of value through the API is a 400, while the streams run
        assert error_of(httpx.post(f"{small.base}/completions", json={**body, "top_k": 10**30}))["param"] == "top_k"
    for t in threads:
        t.join(timeout=120)
    assert ev.finish_reason == "abort" and ev.error == (
        "internal server error (request id req-poison); the server's log has the details")
    assert "req-poison" in caplog.text and "Overflow when unpacking long long" in caplog.text
    assert len(streams) == 2
    for events in streams:
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) > 1
    wait_until(lambda: len(engine.free_slots) == engine.max_batch, 10, "a slot was not given back")


def finished(got: queue.SimpleQueue, n: int) -> dict:
    """n choices' events from an engine sink, each merged into one (index: event) once it has finished."""
    merged: dict = {}
    while sum(1 for ev in merged.values() if ev.finish_reason) < n:
        ev = got.get(timeout=30)
        merged.setdefault(ev.index, type(ev)(index=ev.index)).absorb(ev)
        if ev.error:
            merged[ev.index].error = ev.error
    return merged


def test_a_bad_value_in_a_shared_batch_fails_its_own_sequence_only(engine):
    """Two prompts prefilled and sampled together, one with a value the sampler cannot take: the batch is
    sampled again row by row, and only that row fails."""
    got: queue.SimpleQueue = queue.SimpleQueue()
    good = SamplingParams(max_tokens=3, temperature=0.7, seed=3, ignore_eos=True)
    passes = engine.stats["prefill_passes"]
    engine.submit([(0, engine.encode("import"), good), (1, engine.encode("json"), SamplingParams(
        max_tokens=3, logit_bias={engine.vocab_size + 10**6: 1.0}))], got.put, tag="req-y")
    done = finished(got, 2)
    assert engine.stats["prefill_passes"] == passes + 1  # the two were prefilled, and sampled, together
    assert (done[0].finish_reason, done[0].error, done[0].completion_tokens) == ("length", None, 3)
    assert done[1].finish_reason == "abort" and "req-y" in done[1].error
    alone = engine.generate(engine.encode("import"), good)[0]
    assert done[0].text == alone.text  # and the good row drew what it draws alone, from its own generator


def test_a_failed_prefill_fails_its_own_prompt_only(engine, monkeypatch):
    poison = engine.encode("json poison")
    real = engine.fast.prefill_packed

    def prefill(prompts, cache, want_all, starts=None):
        if any(ids == poison for ids, _ in prompts):
            raise RuntimeError("boom")
        return real(prompts, cache, want_all, starts)

    monkeypatch.setattr(engine.fast, "prefill_packed", prefill)
    got: queue.SimpleQueue = queue.SimpleQueue()
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.submit([(0, engine.encode("import"), p), (1, poison, SamplingParams(max_tokens=3))], got.put, tag="req-x")
    done = finished(got, 2)
    assert done[0].finish_reason == "length" and done[0].error is None and done[0].completion_tokens == 3
    assert done[1].finish_reason == "abort" and "req-x" in done[1].error and "boom" not in done[1].error
    wait_until(lambda: len(engine.free_slots) == engine.max_batch, 10, "a slot was not given back")


# --- 3, 4: long work off the event loop, with bounded concurrency ---------------------------------------

def big_schema(n: int) -> dict:
    return {"type": "object", "required": [f"p{i}" for i in range(n)],
            "properties": {f"p{i}": {"type": "string"} for i in range(n)}}


def test_long_work_runs_on_the_work_threads(default, engine, monkeypatch):
    """Tokenizing long text, tracing, compiling a grammar and building its matchers: each on a work thread,
    never on the event loop (nor on the engine thread)."""
    pytest.importorskip("llguidance")
    seen: dict[str, set] = {}

    def recording(name, fn):
        def wrapper(*a, **kw):
            short = name == "encode" and len(a[0]) < INLINE_CHARS
            seen.setdefault(f"{name} (short)" if short else name, set()).add(
                threading.current_thread().name.split("_")[0])
            return fn(*a, **kw)
        return wrapper

    tracer = default.app.state.server.tracer(None)
    monkeypatch.setattr(engine, "encode", recording("encode", engine.encode))
    monkeypatch.setattr(tracer, "trace", recording("trace", tracer.trace))
    monkeypatch.setattr(engine.grammars, "json_grammar", recording("json_grammar", engine.grammars.json_grammar))
    monkeypatch.setattr(engine.grammars, "matchers", recording("matchers", engine.grammars.matchers))
    long = "import json\n" * 1000
    with httpx.Client(timeout=120) as h:
        assert h.post(f"{default.root}/tokenize", json={"prompt": long}).status_code == 200
        assert h.post(f"{default.root}/v1/trace", json={"text": long}).status_code == 200
        r = h.post(f"{default.root}/v1/chat/completions", json={
            "messages": MSGS, "max_tokens": 2, "n": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": big_schema(50)}}})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert "glassforge-work" not in seen.pop("encode (short)")  # a short prompt is not worth a thread hop
    assert seen == {"encode": {"glassforge-work"}, "trace": {"glassforge-work"}, "json_grammar": {"glassforge-work"},
                    "matchers": {"glassforge-work"}}


def test_health_and_short_chats_keep_answering_during_long_work(default, engine):
    """While a large grammar (n=8), long tokenizing, traces and a large embeddings batch are worked on, /health
    and short chats answer within a bound measured against the same request on the idle server (before: a
    grammar stalled /health for 12.5 s, an embeddings batch held a chat for 12 s)."""
    pytest.importorskip("llguidance")
    limits = Limits()
    text = "import json\nprint(json.dumps({'a': [1, 2, 3]}))\n" * (limits.max_text_chars // 48)
    chat = {"messages": MSGS, "max_tokens": 2, "temperature": 0}
    heavy = [("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "n": 8, "response_format": {
                 "type": "json_schema", "json_schema": {"name": "big", "schema": big_schema(3000)}}}),
             ("/tokenize", {"prompt": text}), ("/tokenize", {"prompt": text}),
             ("/v1/trace", {"text": text[:limits.max_trace_chars]}),
             ("/v1/embeddings", {"input": [text[:300]] * 640})]

    async def timed(ac, method, path, body=None) -> float:
        t0 = time.perf_counter()
        r = await (ac.get(path) if method == "GET" else ac.post(path, json=body))
        assert r.status_code == 200, r.text[:300]
        return time.perf_counter() - t0

    async def main():
        async with httpx.AsyncClient(base_url=default.root, timeout=300) as ac:
            await timed(ac, "POST", "/v1/chat/completions", chat)  # warm
            idle_health = statistics.median([await timed(ac, "GET", "/health") for _ in range(9)])
            idle_chat = statistics.median([await timed(ac, "POST", "/v1/chat/completions", chat) for _ in range(5)])
            work = [asyncio.create_task(timed(ac, "POST", p, b)) for p, b in heavy]
            await asyncio.sleep(0.05)
            health, chats = [], []
            while not all(t.done() for t in work):
                health.append(await timed(ac, "GET", "/health"))
                chats.append(await timed(ac, "POST", "/v1/chat/completions", chat))
            heavy_s = await asyncio.gather(*work)
            return idle_health, idle_chat, health, chats, heavy_s

    idle_health, idle_chat, health, chats, heavy_s = asyncio.run(main())
    figures = (f"idle: /health {idle_health * 1000:.1f} ms, chat {idle_chat * 1000:.1f} ms; during {max(heavy_s):.1f} s "
               f"of long work: /health median {statistics.median(health) * 1000:.1f} ms, max "
               f"{max(health) * 1000:.1f} ms; chat median {statistics.median(chats) * 1000:.1f} ms, max "
               f"{max(chats) * 1000:.1f} ms ({len(chats)} each; the slowest chats: "
               f"{[round(c * 1000) for c in sorted(chats)[-5:]]} ms, at probes {sorted(range(len(chats)), key=chats.__getitem__)[-5:]})")
    print("\n" + figures)
    assert len(health) >= 3, figures  # the long work did overlap the probes
    # The worst probe gets a floor of 1 s: on a loaded 2-core machine the first probe after the work starts has
    # measured 317 ms against a 40x bound of 316 ms; the stall this guards against was 12.5 s.
    assert statistics.median(health) < 10 * idle_chat and max(health) < max(40 * idle_chat, 1.0), figures
    assert statistics.median(chats) < 10 * idle_chat, figures


# --- 5: protocol hygiene ---------------------------------------------------------------------------------

def test_host_names():
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "127.0.0.1", "example.com.", "::1")] == [
        "localhost", "::1", "127.0.0.1", "example.com", "::1"]
    check = HostCheck(["0.0.0.0", "gpu-box.lan"])
    for ok in ("localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "10.1.2.3:8000", "[fe80::1]",
               "GPU-box.lan:8000", None):
        assert check.allows(ok), ok
    for bad in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", ""):
        assert not check.allows(bad), bad
    assert HostCheck(["*"]).allows("anything.example")


def test_dns_rebinding_host_is_403_on_every_route(small):
    for path in ("/facts", "/v1/models", "/health", "/metrics", "/"):
        err = error_of(httpx.get(small.root + path, headers={"host": "rebind.example:8000"}), 403)
        assert err["code"] == "host_not_allowed" and "--allowed-host rebind.example" in err["message"]
    err = error_of(httpx.post(f"{small.base}/trace", json={"text": "import json"}, headers={"host": "rebind.example"}),
                   403)
    assert err["type"] == "permission_error"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:8000", "192.168.0.7:8000"):
        assert httpx.get(f"{small.root}/v1/models", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_add_names(engine):
    app = create_app(engine, allowed_hosts=["chat.example"])
    srv = LiveServer(app)
    try:
        assert httpx.get(f"{srv.root}/v1/models", headers={"host": "chat.example:80"}).status_code == 200
        assert httpx.get(f"{srv.root}/v1/models", headers={"host": "other.example"}).status_code == 403
    finally:
        srv.stop()


def raw(srv: LiveServer, data: bytes, then: list[bytes] = (), gap: float = 0.0, wait: float = 5.0) -> tuple[bytes, float]:
    """Send data (and then each of then, gap seconds apart) on a fresh connection; what comes back before the
    server closes it (or wait seconds pass), and when it closed."""
    host, port = srv.root.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(0.05)
    started = time.monotonic()
    got = b""
    try:
        sock.sendall(data)
        pending = list(then)
        next_send = started + gap
        while time.monotonic() - started < wait:
            if pending and time.monotonic() >= next_send:
                try:
                    sock.sendall(pending.pop(0))
                except OSError:
                    break
                next_send += gap
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - started
    finally:
        sock.close()


def test_incomplete_requests_time_out(small):
    """request_timeout 0.5 s: headers sent a byte at a time, a Content-Length larger than the body, and a
    connection that sends nothing are each answered 408 (or closed) within about that, not held forever."""
    trickle = [bytes([c]) for c in b"ost: 127.0.0.1\r\nX-Slow: " + b"a" * 100]
    got, took = raw(small, b"GET /health HTTP/1.1\r\nH", trickle, gap=0.1)
    assert got.startswith(b"HTTP/1.1 408") and took < 3, (got, took)
    body = b'{"prompt": "x", "max_tokens": 1}'
    got, took = raw(small, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n" + body)
    assert got.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in got and took < 3, (got, took)
    got, took = raw(small, b"")
    assert took < 3, took  # closed, not kept
    # a request that arrives in time is served
    got, _ = raw(small, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200")


def test_oversized_bodies_are_413_however_sent(small):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16 << 10, b" " * (16 << 10))
    got, _ = raw(small, head, [chunk] * 6)
    assert got.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in got, got[:300]
    err = error_of(httpx.post(f"{small.base}/completions", content=b" " * (65 << 10),
                              headers={"content-type": "application/json"}), 413)
    assert "65536 bytes" in err["message"] and "--max-body-bytes" in err["message"]
    got, _ = raw(small, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400"), got[:100]  # headers have a bound too


def test_no_docs_pages_with_or_without_a_key(engine):
    for key in (None, "k"):
        srv = LiveServer(create_app(engine, api_key=key))
        try:
            auth = {"Authorization": "Bearer k"}
            for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
                assert httpx.get(srv.root + path, headers=auth).status_code == 404, path
            schema = httpx.get(f"{srv.root}/openapi.json").text  # public: no key needed
            assert "/v1/chat/completions" in schema and "cdn" not in schema
        finally:
            srv.stop()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt.1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}', "stop.0"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "user": "\\ud800"}', "user"),
    ("/v1/embeddings", b'{"input": "\\ud800"}', "input"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/trace", b'{"text": "\\udc00 x"}', "text"),
])
def test_lone_surrogates_are_400_naming_the_field(small, path, body, param):
    err = error_of(httpx.post(small.root + path, content=body, headers={"content-type": "application/json"}))
    assert (err["code"], err["param"]) == ("invalid_text", param) and "surrogate" in err["message"]
    # a surrogate pair is a character like any other
    pair = body.replace(b"\\ud800", b"\\ud83d\\ude00").replace(b"\\udfff", b"\\ud83d\\ude00").replace(
        b"\\udc00", b"\\ud83d\\ude00")
    assert httpx.post(small.root + path, content=pair, headers={"content-type": "application/json"},
                      timeout=60).status_code != 500


def test_a_500_names_the_request_not_the_exception(small, engine, monkeypatch, caplog):
    def broken():
        raise RuntimeError("secret detail of the bug")

    monkeypatch.setattr(engine.compiler, "health", broken)
    with caplog.at_level(logging.ERROR, logger="glassforge.serve"):
        r = httpx.get(f"{small.root}/health")
    err = error_of(r, 500)
    rid = r.headers["x-request-id"]
    assert rid.startswith("req-") and err == {
        "message": f"internal server error (request id {rid}); the server's log has the details",
        "type": "server_error", "param": None, "code": "internal_error"}
    assert "secret detail" not in r.text
    assert rid in caplog.text and "secret detail of the bug" in caplog.text  # the log keeps it, under the id
    monkeypatch.undo()
    assert httpx.get(f"{small.root}/health").status_code == 200
    assert json.loads(httpx.get(f"{small.root}/health").text)["status"] == "ok"
