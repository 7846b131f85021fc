"""The spine on the `tiny` recipe: build, rebuild (nothing trained), generate, serve, chat via openai."""

import json
import subprocess
import sys

import pytest

from helpers import glassforge_serve

pytestmark = pytest.mark.slow


def test_build_writes_the_run_folder_contract(tiny_run):
    for rel in ["recipe.toml", "state.json", "data/manifest.json", "data/documents.jsonl", "data/train.bin",
                "tokenizer/tokenizer.json", "pretrain/metrics.jsonl", "pretrain/loss.png", "sft/summary.json",
                "eval/eval.json", "release/model.safetensors", "release/config.json", "release/tokenizer.json",
                "release/README.md", "release/manifest.json"]:
        assert (tiny_run / rel).is_file(), rel
    state = json.loads((tiny_run / "state.json").read_text())
    assert list(state) == ["data", "tokenizer", "shards", "pretrain", "sft", "rl", "eval", "release"]
    metrics = [json.loads(l) for l in (tiny_run / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0  # it learned something
    assert "val_bpb" in metrics[-1]
    config = json.loads((tiny_run / "release/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    summary = json.loads((tiny_run / "sft/summary.json").read_text())
    assert summary["val_loss"] < summary["base_val_loss"]  # fine-tuning helps on held-out conversations
    card = (tiny_run / "release/README.md").read_text()
    assert card.startswith("---\nlicense: other\nlicense_name: psf-2.0\n") and "## Evaluation" in card


def test_rebuild_trains_nothing(tiny_run):
    ckpts = sorted((tiny_run / "pretrain/checkpoints").iterdir())
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    out = subprocess.run([sys.executable, "-m", "glassforge", "build", "--recipe", "tiny", "--out", str(tiny_run)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("up to date, skipped") == 8
    assert ": done in" not in out.stdout  # no stage ran
    assert {p: p.stat().st_mtime_ns for p in sorted((tiny_run / "pretrain/checkpoints").iterdir())} == before


def test_generate_is_deterministic(tiny_run):
    cmd = [sys.executable, "-m", "glassforge", "generate", str(tiny_run), "--prompt", "def", "--max-tokens", "12"]
    a = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    b = subprocess.run(cmd[:4] + [str(tiny_run / "release")] + cmd[5:], capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_serve_and_chat_with_openai_client(tiny_run):
    from openai import OpenAI

    with glassforge_serve(tiny_run) as root:
        client = OpenAI(base_url=f"{root}/v1", api_key="anything")
        models = client.models.list()
        model = models.data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What does json.dumps do?"}],
                                               max_tokens=16, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What does json.dumps do?"}],
                                                max_tokens=16, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == reply.choices[0].message.content
