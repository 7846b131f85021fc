"""`glassforge verify`: an untouched release passes; any changed file, manifest entry, tokenizer,
recipe, signature or training document makes it fail and say what changed; replay is bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_release import release_run

pytestmark = pytest.mark.slow  # every test here needs the real `tiny` build


@pytest.fixture(scope="module")
def run_root(request) -> Path:
    return release_run(request)


def copy_release(run_root: Path, dest: Path) -> Path:
    shutil.copytree(run_root / "release", dest)
    return dest


def failures(claims) -> dict[str, str]:
    return {name: reason for name, ok, reason in claims if not ok}


def test_untouched_release_passes_every_claim(run_root, capsys):
    from glassforge.verify import verify_command, verify_release

    claims = verify_release(run_root / "release")
    assert not failures(claims)
    names = {n for n, _, _ in claims}
    assert {"files", "manifest", "weights", "tokenizer", "recipe", "config", "checkpoint chain",
            "training log", "code version", "dependency lock"} <= names
    assert verify_command(run_root / "release", False, None, None) == 0
    out = capsys.readouterr().out
    assert "PASS weights:" in out and "FAIL" not in out


def test_verify_reads_each_file_once(run_root, file_reads):
    """The manifest, the attestation's subject and the replay checkpoint checks share one hash per file."""
    from glassforge.verify import verify_release

    rel = run_root / "release"
    assert not failures(verify_release(rel))
    assert file_reads[str(rel / "model.safetensors")] == 1
    assert max(file_reads.values()) == 1, file_reads.most_common(3)


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest_entry(rel: Path) -> None:
    m = json.loads((rel / "manifest.json").read_text())
    m["files"]["README.md"]["sha256"] = "0" * 64
    (rel / "manifest.json").write_text(json.dumps(m, indent=2))


