"""Serving throughput: glassforge's server against HF transformers and llama.cpp, same weights, same run.

    flock /tmp/gf-cpu.lock .venv/bin/python bench/serve_throughput.py [RELEASE] [--tokens 128]
        [--concurrency 1,4,16,32] [--decode-weights f32|bf16|int8] [--gguf FILE | --gguf-dtype D]
        [--no-hf] [--no-llamacpp] [--no-peer-servers] [--llama-server PATH]
        [--decode-threads N|auto] [--probe-threads]

RELEASE is a run folder or release/ folder; without one, a random-weight model
with the `default` recipe's shape (d_model 256, 4 layers, 8 heads, 4 KV heads,
4096-token vocabulary, tied embeddings) is made in a temporary folder:
throughput does not depend on what the weights learned.

Measured, all greedy with end-of-text ignored so every stream makes exactly
--tokens tokens; every rate is the median of several runs (SINGLE_REPEATS for
one stream, REPEATS for the aggregates):

- glassforge server: `glassforge serve` in a subprocess (--max-batch 32),
  driven over loopback by streaming /v1/completions clients, once its decode
  steps have compiled, ahead of time too (`/health` says so). Single-stream decode rate =
  (tokens - 1) / (time of last token - time of first token), which leaves out
  the prompt's prefill. Aggregate rate at N concurrent streams = all tokens /
  wall time of the N requests.
- glassforge engine in-process (no HTTP), single stream, for reference.
- HF transformers `generate()` on the same safetensors (f32), single stream,
  decode rate measured the same way (time of N tokens minus time of 1 token).
- llama.cpp through llama-cpp-python on the same weights exported to GGUF by
  `glassforge.release.export.export_gguf` at the precision of our decode weights
  (int8 -> Q8_0, bf16 -> BF16, f32 -> F32; --gguf-dtype overrides); skipped
  with a message when llama_cpp or the export is unavailable.
- llama.cpp behind HTTP, on the same GGUF, driven by the same kind of
  streaming client as our server, so that the server is also compared like
  for like: llama-cpp-python's OpenAI-compatible server (`python -m
  llama_cpp.server`; pip install -c constraints.txt 'llama-cpp-python[server]')
  at 1 stream and 16 (it serves one request at a time), and llama.cpp's own C++
  `llama-server` (bash bench/build_llama_server.sh) at 1 stream and every
  --concurrency level, with one slot per stream. These peers are asked for no
  log-probs, where our server's streams carry them (the client counts tokens by
  them), so any difference there favours the peers.

The peers are each measured with 1 thread and with one per core, and their
best is reported; glassforge runs as it ships (decode on one intra-op thread,
long prefills on all).

Prints a table and the ratios the serving targets are stated in, and one JSON
line (for docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

THREADS = sorted({1, os.cpu_count() or 1})  # HF and llama.cpp are measured at each; the best counts
# rates are medians over this many runs (the shared machine's load moves them); one stream's 128 tokens take
# under 0.1 s, so single-stream rates take more runs
REPEATS = 3
SINGLE_REPEATS = 9
# llama.cpp runs a GGUF of the precision our decode steps use (GLASSFORGE_DECODE_WEIGHTS): Q8_0 is llama.cpp's
# int8 weight format (per-32-weight scales, so a little more precise than our per-row int8)
GGUF_FOR_WEIGHTS = {"f32": "f32", "bf16": "bf16", "int8": "q8_0"}

BUSY = {"compiling", "waiting"}  # /health states of a decode step still being made: measure after them
PROMPT = "import json\n\n\ndef load_config(path):\n    \"\"\"Read a JSON configuration file.\"\"\"\n"


def make_random_release(folder: Path, recipe: str = "default") -> Path:
    """A release-layout folder with random weights in a recipe's model shape (default: the default recipe's)."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from glassforge.core.recipe import load_recipe
    from glassforge.data import pystdlib
    from glassforge.model.llama import Llama
    from glassforge.release.stage import write_model_folder
    from glassforge.tokenizer.bpe import train_tokenizer, write_tokenizer_files

    shape = load_recipe(recipe)
    modules = ["json", "textwrap", "string", "csv", "difflib"] if recipe == "default" else None
    texts = [d.text for d in pystdlib.iter_documents(modules)]
    tok = train_tokenizer(texts, shape.tokenizer.vocab_size)
    tok_dir = folder / "_tokenizer"
    write_tokenizer_files(tok_dir, tok)
    cfg = dataclasses.replace(shape.model, vocab_size=shape.tokenizer.vocab_size)
    torch.manual_seed(0)
    save_file(Llama(cfg).hf_state_dict(), tok_dir / "weights.safetensors")
    release = folder / "release"
    release.mkdir(parents=True)
    write_model_folder(release, cfg, tok_dir / "weights.safetensors", tok_dir)
    return release


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def sse_objects(client, url: str, body: dict):
    """The JSON objects of a streaming completion's SSE events, raising on an in-band error."""
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            yield obj


