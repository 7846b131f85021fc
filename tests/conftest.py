"""Shared fixtures: a random-weight model folder (fast) and a real `tiny` build (slow, built once)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from helpers import make_random_model_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every engine a test makes would compile its decode steps (torch.compile, then ahead of time: 15-40 s of
# CPU each) behind it; the tests that exercise compiling ask for it (Engine(compile_decode=True, decode_aot=True)).
os.environ.setdefault("GLASSFORGE_DECODE_COMPILE", "0")
os.environ.setdefault("GLASSFORGE_DECODE_AOT", "0")


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """Random weights, real tokenizer, HF layout: for engine, server and interop tests."""
    return make_random_model_folder(tmp_path_factory.mktemp("random_model"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A complete `glassforge build --recipe tiny` run folder, built once per test session.

    GLASSFORGE_TEST_TINY_RUN=PATH reuses a tiny run already built (by this same
    code: replay is bit for bit only with it); the tests never modify it.
    """
    from glassforge.build import build

    built = os.environ.get("GLASSFORGE_TEST_TINY_RUN")
    if built:
        return Path(built)
    out = tmp_path_factory.mktemp("tiny") / "run"
    build("tiny", out)
    return out


@pytest.fixture
def file_reads(monkeypatch) -> Counter:
    """How often each file (by path) is read to be hashed or copied, through core.hashing's one reader."""
    from glassforge.core import hashing

    counts: Counter = Counter()
    blocks = hashing._blocks

    def counting(path, *args, **kwargs):
        counts[str(path)] += 1
        return blocks(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "_blocks", counting)
    return counts
