"""Our server and llama.cpp's llama-server, measured by an outside client: NVIDIA's aiperf, from PyPI.

    python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf==0.13.0   # the client, in its own venv
    bash bench/build_llama_server.sh                                             # the peer
    flock /tmp/gf-cpu.lock .venv/bin/python bench/outside_client.py --aiperf /tmp/aiperf/bin/aiperf \
        [RELEASE] [--recipe gpu-small] [--concurrency 1,4,16,32]

Both servers serve the same weights (random ones in the recipe's shape unless a release is given: default
is the default recipe's 4M parameters, gpu-small about 100M), ours as `glassforge serve` (int8 decode
weights, its default) and llama-server on the release exported to Q8_0 (llama.cpp's int8), with one slot per
stream. aiperf drives each in turn with streaming completions of synthetic prompts (`--isl` tokens, counted
by the release's own tokenizer, a local path: nothing is downloaded) and `--osl` tokens out (end-of-text
ignored on both), `--requests` per stream at each concurrency, the two servers' order alternating level by
level. The client shares the two cores with the server it measures, alike for both.

Prints, per concurrency: time to first token and inter-token latency (p50 and p99, ms) and output
throughput (tokens/s) of each, and ours over theirs (throughput: higher is better; latency: theirs over
ours, so above 1 is ours ahead as well). The whole table goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prefix_cache import warm  # noqa: E402
from serve_ab import start, start_llama_server, wait_ready  # noqa: E402
from serve_throughput import make_random_release  # noqa: E402

METRICS = (("ttft_p50", "time_to_first_token", "p50"), ("ttft_p99", "time_to_first_token", "p99"),
           ("itl_p50", "inter_token_latency", "p50"), ("itl_p99", "inter_token_latency", "p99"),
           ("tokens_per_s", "output_token_throughput", "avg"))


def model_name(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]


def profile(aiperf: str, base: str, model: str, tokenizer: Path, concurrency: int, args, out: Path) -> dict:
    """One aiperf run; its figures, or the reason it failed."""
    requests = max(concurrency * args.requests, 8)
    cmd = [aiperf, "profile", "--model", model, "--url", base, "--endpoint-type", "completions", "--streaming",
           "--concurrency", str(concurrency), "--request-count", str(requests),
           "--warmup-request-count", str(concurrency), "--isl", str(args.isl), "--isl-stddev", "0",
           "--osl", str(args.osl), "--tokenizer", str(tokenizer), "--extra-inputs", "ignore_eos:true",
           "--random-seed", "1", "--artifact-dir", str(out), "--ui-type", "none", "--no-gpu-telemetry",
           "--no-server-metrics", "--workers-max", "1", "--record-processor-service-count", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    export = out / "profile_export_aiperf.json"
    if r.returncode != 0 or not export.is_file():
        return {"error": (r.stdout + r.stderr)[-1500:]}
    data = json.loads(export.read_text())
    got = {name: data[metric][stat] for name, metric, stat in METRICS}
    got["requests"] = data["request_count"]["avg"]
    got["error_percent"] = (data.get("request_error_rate") or {}).get("avg", 0.0)
    got["error_summary"] = data.get("error_summary") or []
    return got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", nargs="?", type=Path, help="a release (default: random weights in --recipe's shape)")
    p.add_argument("--recipe", default="default", help="the shape of the random weights (default, gpu-small)")
    p.add_argument("--aiperf", default=shutil.which("aiperf"), help="the aiperf executable (its own venv)")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--isl", type=int, default=128, help="prompt tokens")
    p.add_argument("--osl", type=int, default=128, help="output tokens")
    p.add_argument("--requests", type=int, default=4, help="requests per stream at each concurrency")
    p.add_argument("--peer-threads", type=int, default=1, help="llama-server's decode threads (-t; 1, as ours)")
    p.add_argument("--out", type=Path, help="write the table as JSON here")
    args = p.parse_args()
    if not args.aiperf:
        raise SystemExit("outside_client: no aiperf (pip install aiperf, in its own venv; --aiperf PATH)")
    levels = [int(x) for x in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        release = args.release or make_random_release(tmp_path, args.recipe)
        ours, ours_base = start(release, "")
        peer, peer_base = start_llama_server(release, tmp_path, max(levels), args.peer_threads)
        results: dict[str, dict[int, dict]] = {"glassforge": {}, "llama-server": {}}
        try:
            wait_ready(ours, ours_base)
            wait_ready(peer, peer_base, peer=True)
            warm(peer_base)
            servers = {"glassforge": (ours_base, model_name(ours_base)),
                       "llama-server": (peer_base, model_name(peer_base))}
            for i, c in enumerate(levels):
                for name in (list(servers) if i % 2 == 0 else list(reversed(servers))):
                    base, model = servers[name]
                    results[name][c] = profile(args.aiperf, base, model, release, c, args,
                                               tmp_path / f"{name}-{c}")
                    print(f"{name}, {c} streams: {results[name][c]}", file=sys.stderr, flush=True)
        finally:
            for proc in (ours, peer):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    shape = str(args.release) if args.release else f"random weights, {args.recipe} shape"
    print(f"aiperf, streaming completions, {args.isl} tokens in, {args.osl} out; {shape}")
    print(f"{'streams':>7} {'server':>12} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'tok/s':>8}")
    for c in levels:
        for name in results:
            r = results[name][c]
            if "error" in r:
                print(f"{c:>7} {name:>12} failed: {r['error'][-300:]}")
                continue
            print(f"{c:>7} {name:>12} {r['ttft_p50']:>9.1f} {r['ttft_p99']:>9.1f} {r['itl_p50']:>8.2f} "
                  f"{r['itl_p99']:>8.2f} {r['tokens_per_s']:>8.1f}  {r['requests']:.0f} requests, "
                  f"{r['error_percent']:.1f}% failed")
        a, b = results["glassforge"][c], results["llama-server"][c]
        if "error" not in a and "error" not in b:
            print(f"{c:>7} {'ours/theirs':>12} throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                  f"ITL p50 {b['itl_p50'] / a['itl_p50']:.2f}x, TTFT p50 {b['ttft_p50'] / a['ttft_p50']:.2f}x "
                  "(above 1: ours ahead)")
    if args.out:
        args.out.write_text(json.dumps({"shape": shape, "isl": args.isl, "osl": args.osl, "results": results},
                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