def _edit_tokenizer(rel: Path) -> None:
    tok = json.loads((rel / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # swap two token ids: still a valid tokenizer
    (rel / "tokenizer.json").write_text(json.dumps(tok))


def _edit_recipe(rel: Path) -> None:
    text = (rel / "recipe.toml").read_text()
    (rel / "recipe.toml").write_text(text.replace("seed = 1337", "seed = 1338", 1))


def _edit_chain(rel: Path) -> None:
    stmt = json.loads((rel / "attestation.json").read_text())
    stmt["predicate"]["checkpoints"][0]["model_sha256"] = "1" * 64
    (rel / "attestation.json").write_text(json.dumps(stmt, indent=2))


TAMPERINGS = {
    "weights byte": (lambda rel: _flip_byte(rel / "model.safetensors", -5), {"file model.safetensors", "weights"}),
    "manifest entry": (_edit_manifest_entry, {"file README.md", "manifest"}),
    "tokenizer": (_edit_tokenizer, {"file tokenizer.json", "tokenizer"}),
    "recipe": (_edit_recipe, {"file recipe.toml", "recipe"}),
    "checkpoint chain": (_edit_chain, {"checkpoint chain"}),
    "added file": (lambda rel: (rel / "extra.bin").write_bytes(b"x"), {"file extra.bin"}),
    "model card": (lambda rel: (rel / "README.md").write_text("# my model\n"), {"file README.md"}),
    "deleted weights": (lambda rel: (rel / "model.safetensors").unlink(), {"file model.safetensors", "weights"}),
}


@pytest.mark.parametrize("what", sorted(TAMPERINGS))
def test_any_single_change_fails_and_is_named(run_root, tmp_path, capsys, what):
    from glassforge.verify import verify_command

    edit, must_fail = TAMPERINGS[what]
    rel = copy_release(run_root, tmp_path / "release")
    edit(rel)
    assert verify_command(rel, False, None, None) == 1
    out = capsys.readouterr().out
    failed = {line[5:].split(":")[0] for line in out.splitlines() if line.startswith("FAIL ")}
    assert must_fail <= failed, out


def test_replay_start_checkpoint_change_is_caught(run_root, tmp_path):
    from glassforge.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    stmt = json.loads((rel / "attestation.json").read_text())
    start = stmt["predicate"]["replay"][0]["start_checkpoint"]
    _flip_byte(rel / start / "optimizer.safetensors", -3)
    failed = failures(verify_release(rel))
    assert f"file {start}/optimizer.safetensors" in failed and "replay checkpoint pretrain" in failed


def test_signature_checks_the_key_and_the_statement(run_root, tmp_path):
    from glassforge.attest import sign, write_keypair
    from glassforge.runfolder import atomic_write_bytes, atomic_write_json
    from glassforge.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    other_key, other_pub = tmp_path / "o.pem", tmp_path / "o.pub"
    write_keypair(key, pub)
    write_keypair(other_key, other_pub)
    envelope, public = sign((rel / "attestation.json").read_bytes(), key)
    atomic_write_json(rel / "attestation.dsse.json", envelope)
    atomic_write_bytes(rel / "signing_key.pub", public)

    claims = verify_release(rel, public_key=pub)
    assert not failures(claims)
    assert any(n == "signature" and ok for n, ok, _ in claims)
    assert "signature" in failures(verify_release(rel, public_key=other_pub))
    # Re-signed by someone else and shipped with their key: fine on its own, caught by the trusted key.
    envelope2, public2 = sign((rel / "attestation.json").read_bytes(), other_key)
    atomic_write_json(rel / "attestation.dsse.json", envelope2)
    atomic_write_bytes(rel / "signing_key.pub", public2)
    assert not failures(verify_release(rel))
    assert "no signature by key" in failures(verify_release(rel, public_key=pub))["signature"]
    # A statement edited after signing.
    atomic_write_json(rel / "attestation.dsse.json", envelope)
    stmt = json.loads((rel / "attestation.json").read_text())
    stmt["predicate"]["data"]["order_sha256"] = "2" * 64
    (rel / "attestation.json").write_text(json.dumps(stmt, indent=2, sort_keys=True) + "\n")
    assert "not attestation.json as it stands" in failures(verify_release(rel, public_key=pub))["signature"]


def test_bogus_signature_fails_the_envelope_check(run_root, tmp_path):
    """A well-formed envelope over attestation.json as it stands, with the signer's key shipped beside it,
    whose signature is not one: only the signature check itself can catch it."""
    import base64

    from glassforge.attest import PAYLOAD_TYPE, key_id, load_public_key, write_keypair
    from glassforge.runfolder import atomic_write_json
    from glassforge.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    write_keypair(tmp_path / "k.pem", rel / "signing_key.pub")
    atomic_write_json(rel / "attestation.dsse.json", {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode((rel / "attestation.json").read_bytes()).decode("ascii"),
        "signatures": [{"keyid": key_id(load_public_key(rel / "signing_key.pub")),
                        "sig": base64.b64encode(bytes(64)).decode("ascii")}]})
    assert failures(verify_release(rel)) == {"signature": "the signature does not verify"}


def test_unsigned_release_with_public_key_fails(run_root, tmp_path):
    from glassforge.attest import write_keypair
    from glassforge.verify import verify_release

    write_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert "not signed" in failures(verify_release(run_root / "release", public_key=tmp_path / "k.pub"))["signature"]


def test_replay_without_data_is_a_user_error(run_root):
    from glassforge.errors import UserError
    from glassforge.verify import verify_release

    with pytest.raises(UserError, match="--data"):
        verify_release(run_root / "release", replay=True)


def test_data_and_replay_pass_on_the_untouched_run(run_root):
    from glassforge.verify import verify_release

    claims = verify_release(run_root / "release", replay=True, data_run=run_root)
    assert not failures(claims), failures(claims)
    names = {n for n, _, _ in claims}
    assert {"data root attested", "data order attested", "data document hashes", "run tokenizer", "run recipe",
            "replay pretrain", "replay sft"} <= names
    replayed = [r for n, ok, r in claims if n.startswith("replay ") and "checkpoint" not in n]
    assert replayed and all("bit for bit" in r for r in replayed)


def test_one_altered_training_document_fails_data_and_replay(run_root, tmp_path):
    from glassforge.verify import verify_release

    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(run_root / "recipe.toml", run / "recipe.toml")
    shutil.copytree(run_root / "data", run / "data")
    shutil.copytree(run_root / "tokenizer", run / "tokenizer")
    first = (run / "data" / "order.txt").read_text().splitlines()[0]  # the start of the training stream
    lines = (run / "data" / "documents.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        doc = json.loads(line)
        if doc["id"] == first:
            doc["text"] = doc["text"].replace(" the ", " a ", 1) + "\nAnd one more sentence, added later."
            lines[i] = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    (run / "data" / "documents.jsonl").write_text("\n".join(lines) + "\n")

    rel = run_root / "release"
    failed = failures(verify_release(rel, data_run=run))
    assert any(first in reason for reason in failed.values()), failed  # the changed document is named
    # Replay pretraining's interval only (fine-tuning's is the same mechanism; this keeps the test short).
    from glassforge.verify import replay_training

    pred = json.loads((rel / "attestation.json").read_text())["predicate"]
    pred["replay"] = [it for it in pred["replay"] if it["stage"] == "pretrain"]
    failed = failures(replay_training(rel, run, pred))
    assert "weights" in failed["replay pretrain"], failed


def test_cli_verify_exit_codes(run_root, tmp_path, capsys):
    from glassforge.attest import write_keypair
    from glassforge.cli import main

    assert main(["verify", str(run_root / "release")]) == 0
    rel = copy_release(run_root, tmp_path / "release")
    _edit_recipe(rel)
    assert main(["verify", str(rel)]) == 1
    assert "FAIL file recipe.toml" in capsys.readouterr().out
    assert main(["verify", str(run_root / "release"), "--replay"]) == 2  # needs --data: a user error
    write_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert main(["verify", str(run_root / "release"), "--public-key", str(tmp_path / "k.pub")]) == 1
