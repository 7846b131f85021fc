"""A release checked by the field's own tools: in-toto's bindings accept the attestation, OpenSSF Model
Signing's `model_signing` CLI accepts the signature and rejects it after any change, `mlcroissant` validates
croissant.json and loads its records offline, and our Merkle roots and inclusion proofs agree with pymerkle's
for random trees of 1 to 1,000 leaves."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glassforge.core.errors import UserError


def ec_key(folder: Path, name: str = "key") -> tuple[Path, Path]:
    """An ECDSA P-256 key pair as PEM files (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def model_signing_verify(release: Path, public: Path) -> subprocess.CompletedProcess:
    """The OpenSSF Model Signing CLI itself, as a stranger would run it."""
    cli = Path(sys.executable).with_name("model_signing")
    return subprocess.run([str(cli), "verify", "key", str(release), "--signature", str(release / "model.sig"),
                           "--public_key", str(public)], capture_output=True, text=True, timeout=300)


def claims_of(out: str) -> dict[str, str]:
    return {line[5:].split(":")[0]: line[:4] for line in out.splitlines() if line[:5] in ("PASS ", "FAIL ")}


# ------------------------------------------------------------------------------------ Merkle proofs (fast)


def _sizes() -> list[int]:
    rng = random.Random(9162)
    return sorted(set(range(1, 65)) | {rng.randint(65, 1000) for _ in range(40)} | {127, 128, 129, 512, 999, 1000})


def test_roots_and_inclusion_proofs_agree_with_pymerkle():
    """For random trees of 1..1000 leaves: the same root as pymerkle, the same audit path, each side's proof
    accepted by the other's verifier, and a changed hash, index or leaf rejected by both."""
    import pymerkle
    from pymerkle.core import _inclusion_path_layout

    from glassforge.core.merkle import inclusion_path, leaf_hash, merkle_root, verify_inclusion

    rng = random.Random(6962)
    for n in _sizes():
        leaves = [hashlib.sha256(rng.randbytes(16)).digest() for _ in range(n)]
        tree = pymerkle.InmemoryTree(algorithm="sha256")
        tree.append_entries(leaves)  # pymerkle hashes each entry as sha256(0x00 || entry)
        root = merkle_root(leaves)
        assert tree.get_root().hex() == root, n
        for i in (range(n) if n <= 16 else sorted({0, n - 1, *rng.sample(range(n), 4)})):
            ours = inclusion_path(leaves, i)
            theirs = tree.prove_inclusion(i + 1)  # pymerkle counts leaves from 1; its path starts with the leaf
            assert theirs.path[0] == leaf_hash(leaves[i]) and theirs.path[1:] == ours, (n, i)
            assert verify_inclusion(leaves[i], i, n, theirs.path[1:], root)
            rule, _ = _inclusion_path_layout(i + 1, n)
            pymerkle.verify_inclusion(leaf_hash(leaves[i]), bytes.fromhex(root), pymerkle.InclusionProof(
                "sha256", True, n, i + 1, rule, [leaf_hash(leaves[i]), *ours]))
            outsider = hashlib.sha256(b"not in the tree" + bytes([n % 256])).digest()
            assert not verify_inclusion(outsider, i, n, ours, root)
            if n > 1:
                assert not verify_inclusion(leaves[i], (i + 1) % n, n, ours, root)
                j = rng.randrange(len(ours))
                bad = ours[:j] + [bytes([ours[j][0] ^ 1]) + ours[j][1:]] + ours[j + 1:]
                assert not verify_inclusion(leaves[i], i, n, bad, root)
                with pytest.raises(pymerkle.InvalidProof):
                    pymerkle.verify_inclusion(leaf_hash(leaves[i]), bytes.fromhex(root), pymerkle.InclusionProof(
                        "sha256", True, n, i + 1, rule, [leaf_hash(leaves[i]), *bad]))
                assert not verify_inclusion(leaves[i], i, n, ours[:-1], root)  # a path one hash short
            assert not verify_inclusion(leaves[i], i, n, ours + [ours[0] if ours else leaves[0]], root)


def _toy_tree(order: list[str]) -> tuple[dict, dict, dict, dict]:
    from glassforge.core.merkle import order_roots

    texts = {d: f"text of {d}".encode() for d in order}
    digest_of = {d: hashlib.sha256(t).digest() for d, t in texts.items()}
    source_of = {d: d.split(":")[0] for d in order}
    return texts, digest_of, source_of, order_roots(order, digest_of, source_of, sorted(set(source_of.values())))


def test_a_repeated_document_proves_its_first_leaf_in_the_mix_and_its_source():
    from glassforge.release.proofs import build_proof, check_proof

    order = ["a:1", "b:1", "a:2", "b:2", "a:1", "a:3", "b:1", "a:1"]
    texts, digest_of, source_of, roots = _toy_tree(order)
    proof = build_proof("a:1", order, digest_of, source_of, roots)
    assert proof["occurrences"] == 3 and "3 times" in proof["note"] and "first occurrence" in proof["note"]
    assert proof["trees"]["mix"]["leaf_index"] == 0 and proof["trees"]["mix"]["tree_size"] == 8
    assert proof["trees"]["source"] == {**proof["trees"]["source"], "name": "a", "root": roots["sources"]["a"],
                                        "tree_size": 5, "leaf_index": 0}
    proof = build_proof("b:2", order, digest_of, source_of, roots)
    assert (proof["trees"]["mix"]["leaf_index"], proof["trees"]["source"]["leaf_index"]) == (3, 1)
    trusted = {"mix": (roots["mix"], "test"), "source": (roots["sources"]["b"], "test")}
    assert all(ok for _, ok, _ in check_proof(proof, texts["b:2"], trusted, "t"))
    # The text of a document the tree does not hold: no claim passes.
    assert not any(ok for _, ok, _ in check_proof(proof, b"a document nobody trained on", trusted, "t"))
    # A root the leaves do not rebuild is refused when the proof is made.
    with pytest.raises(UserError, match="do not rebuild the attested mix Merkle root"):
        build_proof("b:2", order, digest_of, source_of, {**roots, "mix": "0" * 64})
    with pytest.raises(UserError, match="not in the training order"):
        build_proof("c:1", order, {**digest_of, "c:1": b"\0" * 32}, {**source_of, "c:1": "c"}, roots)


@pytest.mark.parametrize("edit, field", [
    (lambda p: "{not json", "not valid JSON"),
    (lambda p: json.dumps({**p, "format": "other/1"}), "not a glassforge inclusion proof"),
    (lambda p: json.dumps({**p, "trees": {"mix": {**p["trees"]["mix"], "leaf_index": 99}}}), "trees.mix.leaf_index"),
    (lambda p: json.dumps({**p, "trees": {"mix": {**p["trees"]["mix"], "inclusion_path": ["xyz"]}}}),
     "trees.mix.inclusion_path"),
    (lambda p: json.dumps({**p, "document": {**p["document"], "sha256": "ab"}}), "document.sha256"),
    (lambda p: json.dumps({**p, "trees": {}}), "trees"),
])
def test_a_malformed_proof_is_a_one_line_error_naming_the_field(tmp_path, capsys, edit, field):
    from glassforge.cli import main
    from glassforge.release.proofs import build_proof

    order = ["a:1", "a:2", "a:3"]
    texts, digest_of, source_of, roots = _toy_tree(order)
    proof = build_proof("a:2", order, digest_of, source_of, roots)
    (tmp_path / "p.json").write_text(edit(proof))
    (tmp_path / "t.txt").write_bytes(texts["a:2"])
    assert main(["verify-proof", str(tmp_path / "p.json"), "--root", roots["mix"], "--text",
                 str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and "Traceback" not in err, err


def test_verify_proof_against_a_root_alone(tmp_path, capsys):
    """No release at all: a root one trusts, a text one holds, and the proof."""
    from glassforge.cli import main
    from glassforge.release.proofs import build_proof

    order = [f"s:{i}" for i in range(37)]
    texts, digest_of, source_of, roots = _toy_tree(order)
    proof = build_proof("s:20", order, digest_of, source_of, roots)
    (tmp_path / "p.json").write_text(json.dumps(proof))
    (tmp_path / "t.txt").write_bytes(texts["s:20"])
    args = ["verify-proof", str(tmp_path / "p.json"), "--text", str(tmp_path / "t.txt")]
    assert main(args + ["--root", roots["mix"]]) == 0
    assert "PASS inclusion in the mix: leaf 20 of 37" in capsys.readouterr().out
    assert main(args + ["--root", "1" * 64]) == 1  # a well-formed root the proof is not for
    assert "FAIL root" in capsys.readouterr().out
    assert main(args + ["--root", "not-a-root"]) == 2  # a malformed one
    assert "--root not-a-root: not a sha256 Merkle root" in capsys.readouterr().err
    assert main(args[:2] + ["--root", roots["mix"]]) == 2
    assert "--root needs --text" in capsys.readouterr().err
    (tmp_path / "t.txt").write_bytes(texts["s:20"] + b"\n")
    assert main(args + ["--root", roots["mix"]]) == 1
    assert "without the final newline" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ keys (fast)


def _bad_keys(folder: Path) -> dict[str, tuple[Path, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    def pem(key, name, password=None):
        enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        (folder / name).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      enc))
        return folder / name

    _, pub = ec_key(folder, "good")
    (folder / "junk.pem").write_text("hello\n")
    return {
        "ed25519": (pem(ed25519.Ed25519PrivateKey.generate(), "ed.pem"), "Ed25519 key; OpenSSF Model Signing"),
        "rsa": (pem(rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa.pem"), "RSA key"),
        "secp256k1": (pem(ec.generate_private_key(ec.SECP256K1()), "k1.pem"), "curve secp256k1"),
        "encrypted": (pem(ec.generate_private_key(ec.SECP256R1()), "enc.pem", b"pw"), "encrypted private key"),
        "public": (pub, "a public key; signing takes the private key"),
        "junk": (folder / "junk.pem", "not a PEM private key"),
        "missing": (folder / "none.pem", "no such file"),
    }


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "secp256k1", "encrypted", "public", "junk", "missing"])
def test_a_signing_key_of_the_wrong_kind_is_a_one_line_error(tmp_path, capsys, kind):
    from glassforge.cli import main

    path, words = _bad_keys(tmp_path)[kind]
    (tmp_path / "release").mkdir()
    assert main(["sign", str(tmp_path / "release"), "--key", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--key {path}: " in err and words in err, err
    assert not (tmp_path / "release" / "model.sig").exists()


# ------------------------------------------------------------------------------------ on the real release


@pytest.fixture(scope="module")
def signed(tiny_run, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A copy of the tiny release signed by `glassforge sign`, with the key pair: (release, private, public)."""
    from glassforge.cli import main

    folder = tmp_path_factory.mktemp("signed")
    release = folder / "release"
    shutil.copytree(tiny_run / "release", release)
    key, pub = ec_key(folder)
    assert main(["sign", str(release), "--key", str(key)]) == 0
    return release, key, pub


@pytest.mark.slow
def test_the_attestation_is_a_valid_in_toto_statement(tiny_run, tmp_path):
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    from glassforge.release.verify import verify_release

    stmt = json.loads((tiny_run / "release" / "attestation.json").read_text())
    Statement.copy_from_pb(json_format.ParseDict(stmt, statement_pb2.Statement())).validate()  # raises if not
    claims = {n: (ok, r) for n, ok, r in verify_release(tiny_run / "release")}
    assert claims["in-toto statement"][0] and "in_toto_attestation" in claims["in-toto statement"][1]
    rel = shutil.copytree(tiny_run / "release", tmp_path / "release")
    stmt["subject"][0]["digest"] = {}  # no digest: not a Statement v1
    (rel / "attestation.json").write_text(json.dumps(stmt))
    ok, reason = {n: (ok, r) for n, ok, r in verify_release(rel)}["in-toto statement"]
    assert not ok and "At least one digest required" in reason


@pytest.mark.slow
def test_the_model_signing_cli_accepts_the_signature_and_it_covers_the_statement(signed):
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    from glassforge.core.hashing import sha256_file

    release, _, pub = signed
    out = model_signing_verify(release, pub)
    assert out.returncode == 0 and "Verification succeeded" in out.stdout, out.stdout + out.stderr
    bundle = json.loads((release / "model.sig").read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    Statement.copy_from_pb(json_format.ParseDict(payload, statement_pb2.Statement())).validate()
    assert payload["predicateType"] == "https://model_signing/signature/v1.0"
    signed_files = {r["name"]: r["digest"] for r in payload["predicate"]["resources"]}
    on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()} - {"model.sig"}
    assert set(signed_files) == on_disk
    for name in ("attestation.json", "manifest.json", "croissant.json", "model.safetensors", "signing_key.pub"):
        assert signed_files[name] == sha256_file(release / name), name
    assert (release / "signing_key.pub").read_bytes() == pub.read_bytes()
    manifest = json.loads((release / "manifest.json").read_text())
    assert "model.sig" not in manifest["files"] and "croissant.json" in manifest["files"]


def _flip(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


CHANGES = {
    "a weight byte": (lambda r: _flip(r / "model.safetensors"), "changed: model.safetensors"),
    "the statement": (lambda r: (r / "attestation.json").write_text(
        (r / "attestation.json").read_text().replace('"seed": 1337', '"seed": 1338', 1)), "changed: attestation.json"),
    "the manifest": (lambda r: _flip(r / "manifest.json", -3), "changed: manifest.json"),
    "the croissant file": (lambda r: _flip(r / "croissant.json", -3), "changed: croissant.json"),
    "a data pack file": (lambda r: _flip(r / "data" / "order.txt", 3), "changed: data/order.txt"),
    "the shipped key": (lambda r: (r / "signing_key.pub").write_text("x"), "signing_key.pub"),
    "an added file": (lambda r: (r / "extra.txt").write_text("x"), "added: extra.txt"),
    "a removed file": (lambda r: (r / "DATA_CARD.md").unlink(), "missing: DATA_CARD.md"),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(CHANGES))
def test_any_change_after_signing_is_rejected_by_model_signing(signed, tmp_path, what):
    from glassforge.release.verify import verify_release

    release, _, pub = signed
    rel = shutil.copytree(release, tmp_path / "release")
    edit, reason = CHANGES[what]
    edit(rel)
    out = model_signing_verify(rel, pub)
    assert out.returncode != 0 and "Verification failed" in out.stderr, out.stdout + out.stderr
    claims = {n: (ok, r) for n, ok, r in verify_release(rel, public_key=pub)}
    assert not claims["signature"][0] and reason in claims["signature"][1], claims["signature"]


@pytest.mark.slow
def test_glassforge_verify_checks_the_signature_through_model_signing(signed, tmp_path, capsys):
    from glassforge.cli import main
    from glassforge.release.verify import verify_release

    release, key, pub = signed
    assert main(["verify", str(release), "--public-key", str(pub)]) == 0
    out = capsys.readouterr().out
    for claim in ("signature", "in-toto statement", "croissant", "croissant data", "files"):
        assert claims_of(out).get(claim) == "PASS", (claim, out)
    assert "--public-key" in out and "NOTE signature" not in out
    _, other = ec_key(tmp_path, "other")
    failed = {n: r for n, ok, r in verify_release(release, public_key=other) if not ok}
    assert set(failed) == {"signature"} and "signed with another key" in failed["signature"]
    # Re-signed by someone else who ships their own key: whole, but not by the trusted key.
    rel = shutil.copytree(release, tmp_path / "resigned")
    other_key, _ = ec_key(tmp_path, "other2")
    assert main(["sign", str(rel), "--key", str(other_key)]) == 0
    capsys.readouterr()
    assert not [n for n, ok, _ in verify_release(rel) if not ok]
    assert "signed with another key" in {n: r for n, ok, r in verify_release(rel, public_key=pub)}["signature"]
    # A forged bundle: the right key hint and payload, a signature that is not one.
    bundle = json.loads((rel / "model.sig").read_text())
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(70)).decode()
    (rel / "model.sig").write_text(json.dumps(bundle))
    assert {n: ok for n, ok, _ in verify_release(rel)}["signature"] is False
    (rel / "model.sig").write_text("{}")
    assert "not a model-signing signature" in {n: r for n, ok, r in verify_release(rel)}["signature"]
    # A public key of the wrong kind is a mistake in the command.
    assert main(["verify", str(release), "--public-key", str(key)]) == 2
    assert "a private key; give its public half" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unsigned_release_says_so_and_a_public_key_makes_it_fail(tiny_run, tmp_path, capsys):
    from glassforge.cli import main

    assert main(["verify", str(tiny_run / "release")]) == 0
    assert "NOTE signature: the release is not signed" in capsys.readouterr().out
    _, pub = ec_key(tmp_path)
    assert main(["verify", str(tiny_run / "release"), "--public-key", str(pub)]) == 1
    assert "FAIL signature: --public-key given but the release is not signed" in capsys.readouterr().out


@pytest.mark.slow
def test_sign_refuses_a_release_that_does_not_verify(tiny_run, tmp_path, capsys):
    from glassforge.cli import main

    rel = shutil.copytree(tiny_run / "release", tmp_path / "release")
    (rel / "README.md").write_text("# my model\n")
    key, _ = ec_key(tmp_path)
    assert main(["sign", str(rel), "--key", str(key)]) == 2
    err = capsys.readouterr().err
    assert "not signing a release that does not verify: FAIL file README.md" in err and err.count("\n") == 1
    assert not (rel / "model.sig").exists() and not (rel / "signing_key.pub").exists()


@pytest.mark.slow
def test_the_readme_key_commands_make_a_key_model_signing_takes(tiny_run, tmp_path):
    """openssl genpkey / openssl pkey, as the README says; then both CLIs."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl on this machine")
    key, pub = tmp_path / "key.pem", tmp_path / "key.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    rel = shutil.copytree(tiny_run / "release", tmp_path / "release")
    out = subprocess.run([sys.executable, "-m", "glassforge", "sign", str(rel), "--key", str(key)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert model_signing_verify(rel, pub).returncode == 0


# ------------------------------------------------------------------------------------ Croissant


@pytest.mark.slow
def test_croissant_validates_with_mlcroissant(tiny_run):
    cli = Path(sys.executable).with_name("mlcroissant")
    path = tiny_run / "release" / "croissant.json"
    out = subprocess.run([str(cli), "validate", "--jsonld", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "error" not in out.stderr.lower().replace("0 error", "")
    from glassforge.core.hashing import sha256_file

    manifest = json.loads((tiny_run / "release" / "manifest.json").read_text())
    assert manifest["files"]["croissant.json"]["sha256"] == sha256_file(path)


@pytest.mark.slow
def test_mlcroissant_reads_the_records_offline_and_they_are_the_pack(tiny_run, monkeypatch):
    import socket

    import mlcroissant as mlc
    import pyarrow.parquet as pq

    def no_network(*args, **kwargs):
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    rel = tiny_run / "release"
    ds = mlc.Dataset(jsonld=rel / "croissant.json")

    def records(name):
        return [{k.split("/", 1)[1]: v.decode() if isinstance(v, bytes) else v for k, v in r.items()}
                for r in ds.records(record_set=name)]

    docs = pq.read_table(rel / "data" / "documents.parquet").to_pylist()
    got = records("documents")
    assert got == [{k: r[k] for k in got[0]} for r in docs]
    assert {"id", "source", "license", "sha256", "split", "text"} <= set(got[0])
    dropped = pq.read_table(rel / "data" / "dropped.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in records("dropped")] == [(r["id"], r["reason"]) for r in dropped]
    order = (rel / "data" / "order.txt").read_text().splitlines()
    assert [(r["position"], r["id"]) for r in records("order")] == list(enumerate(order))


@pytest.mark.slow
def test_croissant_carries_hashes_licences_and_the_data_stages_figures(tiny_run):
    from glassforge.core.hashing import sha256_file

    rel = tiny_run / "release"
    c = json.loads((rel / "croissant.json").read_text())
    summary = json.loads((rel / "data_summary.json").read_text())
    assert "http://mlcommons.org/croissant/RAI/1.0" in c["conformsTo"]
    files = {f["contentUrl"]: f for f in c["distribution"]}
    for name in ("data/documents.parquet", "data/dropped.parquet", "data/order.txt"):
        assert files[name]["sha256"] == sha256_file(rel / name), name
    assert c["license"] == "PSF-2.0"
    assert {rs["name"] for rs in c["recordSet"]} == {"documents", "dropped", "order"}
    collection = c["rai:dataCollection"]
    assert f"{summary['documents_seen']:,} documents" in collection and "pystdlib" in collection
    steps = " ".join(c["rai:dataPreprocessingProtocol"])
    for needle in ("Cleaning", "Filtering", "Exact deduplication", "Near-duplicate removal", "Decontamination",
                   f"repeated_lines {summary['dropped'].get('repeated_lines', 0)}",
                   f"{summary['dropped'].get('near_duplicate', 0)} dropped", summary["merkle"]["mix"]):
        assert str(needle) in steps, needle
    assert c["rai:personalSensitiveInformation"].startswith("Not checked")


@pytest.mark.slow
def test_the_croissant_claims_fail_when_it_does_not_match_the_pack(tiny_run, tmp_path):
    from glassforge.release.verify import verify_release

    rel = shutil.copytree(tiny_run / "release", tmp_path / "release")
    c = json.loads((rel / "croissant.json").read_text())
    c["distribution"][0]["sha256"] = "0" * 64
    (rel / "croissant.json").write_text(json.dumps(c))
    failed = {n: r for n, ok, r in verify_release(rel) if not ok}
    assert "data/documents.parquet is not the file described" in failed["croissant data"]
    assert "file croissant.json" in failed
    c["recordSet"][0]["field"][0]["dataType"] = "sc:NoSuchType"
    (rel / "croissant.json").write_text(json.dumps(c))
    assert "mlcroissant rejects croissant.json" in {n: r for n, ok, r in verify_release(rel) if not ok}["croissant"]
    (rel / "croissant.json").unlink()
    assert {n: r for n, ok, r in verify_release(rel) if not ok}["croissant"] == "croissant.json is missing"


# ------------------------------------------------------------------------------------ prove / verify-proof


@pytest.mark.slow
def test_prove_and_verify_proof_on_the_release(tiny_run, tmp_path, capsys):
    import pymerkle
    import pyarrow.parquet as pq

    from glassforge.cli import main

    rel = tiny_run / "release"
    order = (rel / "data" / "order.txt").read_text().splitlines()
    docs = {r["id"]: r for r in pq.read_table(rel / "data" / "documents.parquet").to_pylist()}
    doc = order[len(order) // 2]
    assert main(["prove", str(rel), "--doc", doc, "--out", str(tmp_path / "p.json")]) == 0
    proof = json.loads((tmp_path / "p.json").read_text())
    stmt = json.loads((rel / "attestation.json").read_text())["predicate"]["data"]
    mix = proof["trees"]["mix"]
    assert mix["root"] == stmt["mix_merkle_root"] and mix["tree_size"] == len(order)
    assert mix["leaf_index"] == order.index(doc) and proof["occurrences"] == order.count(doc)
    assert proof["trees"]["source"]["root"] == stmt["source_merkle_roots"][docs[doc]["source_name"]]
    # pymerkle, from the pack's leaves, makes the same audit path.
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    tree.append_entries([bytes.fromhex(docs[d]["sha256"]) for d in order])
    assert tree.get_root().hex() == mix["root"]
    assert [h.hex() for h in tree.prove_inclusion(mix["leaf_index"] + 1).path[1:]] == mix["inclusion_path"]
    assert main(["prove", str(rel), "--doc", doc]) == 0  # printed instead
    assert json.loads(capsys.readouterr().out) == proof

    def verify(*args) -> tuple[int, str, str]:
        code = main(["verify-proof", str(tmp_path / "p.json"), *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = verify("--release", str(rel))
    assert code == 0 and claims_of(out) == {"document": "PASS", "inclusion in the mix": "PASS",
                                            f"inclusion in source {docs[doc]['source_name']}": "PASS"}, out
    (tmp_path / "t.txt").write_bytes(docs[doc]["text"].encode())
    assert verify("--root", mix["root"], "--text", str(tmp_path / "t.txt"))[0] == 0
    other = next(d for d in order if d != doc)
    (tmp_path / "o.txt").write_bytes(docs[other]["text"].encode())
    code, out, _ = verify("--release", str(rel), "--text", str(tmp_path / "o.txt"))  # a document it does not prove
    assert code == 1 and "FAIL document" in out and "FAIL inclusion in the mix" in out
    # One audit-path hash changed.
    j = len(mix["inclusion_path"]) // 2
    h = mix["inclusion_path"][j]
    proof["trees"]["mix"]["inclusion_path"][j] = ("0" if h[0] != "0" else "1") + h[1:]
    (tmp_path / "p.json").write_text(json.dumps(proof))
    code, out, _ = verify("--release", str(rel))
    assert code == 1 and claims_of(out)["inclusion in the mix"] == "FAIL" and claims_of(out)["document"] == "PASS"
    # Bad input: one line, exit 2.
    (tmp_path / "p.json").write_text("{\"format\": ")
    code, _, err = verify("--release", str(rel))
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1
    for bad_doc, words in (("pystdlib:no.such.thing", "no such document"),
                           (next(iter(pq.read_table(rel / "data" / "dropped.parquet").to_pydict()["id"])),
                            "dropped by the data stage")):
        assert main(["prove", str(rel), "--doc", bad_doc]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    val = next(d for d, r in docs.items() if r["split"] == "val")
    assert main(["prove", str(rel), "--doc", val]) == 2
    assert "a validation document" in capsys.readouterr().err