async def timed_stream(objects, count) -> tuple[int, float, float, float]:
    """(tokens, start, first token time, last token time) of a stream, count(obj) giving each event's tokens."""
    start = time.perf_counter()
    first = last = None
    n = 0
    async for obj in objects:
        got = count(obj)
        if got:
            now = time.perf_counter()
            first = first or now
            last = now
            n += got
    return n, start, first, last


def logprob_tokens(obj: dict) -> int:
    return sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in obj["choices"])


def content_chunks(obj: dict) -> int:
    return int(any(c.get("finish_reason") is None for c in obj.get("choices") or []))


async def stream_once(client, url: str, prompt_ids: list[int], tokens: int) -> tuple[int, float, float, float]:
    """One streaming completion from our server, tokens counted exactly by their log-probs."""
    body = {"prompt": prompt_ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    return await timed_stream(sse_objects(client, url, body), logprob_tokens)


async def stream_peer(client, url: str, body: dict, tokens: int) -> tuple[int, float, float, float]:
    """One streaming completion from a peer server, asked for no log-probs: tokens are counted as content
    chunks, which these servers send one per token. (No stream_options: llama-cpp-python's server breaks
    the stream on it.)"""
    return await timed_stream(sse_objects(client, url, {**body, "max_tokens": tokens, "stream": True}),
                              content_chunks)


async def server_runs(base: str, stream, tokens: int, levels: list[int]) -> dict:
    """Single-stream decode rate and the aggregate rate at each level; stream(client, url, tokens) is one
    streaming completion, timed."""
    import httpx

    url = f"{base}/v1/completions"
    out = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=max(levels, default=1) + 4)) as client:
        await stream(client, url, 8)  # warm up
        rates = []
        for _ in range(SINGLE_REPEATS):
            n, start, first, last = await stream(client, url, tokens)
            if n < tokens:
                raise RuntimeError(f"made {n} of {tokens} tokens")
            rates.append((n - 1) / (last - first))
        out["single_decode_tps"] = median(rates)
        for c in levels:
            rates = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                res = await asyncio.gather(*(stream(client, url, tokens) for _ in range(c)))
                wall = time.perf_counter() - t0
                total = sum(r[0] for r in res)
                if total < c * tokens:
                    raise RuntimeError(f"{c} streams made {total} of {c * tokens} tokens")
                rates.append(total / wall)
            out[f"aggregate_tps_{c}"] = median(rates)
    return out


