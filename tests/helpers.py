"""Helpers shared by tests: servers (in a thread or as `glassforge serve`), waiting, random model folders.

Test modules import from here, never from each other; fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator


def wait_until(condition: Callable[[], object], timeout: float, message: str, interval: float = 0.02):
    """Poll condition() until it returns something truthy (returned), failing the test after timeout seconds."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, message
        time.sleep(interval)


def sse_events(lines: Iterable[str]) -> list:
    """The `data:` payloads of a server-sent-events stream: parsed JSON, or the string "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 with an ephemeral port, in a thread (config: more uvicorn.Config settings)."""

    def __init__(self, app, **config):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 30, "server did not start")
        assert self.thread.is_alive(), "server thread died at start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.root = f"http://127.0.0.1:{port}"
        self.base = f"{self.root}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def engine_server(folder: Path, **engine_kw) -> Iterator[LiveServer]:
    """An eager-decoding Engine on folder behind the app on loopback; the server carries .engine and .model."""
    from glassforge.serve.app import create_app
    from glassforge.serve.engine import Engine

    engine = Engine(folder, **{"compile_decode": False, **engine_kw})
    srv = LiveServer(create_app(engine))
    srv.engine, srv.model = engine, engine.folder.name
    try:
        yield srv
    finally:
        srv.stop()
        engine.close()


@contextmanager
def glassforge_serve(run: Path, *args: str, env: dict | None = None, timeout: float = 120) -> Iterator[str]:
    """`python -m glassforge serve RUN` on a free port until the block ends; yields its root URL."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glassforge", "serve", str(run), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # decode steps stay eager unless the caller's environment (or env) says otherwise:
                            # a compile in the subprocess would take a core from the test for tens of seconds
                            env={"GLASSFORGE_DECODE_COMPILE": "0", **os.environ, "GLASSFORGE_API_KEY": "",
                                 **(env or {})})
    root = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"glassforge serve exited: {proc.stdout.read()}"
        try:
            return httpx.get(root + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout, "glassforge serve did not start", interval=0.2)
        yield root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def make_random_model_folder(folder: Path, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                             n_kv_heads: int = 2, vocab_size: int = 512, max_seq_len: int = 256,
                             tie_embeddings: bool = True, seed: int = 0) -> Path:
    """A Hugging Face-layout model folder with random weights and a small trained tokenizer."""
    import torch
    from safetensors.torch import save_file

    from glassforge.core.recipe import ModelConfig
    from glassforge.data import pystdlib
    from glassforge.model.llama import Llama
    from glassforge.release.stage import write_model_folder
    from glassforge.tokenizer.bpe import train_tokenizer, write_tokenizer_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [d.text for d in pystdlib.iter_documents(["json", "textwrap", "string"])]
    tok = train_tokenizer(texts, vocab_size)
    tok_dir = folder / "_tokenizer"
    write_tokenizer_files(tok_dir, tok)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    model = Llama(cfg)
    save_file(model.hf_state_dict(), tok_dir / "weights.safetensors")
    write_model_folder(folder, cfg, tok_dir / "weights.safetensors", tok_dir)
    return folder


def add_trace_index(folder: Path, engine, texts: list[str]) -> Path:
    """A trace index over texts (one document each) in the release folder, built with the engine's tokenizer."""
    import numpy as np

    from glassforge.core.hashing import sha256_bytes, sha256_file
    from glassforge.core.runfolder import Release
    from glassforge.release.trace_index import build_index_arrays

    stream, offsets, docs = [], [0], []
    for i, t in enumerate(texts):
        stream += engine.encode(t) + [engine.eot_id]
        offsets.append(len(stream))
        docs.append({"id": f"doc{i}", "source": "pystdlib", "license": "PSF-2.0", "sha256": sha256_bytes(t.encode())})
    build_index_arrays(np.array(stream, dtype=np.uint16), np.array(offsets), docs, Release(folder).trace,
                       eot_id=engine.eot_id, tokenizer_sha256=sha256_file(Release(folder).tokenizer_json))
    return folder


def post_concurrently(root: str, requests: list[tuple[str, dict]], timeout: float = 300) -> list:
    """POST each (path, json body) to root at once, one thread each; the responses, in order."""
    import httpx

    out: list = [None] * len(requests)
    with httpx.Client(timeout=timeout) as client:
        def post(i: int, path: str, body: dict) -> None:
            out[i] = client.post(root + path, json=body)

        threads = [threading.Thread(target=post, args=(i, *r)) for i, r in enumerate(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


def metrics_of(root: str) -> dict[str, float]:
    """The server's /metrics, one number per series (labels included in the name)."""
    import httpx

    out = {}
    for line in httpx.get(f"{root}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
