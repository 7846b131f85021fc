"""The release: Hugging Face layout, loadable offline by transformers with our logits, attested."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from glassforge.core.recipe import load_recipe


@pytest.fixture
def run_root(tiny_run) -> Path:
    return tiny_run


@pytest.mark.slow
def test_release_has_the_hugging_face_layout_and_cards(run_root):
    rel = run_root / "release"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md", "DATA_CARD.md", "manifest.json",
                 "metrics.jsonl", "attestation.json", "recipe.toml", "loss.png", "croissant.json"):
        assert (rel / name).is_file(), name
    config = json.loads((rel / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((rel / "tokenizer_config.json").read_text())
    card = (rel / "README.md").read_text()
    header = card.split("---")[1]
    for key in ("license:", "datasets:", "language:", "tags:"):
        assert key in header
    assert "## Intended use and limits" in card and "## Training" in card and "loss.png" in card
    from glassforge.core.hashing import sha256_file

    assert f"sha256: `{sha256_file(rel / 'model.safetensors')}`" in card
    manifest = json.loads((rel / "manifest.json").read_text())
    on_disk = {p.relative_to(rel).as_posix() for p in rel.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "attestation.json"}


@pytest.mark.slow
def test_attestation_is_an_in_toto_statement_binding_the_inputs(run_root):
    from glassforge.core.hashing import sha256_file
    from glassforge.core.runfolder import list_checkpoints
    from glassforge.release.attest import check_chain

    rel = run_root / "release"
    stmt = json.loads((rel / "attestation.json").read_text())
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["subject"] == [{"name": "model.safetensors", "digest": {"sha256": sha256_file(rel / "model.safetensors")}}]
    pred = stmt["predicate"]
    shards = json.loads((run_root / "data" / "shards.json").read_text())
    assert pred["data"]["order_sha256"] == shards["order_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", pred["data"]["mix_merkle_root"])
    assert pred["tokenizer"]["sha256"] == sha256_file(run_root / "tokenizer" / "tokenizer.json")
    assert pred["recipe"]["sha256"] == load_recipe(run_root / "recipe.toml").hash()
    assert pred["code"]["version"] and pred["dependency_lock"]["sha256"] == sha256_file(
        Path(__file__).parents[1] / "constraints.txt")
    assert pred["training"]["pretrain"]["steps"] == 60 and pred["training"]["pretrain"]["tokens"] == 60 * 4096
    kept = list_checkpoints(run_root / "pretrain")
    chain = [c for c in pred["checkpoints"] if c["stage"] == "pretrain"]
    assert [c["step"] for c in chain] == [20, 40, 60] == [s for s, _ in kept]  # every checkpoint written
    assert chain[-1]["model_sha256"] == sha256_file(kept[-1][1] / "model.safetensors")
    assert check_chain(pred["checkpoints"]) is None
    assert pred["release"]["manifest_sha256"] == sha256_file(rel / "manifest.json")
    # every kept checkpoint travels with the release, but the released weights' own
    carried = [(c["stage"], c["step"]) for c in pred["replay"]["carried"]]
    assert carried == [("pretrain", 20), ("pretrain", 40), ("pretrain", 60), ("sft", 10), ("sft", 20), ("sft", 30),
                       ("rl", 3)]
    for c in pred["replay"]["carried"]:
        assert (rel / c["folder"] / "optimizer.safetensors").is_file()
    env = pred["training"]["pretrain"]["env"]
    assert env["compile"] is True and env["threads"] >= 1 and pred["training"]["pretrain"]["seed"] == 1337
    # the data itself, bound by hash
    pack = pred["data"]["pack"]
    assert pack["documents"]["sha256"] == sha256_file(rel / "data" / "documents.parquet")
    assert pack["documents"]["rows"] + pack["dropped"]["rows"] == json.loads(
        (rel / "data_summary.json").read_text())["documents_seen"]
    assert pred["code"]["source_sha256"] and pred["platform"]["cpu_threads"] >= 1


@pytest.fixture(params=["random", pytest.param("tiny", marks=pytest.mark.slow)])
def hf_folder(request) -> Path:
    """A model folder written by release.write_model_folder (random weights: fast), and the real release."""
    if request.param == "tiny":
        return Path(request.getfixturevalue("tiny_run")) / "release"
    return request.getfixturevalue("random_model")


def test_transformers_loads_the_release_offline_with_our_logits(hf_folder, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glassforge.model.generate import generate_ids
    from glassforge.model.hf import load_pretrained
    from glassforge.tokenizer.bpe import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rel = hf_folder
    hf_tok = AutoTokenizer.from_pretrained(rel)
    hf = AutoModelForCausalLM.from_pretrained(rel, dtype=torch.float32).eval()
    ours = load_pretrained(rel)
    text = "def dumps(obj, *, skipkeys=False):\n    \"\"\"Serialize obj to a JSON formatted str."
    ids = load_tokenizer(rel).encode(text, add_special_tokens=False).ids
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    chat = [{"role": "user", "content": "What does json.dumps do?"}]
    from glassforge.tokenizer.bpe import render_chat

    assert hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == render_chat(chat)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf(x).logits.float() - ours(x)[0].float()).abs().max().item()
    assert diff <= 1e-4, diff
    from glassforge.tokenizer.bpe import END, ENDOFTEXT

    stop = {hf_tok.convert_tokens_to_ids(END), hf_tok.convert_tokens_to_ids(ENDOFTEXT)}
    for prompt in (ids, hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)):
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        with torch.no_grad():  # greedy, stopping at the end-of-turn tokens of generation_config.json
            hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        assert hf_out.tolist() == list(generate_ids(ours, prompt, 24, stop_ids=stop))


PICKLE_PATTERNS = re.compile(r"torch\.load\(|\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\(|allow_pickle\s*=\s*True"
                             r"|weights_only\s*=\s*False|\bcloudpickle\b|\bjoblib\.load\(")


def test_no_code_path_unpickles_or_torch_loads():
    import glassforge

    offenders = []
    for path in sorted(Path(glassforge.__file__).parent.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PICKLE_PATTERNS.search(line.split("#")[0]):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.slow
def test_release_reads_each_file_once(run_root, tmp_path, file_reads):
    """The weights are hashed as they are copied; the model card, manifest and checkpoint chain share that hash."""
    import shutil

    from glassforge.core.runfolder import Run
    from glassforge.release.stage import run_release

    copy = tmp_path / "run"
    shutil.copytree(run_root, copy, ignore=shutil.ignore_patterns("release", "trace*"))
    out = run_release(Run(copy))
    assert out["model_sha256"] == json.loads((copy / "release" / "manifest.json").read_text())[
        "files"]["model.safetensors"]["sha256"]
    assert file_reads[str(Run(copy).final_weights()[1])] == 1
    assert max(file_reads.values()) == 1, file_reads.most_common(3)


@pytest.mark.slow
def test_signed_release_and_bad_keys(run_root, tmp_path):
    """`release --sign-key` writes an OpenSSF Model Signing signature that model-signing's own verifier takes;
    a key it cannot use is refused before anything is written."""
    import shutil

    from model_signing import verifying

    from glassforge.core.errors import UserError
    from glassforge.core.runfolder import Run
    from glassforge.release.stage import run_release
    from test_standards import ec_key

    # A copy of the run without its data-heavy parts: release needs data/, tokenizer/, checkpoints.
    copy = tmp_path / "run"
    shutil.copytree(run_root, copy, ignore=shutil.ignore_patterns("release", "trace*"))
    key, pub = ec_key(tmp_path)
    out = run_release(Run(copy), sign_key=key)
    assert out["signed"] and out["signature"]["curve"] == "P-256"
    rel = copy / "release"
    verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(rel, rel / "model.sig")  # raises if not
    assert (rel / "signing_key.pub").read_bytes() == pub.read_bytes()
    manifest = json.loads((rel / "manifest.json").read_text())
    assert not {"model.sig", "signing_key.pub", "attestation.json"} & set(manifest["files"])
    before = (rel / "model.sig").read_bytes()
    not_a_key = tmp_path / "nokey.pem"
    not_a_key.write_text("hello")
    with pytest.raises(UserError, match="--sign-key .*nokey.pem: not a PEM private key"):
        run_release(Run(copy), sign_key=not_a_key)
    assert (rel / "model.sig").read_bytes() == before  # a refused signing leaves the release as it was


@pytest.mark.parametrize(("distance", "noise", "passes", "says"), [
    (3e-3, 1e-3, True, "within floating-point tolerance"),
    (4e-3, 1e-3, True, "within floating-point tolerance"),
    (5e-3, 1e-3, False, "beyond floating-point tolerance"),
    (1e-9, 0.0, False, "two kernel sets on this machine agree bit for bit"),
    (0.0, 0.0, True, "within floating-point tolerance"),
])
def test_a_replay_that_is_not_bit_for_bit_passes_only_within_four_times_the_measured_noise(distance, noise, passes,
                                                                                           says):
    from glassforge.release.replay import Interval, _verdict

    d = {"relative": distance, "l2": 1.0, "linf": 0.5, "tensors": {"a": {"l2": 0.1}, "b": {"l2": 0.9}}}
    name, ok, why = _verdict(Interval("pretrain", 40, 60), d, noise)
    assert (name, ok) == ("replay pretrain steps 40..60", passes)
    assert says in why and f"distance {distance:.2e}" in why and "most in b" in why