def bench_peer_server(name: str, argv: list[str], ready_path: str, body: dict, tokens: int,
                      levels: list[int]) -> dict:
    """Start a peer's server (argv, with its port already in it), wait until ready_path answers, measure."""
    import httpx

    port = argv[argv.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not start ({' '.join(argv)})")
            time.sleep(0.2)
        return asyncio.run(server_runs(base, lambda client, url, n: stream_peer(client, url, body, n), tokens,
                                       levels))
    except (RuntimeError, httpx.HTTPError):
        time.sleep(1)  # a crash's last words
        log.seek(0)
        state = "still running" if proc.poll() is None else f"exited with {proc.returncode}"
        print(f"{name} ({state}), its last output lines:\n" + "".join(log.readlines()[-8:]), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def find_llama_server() -> str | None:
    """llama-server on PATH, else beside this Python (where bench/build_llama_server.sh puts it)."""
    import shutil

    beside = Path(sys.executable).parent / "llama-server"
    return shutil.which("llama-server") or (str(beside) if beside.exists() else None)


def llama_server_argv(binary: str, gguf: Path, n_ctx: int, slots: int, threads: int, port: int) -> list[str]:
    """llama.cpp's server on loopback with `slots` sequences of n_ctx tokens each, batched together."""
    return [binary, "-m", str(gguf), "-c", str(n_ctx * slots), "-np", str(slots), "-t", str(threads),
            "-tb", str(THREADS[-1]), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]


def peer_body(release: Path) -> dict:
    """A greedy completion request for a peer server, end-of-text biased away (the peers have no ignore_eos)."""
    from glassforge.tokenizer.bpe import END, ENDOFTEXT, load_tokenizer

    tok = load_tokenizer(release)
    return {"prompt": PROMPT, "temperature": 0, "logit_bias": {str(tok.token_to_id(t)): -100 for t in (END, ENDOFTEXT)}}


def bench_llamacpp_servers(release: Path, gguf: Path, tokens: int, levels: list[int],
                           llama_server: str | None) -> dict:
    """llama.cpp behind HTTP, driven by the same kind of streaming client as our server.

    - llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`), which runs one
      request at a time;
    - llama.cpp's own C++ `llama-server`, when a binary is given or on PATH, with one slot per stream
      of the largest level (continuous batching).

    Each at 1 thread and at one per core, the best kept per measure. They are asked for no log-probs
    (ours is, which is more work for ours), greedy, with end-of-text biased away so every stream makes
    --tokens tokens.
    """
    import importlib.util

    import httpx

    n_ctx = json.loads((release / "config.json").read_text())["max_position_embeddings"]
    body = peer_body(release)
    peers = {}
    if importlib.util.find_spec("sse_starlette") and importlib.util.find_spec("llama_cpp"):
        peers["llama-cpp-python server"] = (
            lambda threads, port: [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx",
                                   str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(THREADS[-1]),
                                   "--host", "127.0.0.1", "--port", str(port), "--verbose", "False",
                                   "--interrupt_requests", "False"],  # queue a new request, not cut the last
            "/v1/models", [16] if 16 in levels else [])  # one request at a time: one level says so
    else:
        print("llama-cpp-python server skipped: .venv/bin/pip install -c constraints.txt "
              "'llama-cpp-python[server]'", file=sys.stderr)
    llama_server = llama_server or find_llama_server()
    if llama_server:
        slots = max(levels, default=1)
        peers["llama.cpp llama-server"] = (
            lambda threads, port: llama_server_argv(llama_server, gguf, n_ctx, slots, threads, port), "/health", levels)
    else:
        print("llama-server skipped: bash bench/build_llama_server.sh, or --llama-server PATH", file=sys.stderr)
    out = {}
    for name, (argv, ready, peer_levels) in peers.items():
        best: dict = {}
        for threads in THREADS:
            got = {}
            for attempt in (1, 2):  # llama-server has now and then closed a first connection unanswered
                try:
                    got = bench_peer_server(name, argv(threads, free_port()), ready, body, tokens, peer_levels)
                    break
                except (RuntimeError, httpx.HTTPError) as e:  # a peer that fails is reported, not fatal
                    print(f"{name}, {threads} thread(s), try {attempt}: {type(e).__name__}: {e}", file=sys.stderr)
            best = {k: max(v, best.get(k, 0.0)) for k, v in got.items()}
        out[name] = best
    return out


def bench_server(release: Path, prompt_ids: list[int], tokens: int, levels: list[int],
                 decode_threads: str | int | None = None) -> dict:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if decode_threads:
        env["GLASSFORGE_DECODE_THREADS"] = str(decode_threads)
    proc = subprocess.Popen([sys.executable, "-m", "glassforge", "serve", str(release), "--port", str(port),
                             "--max-batch", str(max(levels))], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:  # up, and done compiling its decode step (the engine decodes eagerly until then)
            try:
                r = httpx.get(f"{base}/health", timeout=1)
                if r.status_code == 200 and not {r.json().get("decode_compile"), r.json().get("decode_aot")} & BUSY:
                    compile_state = f"{r.json().get('decode_compile')}, aot {r.json().get('decode_aot')}"
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        runs = server_runs(base, lambda client, url, n: stream_once(client, url, prompt_ids, n), tokens, levels)
        return {**asyncio.run(runs), "server_decode_compile": compile_state}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_engine(release: Path, prompt_ids: list[int], tokens: int) -> float:
    import queue

    from glassforge.serve.engine import Engine
    from glassforge.serve.types import SamplingParams

    engine = Engine(release, max_batch=1)
    try:
        engine.wait_compiled()
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        engine.generate(prompt_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        q: queue.SimpleQueue = queue.SimpleQueue()
        times = []

        def sink(ev):
            times.append((time.perf_counter(), ev.completion_tokens))
            q.put(ev)

        rates = []
        for _ in range(SINGLE_REPEATS):
            times.clear()
            engine.submit([(0, prompt_ids, params)], sink)
            while not q.get().finish_reason:
                pass
            (t_first, n_first), (t_last, n_last) = times[0], times[-1]
            rates.append((n_last - n_first) / (t_last - t_first))
        return median(rates)
    finally:
        engine.close()


def bench_hf(release: Path, prompt_ids: list[int], tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    x = torch.tensor([prompt_ids])

    def timed(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)
        assert out.shape[1] - x.shape[1] == n
        return time.perf_counter() - t

    best = 0.0
    for threads in THREADS:  # the peer at its best thread count
        torch.set_num_threads(threads)
        timed(4)
        t1 = min(timed(1) for _ in range(3))
        best = max(best, median([(tokens - 1) / (timed(tokens) - t1) for _ in range(SINGLE_REPEATS)]))
    torch.set_num_threads(THREADS[-1])
    return best


def bench_llamacpp(release: Path, gguf: Path, prompt_ids: list[int], tokens: int):
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        return None, "llama-cpp-python is not installed (.venv/bin/pip install -c constraints.txt llama-cpp-python)"
    from glassforge.tokenizer.bpe import END, ENDOFTEXT, load_tokenizer

    tok = load_tokenizer(release)
    n_ctx = json.loads((release / "config.json").read_text())["max_position_embeddings"]
    bias = {tok.token_to_id(END): -1e9, tok.token_to_id(ENDOFTEXT): -1e9}

    def run(llm, n: int) -> tuple[int, float, float]:
        first = last = None
        count = 0
        for _ in llm.create_completion(prompt_ids, max_tokens=n, temperature=0.0, top_k=1, stream=True,
                                       logit_bias=bias):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
        return count, first, last

    best = 0.0
    for threads in THREADS:  # the peer at its best thread count
        llm = LlamaCpp(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=THREADS[-1],
                       n_batch=512, verbose=False)
        run(llm, 8)
        rates = []
        for _ in range(SINGLE_REPEATS):
            count, first, last = run(llm, tokens)
            if count < tokens:
                return None, f"llama.cpp made {count} of {tokens} tokens"
            rates.append((count - 1) / (last - first))
        best = max(best, median(rates))
        del llm
    return best, None


def probe_threads(release: Path, batches=(1, 4, 16, 32), span: int = 150, steps: int = 60) -> None:
    """Median and 10th-percentile ms per decode step at each batch size, with 1 and with all threads."""
    import torch

    from glassforge.serve.engine import Engine
    from glassforge.serve.fastpath import compile_settings

    engine = Engine(release, max_batch=max(batches))
    print("decode weights:", engine.fast.weights, "compiled:", engine.wait_compiled())
    engine.close()
    torch.set_grad_enabled(False)
    compile_settings()  # this thread runs the compiled step too (a 2-thread graph compiles on first use)
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        row = []
        for b in batches:
            tok, pos = torch.zeros(b, dtype=torch.long), torch.full((b,), span)
            for _ in range(3):
                engine.fast.decode(tok, pos, engine.cache)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                engine.fast.decode(tok, pos, engine.cache)
                times.append(time.perf_counter() - t)
            times.sort()
            row.append(f"batch {b}: {times[len(times) // 2] * 1e3:.2f} ms (p10 {times[len(times) // 10] * 1e3:.2f})")
        print(f"{threads} thread(s): " + ", ".join(row))
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", nargs="?", type=Path)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--gguf", type=Path)
    p.add_argument("--gguf-dtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="the precision of the GGUF llama.cpp runs (default: that of our decode weights)")
    p.add_argument("--decode-weights", choices=["f32", "bf16", "int8"],
                   help="our decode steps' weights (GLASSFORGE_DECODE_WEIGHTS; default: the engine's)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--no-peer-servers", action="store_true", help="skip llama.cpp behind HTTP")
    p.add_argument("--llama-server", help="a llama-server binary (llama.cpp's C++ server; default: llama-server on PATH, else beside this "
                        "Python, where bench/build_llama_server.sh puts it)")
    p.add_argument("--decode-threads", help="the server's decode threads: a number, or auto (default: the engine's, 1)")
    p.add_argument("--probe-threads", action="store_true",
                   help="only time decode steps with 1 and with all threads at batch 1, 4, 16, 32")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.decode_weights:  # read by the in-process engine and inherited by the server subprocess
        os.environ["GLASSFORGE_DECODE_WEIGHTS"] = args.decode_weights

    import torch

    from glassforge.serve.fastpath import DEFAULT_DECODE_WEIGHTS
    from glassforge.release.export import export_gguf
    from glassforge.core.runfolder import resolve_release
    from glassforge.tokenizer.bpe import load_tokenizer

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        release = resolve_release(args.release) if args.release else make_random_release(tmp)
        if args.probe_threads:
            probe_threads(release)
            return 0
        prompt_ids = load_tokenizer(release).encode(PROMPT, add_special_tokens=False).ids
        res: dict = {"release": str(args.release or "random weights, default-recipe shape"),
                     "tokens": args.tokens, "prompt_tokens": len(prompt_ids), "torch_threads": torch.get_num_threads()}
        res["engine_single_decode_tps"] = bench_engine(release, prompt_ids, args.tokens)
        res.update(bench_server(release, prompt_ids, args.tokens, levels, args.decode_threads))
        res["decode_threads"] = args.decode_threads or "1 (default)"
        res["decode_weights"] = os.environ.get("GLASSFORGE_DECODE_WEIGHTS") or DEFAULT_DECODE_WEIGHTS
        if not args.no_hf:
            res["hf_single_decode_tps"] = bench_hf(release, prompt_ids, args.tokens)
        if not args.no_llamacpp:
            res["gguf_dtype"] = args.gguf_dtype or GGUF_FOR_WEIGHTS[res["decode_weights"]]
            if args.gguf:
                res["gguf_dtype"] = f"given file {args.gguf.name}"
            gguf = args.gguf or Path(export_gguf(release, tmp / "model.gguf", res["gguf_dtype"])["gguf"])
            tps, why = bench_llamacpp(release, gguf, prompt_ids, args.tokens)
            if tps is None:
                print(f"llama.cpp skipped: {why}", file=sys.stderr)
                res["llamacpp_skipped"] = why
            else:
                res["llamacpp_single_decode_tps"] = tps
            if not args.no_peer_servers:
                res["peer_servers"] = bench_llamacpp_servers(release, gguf, args.tokens, levels, args.llama_server)

    single = res["single_decode_tps"]
    print(f"{'measure':52s} {'tokens/s':>10s}")
    print(f"our decode weights: {res['decode_weights']}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = [("glassforge engine, 1 stream (in-process)", res["engine_single_decode_tps"]),
            ("glassforge server, 1 stream (decode)", single)]
    rows += [(f"glassforge server, {c} streams (aggregate)", res[f"aggregate_tps_{c}"]) for c in levels]
    if "hf_single_decode_tps" in res:
        rows.append(("HF transformers generate() (f32), 1 stream", res["hf_single_decode_tps"]))
    if "llamacpp_single_decode_tps" in res:
        rows.append((f"llama.cpp (llama-cpp-python, {res['gguf_dtype']}), 1 stream", res["llamacpp_single_decode_tps"]))
    for peer, got in res.get("peer_servers", {}).items():
        rows.append((f"{peer}, 1 stream (decode)", got.get("single_decode_tps")))
        rows += [(f"{peer}, {c} streams (aggregate)", got[f"aggregate_tps_{c}"]) for c in levels
                 if f"aggregate_tps_{c}" in got]
    for name, v in rows:
        print(f"{name:52s} {v:10.1f}" if v else f"{name:52s} {'failed':>10s}")
    print()
    if "hf_single_decode_tps" in res:
        res["ratio_single_vs_hf"] = single / res["hf_single_decode_tps"]
        print(f"server 1 stream / HF transformers:  {res['ratio_single_vs_hf']:.2f}x  (target >= 3)")
    if "llamacpp_single_decode_tps" in res:
        res["ratio_single_vs_llamacpp"] = single / res["llamacpp_single_decode_tps"]
        print(f"server 1 stream / llama.cpp:        {res['ratio_single_vs_llamacpp']:.2f}x  (target >= 1)")
        # like for like: llama-cpp-python runs in process, without an HTTP stream or a client beside it
        res["ratio_engine_vs_llamacpp"] = res["engine_single_decode_tps"] / res["llamacpp_single_decode_tps"]
        print(f"engine in-process / llama.cpp:      {res['ratio_engine_vs_llamacpp']:.2f}x  (both in process)")
    for peer, got in res.get("peer_servers", {}).items():  # like for like: both behind HTTP, same client
        if got.get("single_decode_tps"):
            res[f"ratio_single_vs_{peer}"] = single / got["single_decode_tps"]
            print(f"server 1 stream / {peer + ':':26s} {res[f'ratio_single_vs_{peer}']:.2f}x  (both over HTTP)")
    if "aggregate_tps_16" in res:
        res["ratio_aggregate16_vs_single"] = res["aggregate_tps_16"] / single
        print(f"server 16 streams / 1 stream:       {res['ratio_aggregate16_vs_single']:.2f}x  (target >= 6)")
        for peer, got in res.get("peer_servers", {}).items():
            if got.get("aggregate_tps_16") and got.get("single_decode_tps"):
                res[f"ratio_aggregate16_vs_single_{peer}"] = got["aggregate_tps_16"] / got["single_decode_tps"]
                print(f"{peer}, 16 streams / 1 stream: {res[f'ratio_aggregate16_vs_single_{peer}']:.2f}x")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
