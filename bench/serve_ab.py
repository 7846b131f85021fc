"""A/B of two server configurations on the same weights, requests interleaved so both share the machine's load.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/serve_ab.py "GLASSFORGE_DECODE_WEIGHTS=bf16" "" --streams 16

Each side is `glassforge serve` in its own subprocess with the given environment
assignments (space-separated NAME=VALUE; "" for none). Both are started, both
compile their decode steps, then rounds alternate A B, B A, ... so a neighbour's
load or the CPU's clock falls on both alike. A round is one streaming
completion (--streams 1: the decode rate, first to last token) or --streams N
concurrent ones (the aggregate rate, all tokens over the wall time). Prints
each side's median and the median of the per-round ratios A/B with their range.

B may be the word `llama-server`: llama.cpp's own server (bash
bench/build_llama_server.sh) on the release exported to Q8_0, with
--peer-threads threads (1) and one slot per stream, asked for no log-probs (ours sends them: the client
counts our tokens by them).

On a shared 2-core machine single runs of `serve_throughput.py` move by 30%
between runs; a change smaller than that is only visible this way. To compare
code, check the other version out beside this one (`git worktree add DIR REV`)
and give B "PYTHONPATH=DIR/src": its server then imports that glassforge.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
from serve_throughput import (BUSY, PROMPT, find_llama_server, free_port, llama_server_argv,  # noqa: E402
                              make_random_release, peer_body, stream_once, stream_peer)


def start(release: Path, assignments: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    for item in assignments.split():
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"serve_ab: {item!r} is not NAME=VALUE")
        env[name] = value
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glassforge", "serve", str(release), "--port", str(port),
                             "--max-batch", "32"], env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, peer: bool = False) -> str:
    """Wait until our server has compiled its decode steps, or a peer's /health answers 200."""
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            r = httpx.get(f"{base}/health", timeout=1)
            if r.status_code == 200 and peer:
                return "llama-server"
            if r.status_code == 200 and not {r.json().get("decode_compile"), r.json().get("decode_aot")} & BUSY:
                return f"{r.json().get('decode_compile')}, aot {r.json().get('decode_aot')}"
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"serve_ab: the server at {base} did not start")


async def rounds(bases: list[str], streams_of: list, tokens: int, streams: int, n: int) -> list[list[float]]:
    """Alternating rounds; streams_of[side](client, url, tokens) is one timed streaming completion."""
    import httpx

    rates: list[list[float]] = [[], []]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
        for base, stream in zip(bases, streams_of):
            await stream(client, f"{base}/v1/completions", 8)  # warm up
        for r in range(n):
            for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                url, stream = f"{bases[side]}/v1/completions", streams_of[side]
                if streams == 1:
                    got, _, first, last = await stream(client, url, tokens)
                    rates[side].append((got - 1) / (last - first))
                else:
                    t0 = time.perf_counter()
                    res = await asyncio.gather(*(stream(client, url, tokens) for _ in range(streams)))
                    rates[side].append(sum(x[0] for x in res) / (time.perf_counter() - t0))
    return rates


def start_llama_server(release: Path, folder: Path, streams: int, threads: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own server on the release exported to Q8_0 (the GGUF of our int8 decode)."""
    import json

    from glassforge.release.export import export_gguf

    binary = find_llama_server()
    if binary is None:
        raise SystemExit("serve_ab: no llama-server (bash bench/build_llama_server.sh)")
    gguf = Path(export_gguf(release, folder / "model.gguf", "q8_0")["gguf"])
    n_ctx = json.loads((release / "config.json").read_text())["max_position_embeddings"]
    port = free_port()
    proc = subprocess.Popen(llama_server_argv(binary, gguf, n_ctx, max(streams, 1), threads, port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="environment assignments for A, e.g. 'GLASSFORGE_DECODE_WEIGHTS=bf16'")
    p.add_argument("b", help="environment assignments for B ('' for the defaults), or llama-server")
    p.add_argument("release", nargs="?", type=Path, help="run or release folder (default: random weights)")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--peer-threads", type=int, default=1, help="llama-server's decode threads (-t)")
    args = p.parse_args()

    from glassforge.tokenizer.bpe import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        release = args.release or make_random_release(Path(tmp))
        peer = args.b == "llama-server"
        servers = [start(release, args.a),
                   start_llama_server(release, Path(tmp), args.streams, args.peer_threads) if peer else start(release, args.b)]
        try:
            states = [wait_ready(proc, base, peer and side == 1) for side, (proc, base) in enumerate(servers)]
            prompt_ids = load_tokenizer(release).encode(PROMPT, add_special_tokens=False).ids
            ours = lambda client, url, n: stream_once(client, url, prompt_ids, n)  # noqa: E731
            body = peer_body(release)
            theirs = lambda client, url, n: stream_peer(client, url, body, n)  # noqa: E731
            rates = asyncio.run(rounds([base for _, base in servers], [ours, theirs if peer else ours],
                                       args.tokens, args.streams, args.rounds))
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)
    ratios = sorted(a / b for a, b in zip(*rates))
    what = "decode tokens/s, 1 stream" if args.streams == 1 else f"aggregate tokens/s, {args.streams} streams"
    print(f"{what}; {args.rounds} rounds each; decode steps compiled: A {states[0]}, B {states[1]}")
    print(f"A ({args.a or 'defaults'}): {median(rates[0]):.1f}")
    print(f"B ({args.b or 'defaults'}): {median(rates[1]):.1f}")
    print(f"A/B: {median(ratios):.2f}x (rounds {ratios[0]:.2f}x to {ratios[-1]:.2f}x)")
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
