"""Shared fixtures: a random-weight model folder (fast) and a real `tiny` build (slow, built once)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every engine a test makes would compile an ahead-of-time batch-1 step (15-40 s of CPU each) behind it;
# the tests that exercise that step ask for it (Engine(decode_aot=True)).
os.environ.setdefault("GLASSFORGE_DECODE_AOT", "0")


def make_random_model_folder(folder: Path, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                             n_kv_heads: int = 2, vocab_size: int = 512, max_seq_len: int = 256,
                             tie_embeddings: bool = True, seed: int = 0) -> Path:
    """A Hugging Face-layout model folder with random weights and a small trained tokenizer."""
    import torch
    from safetensors.torch import save_file

    from glassforge import pystdlib
    from glassforge.model import Llama, ModelConfig
    from glassforge.release import write_model_folder
    from glassforge.tokenizer import train_tokenizer, write_tokenizer_files

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


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """Random weights, real tokenizer, HF layout: for engine, server and interop tests."""
    return make_random_model_folder(tmp_path_factory.mktemp("random_model"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A complete `glassforge build --recipe tiny` run folder, built once per test session."""
    from glassforge.build import build

    out = tmp_path_factory.mktemp("tiny") / "run"
    build("tiny", out)
    return out


@pytest.fixture
def file_reads(monkeypatch) -> Counter:
    """How often each file (by path) is read to be hashed or copied, through runfolder's one reader."""
    from glassforge import runfolder

    counts: Counter = Counter()
    blocks = runfolder._blocks

    def counting(path, *args, **kwargs):
        counts[str(path)] += 1
        return blocks(path, *args, **kwargs)

    monkeypatch.setattr(runfolder, "_blocks", counting)
    return counts


class LiveServer:
    """uvicorn on 127.0.0.1 with an ephemeral port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.root = f"http://127.0.0.1:{port}"
        self.base = f"{self.root}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
