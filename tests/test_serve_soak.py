"""Issue 18's soak and memory figures: `glassforge serve` on loopback under a load a careless client makes.

Both run the real command (`glassforge serve` on the tiny release, in a subprocess) and read the server's
own /metrics: its resident memory, its cache slots, its requests by status. They print the figures that
docs/PERFORMANCE.md quotes:

    GLASSFORGE_TEST_TINY_RUN=RUN flock /tmp/gf-cpu.lock .venv/bin/python -m pytest -s -p no:cacheprovider \
        -m slow tests/test_serve_soak.py

GLASSFORGE_SOAK_SECONDS shortens or lengthens the soak (default 60).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import pytest

from helpers import glassforge_serve, metrics_of, post_concurrently, wait_until

STREAMS = 32
MAX_BATCH = 8
MSGS = [{"role": "user", "content": "How do I read a JSON file?"}]
# the one-in-ten requests: (what, path, raw body or JSON, extra headers, the status it must get)
BAD = [
    ("bad json", "/v1/chat/completions", b'{"messages": [', {}, 422),
    ("huge top_k", "/v1/completions", {"prompt": "x", "top_k": 10**30}, {}, 400),
    ("lone surrogate", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400),
    ("text over the limit", "/v1/completions", {"prompt": "x" * 5000}, {}, 400),
    ("stop over the limit", "/v1/completions", {"prompt": "x", "stop": ["s"] * 65}, {}, 400),
    ("foreign host", "/v1/models", None, {"host": "rebind.example"}, 403),
    ("unknown parameter", "/v1/chat/completions", {"messages": MSGS, "functions": []}, {}, 400),
    ("context overflow", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 100000}, {}, 400),
]


def rss_mib(root: str) -> float:
    return metrics_of(root)["process_resident_memory_bytes"] / 2**20


def server_errors(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("glassforge_requests_total") and 'status="5' in k)


async def good_request(ac: httpx.AsyncClient, rng: random.Random) -> str | None:
    """A streamed chat or a whole completion; None when it was served as it should be, else what went wrong."""
    if rng.random() < 0.7:
        body = {"messages": [{"role": "user", "content": f"question {rng.random()}"}], "stream": True,
                "max_tokens": rng.randint(4, 16), "temperature": 0.8, "seed": rng.randint(0, 999)}
        async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}: {(await r.aread())[:200]!r}"
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if last != "[DONE]" and "error" in json.loads(last):
                        return f"error event {last}"
            return None if last == "[DONE]" else f"stream ended without [DONE] (last {last})"
    r = await ac.post("/v1/completions", json={"prompt": "import json", "max_tokens": rng.randint(1, 8)})
    return None if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] else f"{r.status_code} {r.text}"


async def bad_request(ac: httpx.AsyncClient, rng: random.Random) -> str | None:
    """A malformed request (it must get its 4xx) or an aborted stream (it must cost nothing after)."""
    if rng.random() < 0.4:
        body = {"messages": MSGS, "stream": True, "max_tokens": 64, "ignore_eos": True}
        async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk
        return None
    what, path, body, headers, want = rng.choice(BAD)
    if body is None:
        r = await ac.get(path, headers=headers)
    elif isinstance(body, bytes):
        r = await ac.post(path, content=body, headers={"content-type": "application/json", **headers})
    else:
        r = await ac.post(path, json=body, headers=headers)
    return None if r.status_code == want else f"{what}: {r.status_code}, not {want}: {r.text[:200]}"


async def soak(root: str, seconds: float) -> dict:
    stats = {"good": 0, "bad": 0, "errors": [], "bad_errors": [], "latencies": []}
    deadline = time.monotonic() + seconds

    async def client(i: int, ac: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            if rng.random() < 0.1:
                stats["bad"] += 1
                problem = await bad_request(ac, rng)
                if problem:
                    stats["bad_errors"].append(problem)
                continue
            started = time.monotonic()
            problem = await good_request(ac, rng)
            stats["good"] += 1
            if problem:
                stats["errors"].append(problem)
            else:
                stats["latencies"].append(time.monotonic() - started)

    limits = httpx.Limits(max_connections=2 * STREAMS)
    async with httpx.AsyncClient(base_url=root, timeout=120, limits=limits) as ac:
        await asyncio.gather(*(client(i, ac) for i in range(STREAMS)))
    return stats


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.slow
def test_soak_32_streams_with_one_in_ten_malformed_or_aborted(tiny_run):
    seconds = float(os.environ.get("GLASSFORGE_SOAK_SECONDS", "60"))
    with glassforge_serve(tiny_run, "--max-batch", str(MAX_BATCH), "--max-text-chars", "4096") as root:
        asyncio.run(soak(root, 3))  # warm: every path once, the allocator's arenas made
        wait_until(lambda: metrics_of(root)["glassforge_running_sequences"] == 0, 30, "warm-up still running")
        rss_start, errors_start = rss_mib(root), server_errors(metrics_of(root))
        stats = asyncio.run(soak(root, seconds))
        wait_until(lambda: metrics_of(root)["glassforge_running_sequences"] == 0, 30, "sequences still running")
        m = metrics_of(root)
        rss_end = rss_mib(root)
    lat = stats["latencies"]
    print(f"\nsoak {seconds:g} s, {STREAMS} streams: {stats['good'] + stats['bad']} requests ({stats['good']} good, "
          f"{stats['bad']} malformed or aborted), {len(stats['errors'])} errors on good requests, "
          f"{server_errors(m) - errors_start:g} 5xx; good requests p50 {percentile(lat, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(lat, 0.99) * 1000:.0f} ms; RSS {rss_start:.0f} MiB at the start, {rss_end:.0f} MiB "
          f"at the end; cache slots free {m['glassforge_cache_slots_free']:g} of {MAX_BATCH}")
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["bad_errors"] == [], stats["bad_errors"][:5]
    assert stats["good"] > 10 * STREAMS and stats["bad"] > STREAMS
    assert server_errors(m) == errors_start == 0
    assert m["glassforge_cache_slots_free"] == MAX_BATCH and m["glassforge_queue_depth"] == 0  # 0 leaked slots
    assert m["glassforge_cancelled_total"] > 0  # the aborted streams were cancelled, not run out
    assert rss_end < rss_start + 64, (rss_start, rss_end)


@pytest.mark.slow
def test_rss_after_large_requests(tiny_run):
    """The server's memory after rounds of the largest requests the default limits allow, and after requests
    far over them (6 MiB of text to trace, tokenize or embed: before, three such traces took it to 9.7 GB)."""
    text = "import json\nwith open(path) as f:\n    data = json.load(f)\n" * 5000
    big = ([("/v1/trace", {"text": text[:1 << 16]})] * 3 + [("/tokenize", {"prompt": text[:1 << 18]})] * 3 +
           [("/v1/embeddings", {"input": [text[:300]] * 800})])
    over = [("/v1/trace", {"text": text * 25}), ("/tokenize", {"prompt": text * 25}),
            ("/v1/embeddings", {"input": text * 25})]
    with glassforge_serve(tiny_run) as root:
        assert all(r.status_code == 200 for r in post_concurrently(root, big))  # load what stays loaded
        base = rss_mib(root)
        rounds = [post_concurrently(root, big) for _ in range(3)]
        after = rss_mib(root)
        peak = metrics_of(root)["glassforge_resident_memory_peak_bytes"] / 2**20
        refused = post_concurrently(root, over)
        after_over = rss_mib(root)
    print(f"\nRSS after warm-up {base:.0f} MiB; after 3 rounds of 3 traces of 64 Ki chars, 3 tokenizings of 256 Ki "
          f"chars and 800 embeddings at once: {after:.0f} MiB (peak {peak:.0f} MiB); after three 7 MB requests "
          f"(400s): {after_over:.0f} MiB")
    assert all(r.status_code == 200 for rs in rounds for r in rs)
    assert [r.json()["error"]["code"] for r in refused] == ["string_above_max_length"] * 3
    assert after < base + 64 and after_over < after + 32, (base, after, after_over)
