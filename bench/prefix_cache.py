"""Time to first token on a multi-turn chat, with and without prefix caching, ours and llama-server's.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/prefix_cache.py [RELEASE] [--recipe gpu-small] [--turns 6]

Each conversation is a long system prompt (a stretch of a standard-library module's source), then turns of a
user question and the model's reply (greedy, `--reply` tokens, end-of-text ignored), every reply fed back. Each
turn's prompt is the chat template's rendering of the whole conversation so far, sent to `/v1/completions` as
text, streamed; the time to the first streamed token is what is measured. So every side sees the same prompts.

Sides, each its own server on the same weights (random ones in the recipe's shape unless a release is given):
ours with the prefix cache (`glassforge serve`), ours with `--no-prefix-cache`, and, when llama-server is
built (bash bench/build_llama_server.sh), llama.cpp's server on the release exported to Q8_0 with
`cache_prompt` true and false. Rounds alternate the sides' order turn by turn, so a neighbour's load falls
on all alike. `--conversations N` runs N conversations at once (each side's turns in step).

Prints, per turn, each side's median time to first token over `--rounds`, and the ratio of each side
without its cache to with it; and our cached side against llama-server's cached side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
from serve_ab import start, start_llama_server, wait_ready  # noqa: E402
from serve_throughput import find_llama_server, make_random_release, sse_objects  # noqa: E402

QUESTIONS = ["What does this module do?", "Which function should I call first?", "How are errors reported?",
             "Show me a short example.", "What does the second argument mean?", "Is it safe with threads?",
             "What changed in recent versions?", "Summarise the answer in one line."]


def system_prompt(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of a standard-library module's source: a long, shared, realistic prefix."""
    import json as json_module

    text = Path(json_module.__file__).parent.joinpath("decoder.py").read_text()
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:tokens]
    return "You answer questions about this code:\n" + tokenizer.decode(ids)


def warm(base: str) -> None:
    """One small completion, retried: a fresh llama-server has closed its first connection unanswered."""
    import httpx

    for attempt in range(5):
        try:
            httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            return
        except httpx.HTTPError:
            time.sleep(1)
    raise SystemExit(f"prefix_cache: {base} does not answer")


async def first_token(client, url: str, body: dict) -> tuple[float, str]:
    """(seconds to the first streamed text, the whole text) of one streaming completion."""
    start_time = time.perf_counter()
    first, text = None, ""
    async for obj in sse_objects(client, url, body):
        piece = "".join(c.get("text") or "" for c in obj.get("choices") or [])
        if piece and first is None:
            first = time.perf_counter() - start_time
        text += piece
    return first if first is not None else time.perf_counter() - start_time, text


async def run(sides: dict[str, tuple[str, dict]], render, system: str, turns: int, reply: int,
              conversations: int, rounds: int) -> dict[str, list[list[float]]]:
    """ttft[side][turn] = the times to first token of that turn over every round and conversation."""
    import httpx

    ttft = {name: [[] for _ in range(turns)] for name in sides}
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(rounds):
            # fresh conversations each round, their system prompts told apart at the start: a first turn finds
            # nothing cached (it is the control), later turns find their conversation's earlier prompts
            state = {name: [[{"role": "system", "content": f"# round {r}, conversation {c}\n{system}"}]
                            for c in range(conversations)] for name in sides}
            for turn in range(turns):
                order = list(sides) if (r + turn) % 2 == 0 else list(reversed(sides))
                for name in order:
                    base, extra = sides[name]

                    async def one(messages):
                        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
                        body = {"prompt": render(messages), "max_tokens": reply, "temperature": 0, "stream": True,
                                **extra}
                        seconds, text = await first_token(client, f"{base}/v1/completions", body)
                        messages.append({"role": "assistant", "content": text})
                        return seconds

                    got = await asyncio.gather(*(one(m) for m in state[name]))
                    ttft[name][turn] += got
    return ttft


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", nargs="?", type=Path, help="a release (default: random weights in --recipe's shape)")
    p.add_argument("--recipe", default="default", help="the model shape of the random weights (default, gpu-small)")
    p.add_argument("--system-tokens", type=int, default=200)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--reply", type=int, default=24, help="tokens per reply")
    p.add_argument("--conversations", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peer-threads", type=int, default=1, help="llama-server's decode threads (-t)")
    p.add_argument("--no-peer", action="store_true", help="skip llama-server")
    args = p.parse_args()

    from glassforge.tokenizer.bpe import END, ENDOFTEXT, load_tokenizer, render_chat

    with tempfile.TemporaryDirectory() as tmp:
        release = args.release or make_random_release(Path(tmp), args.recipe)
        tokenizer = load_tokenizer(release)
        system = system_prompt(tokenizer, args.system_tokens)
        ours = {"ignore_eos": True}
        procs, sides = [], {}
        for name, env in (("ours, cached", ""), ("ours, no cache", "GLASSFORGE_PREFIX_CACHE=0")):
            proc, base = start(release, env)
            procs.append(proc)
            sides[name] = (base, ours)
        binary = None if args.no_peer else find_llama_server()
        try:
            for proc, (base, _) in zip(procs, sides.values()):
                wait_ready(proc, base)
            if binary:
                proc, base = start_llama_server(release, Path(tmp), args.conversations, args.peer_threads)
                procs.append(proc)
                wait_ready(proc, base, peer=True)
                warm(base)
                # the peer has no ignore_eos: end-of-text is biased away instead
                peer = {"logit_bias": {str(tokenizer.token_to_id(t)): -100 for t in (END, ENDOFTEXT)}}
                sides["llama-server, cached"] = (base, {**peer, "cache_prompt": True})
                sides["llama-server, no cache"] = (base, {**peer, "cache_prompt": False})
            ttft = asyncio.run(run(sides, lambda m: render_chat(m, True), system, args.turns, args.reply,
                                   args.conversations, args.rounds))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        lengths, messages = [], [{"role": "system", "content": "# round 0, conversation 0\n" + system}]
        for turn in range(args.turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            lengths.append(len(tokenizer.encode(render_chat(messages, True), add_special_tokens=False).ids))
            messages.append({"role": "assistant", "content": "x " * args.reply})
    shape = str(args.release) if args.release else f"random weights, {args.recipe} shape"
    print(f"time to first token (ms, median of {args.rounds} rounds x {args.conversations} conversation(s)), "
          f"{shape}; {args.reply}-token replies")
    names = list(sides)
    print(f"{'turn':>4} {'prompt':>7} " + " ".join(f"{n:>22}" for n in names) + "   no cache / cached")
    summary = {}
    for turn in range(args.turns):
        med = {n: median(ttft[n][turn]) * 1000 for n in names}
        ratios = [med[f"{who}, no cache"] / med[f"{who}, cached"] for who in ("ours", "llama-server")
                  if f"{who}, cached" in med]
        print(f"{turn + 1:>4} {'~' + str(lengths[turn]):>7} " + " ".join(f"{med[n]:>22.1f}" for n in names)
              + "   " + ", ".join(f"{r:.2f}x" for r in ratios))
        summary[turn + 1] = med
    later = {n: median([x for turn in range(1, args.turns) for x in ttft[n][turn]]) * 1000 for n in names}
    print("turns 2 and later, median ms: " + ", ".join(f"{n} {v:.1f}" for n, v in later.items()))
    print(f"ours: no cache / cached = {later['ours, no cache'] / later['ours, cached']:.2f}x")
    if "llama-server, cached" in later:
        print(f"cached: llama-server / ours = {later['llama-server, cached'] / later['ours, cached']:.2f}x")
    print(json.dumps({"per_turn_ms": summary, "later_turns_ms": later}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
