"""`glassforge verify`: an untouched release passes; any changed file, manifest entry, tokenizer,
recipe, signed file or training document makes it fail and say what changed; a replay from a copy of the
release alone is bit for bit (on one core too), within tolerance on another thread count, and fails for
a forgery that is consistent everywhere else."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # every test here needs the real `tiny` build


@pytest.fixture
def run_root(tiny_run) -> Path:
    return tiny_run


def copy_release(run_root: Path, dest: Path) -> Path:
    shutil.copytree(run_root / "release", dest)
    return dest


def failures(claims) -> dict[str, str]:
    return {name: reason for name, ok, reason in claims if not ok}


def test_untouched_release_passes_every_claim(run_root, capsys):
    from glassforge.release.verify import verify_command, verify_release

    claims = verify_release(run_root / "release")
    assert not failures(claims)
    names = {n for n, _, _ in claims}
    assert {"files", "manifest", "weights", "tokenizer", "recipe", "config", "checkpoint chain",
            "training log", "code version", "dependency lock", "in-toto statement", "croissant",
            "croissant data"} <= names
    assert verify_command(run_root / "release", None, False, None) == 0
    out = capsys.readouterr().out
    assert "PASS weights:" in out and "FAIL" not in out


def test_verify_reads_each_file_once(run_root, file_reads):
    """The manifest, the attestation's subject and the replay checkpoint checks share one hash per file."""
    from glassforge.release.verify import verify_release

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
    from glassforge.release.verify import verify_command

    edit, must_fail = TAMPERINGS[what]
    rel = copy_release(run_root, tmp_path / "release")
    edit(rel)
    assert verify_command(rel, None, False, None) == 1
    out = capsys.readouterr().out
    failed = {line[5:].split(":")[0] for line in out.splitlines() if line.startswith("FAIL ")}
    assert must_fail <= failed, out


def test_carried_checkpoint_change_is_caught(run_root, tmp_path):
    from glassforge.release.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    stmt = json.loads((rel / "attestation.json").read_text())
    carried = stmt["predicate"]["replay"]["carried"][0]["folder"]
    _flip_byte(rel / carried / "optimizer.safetensors", -3)
    failed = failures(verify_release(rel))
    assert f"file {carried}/optimizer.safetensors" in failed
    assert "not the attested" in failed["carried checkpoints"]


def test_signature_is_checked_by_model_signing(run_root, tmp_path):
    """The full set of signature checks is in test_standards.py; here: signed, verified, tampered, caught."""
    from glassforge.release.signing import sign_release
    from glassforge.release.verify import verify_release
    from test_standards import ec_key

    rel = copy_release(run_root, tmp_path / "release")
    key, pub = ec_key(tmp_path)
    sign_release(rel, key)
    assert not failures(verify_release(rel, public_key=pub))
    _flip_byte(rel / "model.safetensors", -5)
    failed = failures(verify_release(rel, public_key=pub))
    assert "changed: model.safetensors" in failed["signature"] and "weights" in failed


# ------------------------------------------------------------------------------------ the data pack and replay


def _pack_rows(rel: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(rel / "data" / "documents.parquet").to_pylist()


def test_the_data_pack_is_the_runs_documents_and_reads_with_datasets(run_root):
    """pyarrow and Hugging Face datasets read the release's documents; they are the run's, in its order."""
    import datasets
    import pyarrow.parquet as pq

    from glassforge.core.manifest import iter_manifest_entries
    from glassforge.core.runfolder import Run
    from glassforge.data.documents import iter_documents

    rel = run_root / "release"
    run = Run(run_root)
    want = [{"id": d["id"], "split": d["split"], "text": d["text"]} for d in iter_documents(run)]
    rows = _pack_rows(rel)
    assert [{k: r[k] for k in ("id", "split", "text")} for r in rows] == want
    entries = {e["id"]: e for e in iter_manifest_entries(run)}
    assert all(r["sha256"] == entries[r["id"]]["sha256"] and r["license"] == "PSF-2.0" for r in rows)
    ds = datasets.load_dataset("parquet", data_files=str(rel / "data" / "documents.parquet"), split="train")
    assert ds["id"] == [w["id"] for w in want] and ds["text"] == [w["text"] for w in want]
    dropped = pq.read_table(rel / "data" / "dropped.parquet").to_pylist()
    assert sorted(d["id"] for d in dropped) == sorted(e["id"] for e in entries.values() if e["status"] == "dropped")
    assert "text" not in pq.read_schema(rel / "data" / "dropped.parquet").names
    assert (rel / "data" / "order.txt").read_bytes() == run.order.read_bytes()


def test_replay_all_from_a_copy_of_the_release_alone_is_bit_for_bit(run_root, tmp_path, capsys):
    from glassforge.release.verify import verify_command

    rel = copy_release(run_root, tmp_path / "elsewhere" / "release")  # no run folder beside it
    assert verify_command(rel, "all", True, None) == 0
    out = capsys.readouterr().out
    replays = [line for line in out.splitlines() if line.startswith("PASS replay ") and "coverage" not in line]
    assert len(replays) == 8 and all("bit for bit" in line for line in replays), out  # 3 + 3 + 2 intervals
    assert "PASS replay coverage: 96 of 96 training steps (100%)" in out
    for claim in ("data documents", "data ids", "data order", "data order rule", "data merkle root", "data counts"):
        assert f"PASS {claim}:" in out


def test_replay_on_one_core_is_still_bit_for_bit(run_root, tmp_path):
    """The build ran two threads; a verifier with one core runs two threads on it and gets the same bits."""
    import subprocess
    import sys

    rel = copy_release(run_root, tmp_path / "release")
    env = {**__import__("os").environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "glassforge", "verify", str(rel),
                          "--replay", "last"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    replays = [line for line in out.stdout.splitlines() if line.startswith("PASS replay ") and "coverage" not in line]
    assert len(replays) == 3 and all("bit for bit" in line for line in replays), out.stdout


def test_replay_with_another_thread_count_passes_within_tolerance(run_root, tmp_path):
    """Compiled kernels split their sums by thread: other bits, a distance within the measured noise."""
    from glassforge.release.verify import verify_release

    claims = verify_release(copy_release(run_root, tmp_path / "release"), replay="last", threads=1)
    assert not failures(claims), failures(claims)
    pretrain = next(r for n, ok, r in claims if n.startswith("replay pretrain"))
    assert pretrain.startswith("within floating-point tolerance (distance ") and "rounding noise on the interval" in pretrain
    distance, noise = (float(re.search(rf"{key} ([0-9.e+-]+)", pretrain).group(1)) for key in ("distance", "interval"))
    assert 0 < distance <= 4 * noise, pretrain


def _rewrite_pack_document(rel: Path, doc_id: str, text: str, *, recompute: bool) -> None:
    """Change one document's text in the pack; with recompute, its hash and every hash above it too."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from glassforge.core.hashing import sha256_file
    from glassforge.core.merkle import order_roots
    from glassforge.release.datapack import _schemas

    path = rel / "data" / "documents.parquet"
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        if r["id"] == doc_id:
            r["text"] = text
            if recompute:
                r["sha256"] = hashlib.sha256(text.encode()).hexdigest()
                r["bytes"] = len(text.encode())
    pq.write_table(pa.Table.from_pylist(rows, schema=_schemas()[0]), path, compression="zstd")
    if not recompute:
        return
    stmt = json.loads((rel / "attestation.json").read_text())
    data = stmt["predicate"]["data"]
    order = (rel / "data" / "order.txt").read_text().splitlines()
    roots = order_roots(order, {r["id"]: bytes.fromhex(r["sha256"]) for r in rows},
                        {r["id"]: r["source_name"] for r in rows}, list(data["source_merkle_roots"]))
    data["mix_merkle_root"], data["source_merkle_roots"] = roots["mix"], roots["sources"]
    data["pack"]["documents"]["sha256"] = sha256_file(path)
    croissant = json.loads((rel / "croissant.json").read_text())  # the data's description names its hash too
    next(f for f in croissant["distribution"] if f["contentUrl"] == "data/documents.parquet")["sha256"] = \
        sha256_file(path)
    (rel / "croissant.json").write_text(json.dumps(croissant, indent=1))
    manifest = json.loads((rel / "manifest.json").read_text())
    manifest["files"]["data/documents.parquet"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    described = rel / "croissant.json"
    manifest["files"]["croissant.json"] = {"sha256": sha256_file(described), "bytes": described.stat().st_size}
    (rel / "manifest.json").write_text(json.dumps(manifest, indent=2))
    stmt["predicate"]["release"]["manifest_sha256"] = sha256_file(rel / "manifest.json")
    (rel / "attestation.json").write_text(json.dumps(stmt, indent=2, sort_keys=True) + "\n")


def _document_read_at(rel: Path, step: int) -> str:
    """A training document the pretraining step `step` (counting from 1) reads."""
    import numpy as np

    from glassforge.core.recipe import load_recipe
    from glassforge.train.order import DataOrder

    recipe = load_recipe(rel / "recipe.toml")
    cfg = recipe.pretrain
    offsets = np.load(rel.parent / "data" / "train.offsets.npy")
    ids = json.loads((rel.parent / "data" / "shards.json").read_text())["train"]["documents"]
    n_windows = (int(offsets[-1]) - 1) // cfg.seq_len
    window = int(DataOrder(n_windows, cfg.batch_tokens // cfg.seq_len, recipe.seed).global_batch(step - 1)[0])
    return ids[int(np.searchsorted(offsets, window * cfg.seq_len, side="right") - 1)]


def test_a_consistent_forgery_fails_the_replay(run_root, tmp_path):
    """One document the last pretraining interval reads is changed, and its hash, the Merkle roots, the pack's
    hash, the manifest and the attestation are all recomputed to match (unsigned): only the replay can tell."""
    from glassforge.release.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    victim = _document_read_at(run_root / "release", 50)
    text = next(r["text"] for r in _pack_rows(rel) if r["id"] == victim)
    _rewrite_pack_document(rel, victim, text + "\nThis sentence was not in the training data.", recompute=True)
    claims = verify_release(rel, replay="last")
    failed = failures(claims)
    # Every hash and root is consistent; the id, the content address of the old text, is not, and only the
    # replay tells that the weights were not trained on the new text.
    assert set(failed) == {"replay pretrain steps 40..60", "data ids"}, failed
    assert victim in failed["data ids"]
    assert "beyond floating-point tolerance" in failed["replay pretrain steps 40..60"]
    distance, noise = (float(re.search(rf"{key} ([0-9.e+-]+)", failed["replay pretrain steps 40..60"]).group(1))
                       for key in ("distance", "interval"))
    assert distance > 4 * noise > 0


def test_a_reordered_training_order_fails_the_order_rule_even_with_every_hash_recomputed(run_root, tmp_path):
    """Two lines of order.txt swapped, and the order's hash and the Merkle roots recomputed in the attestation:
    the order is still not the ids sorted by sha256(seed, id, repeat), and verify --data says so."""
    from glassforge.core.hashing import sha256_file
    from glassforge.core.merkle import order_roots
    from glassforge.release.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    path = rel / "data" / "order.txt"
    order = path.read_text().splitlines()
    order[0], order[1] = order[1], order[0]
    path.write_text("".join(d + "\n" for d in order))
    rows = _pack_rows(rel)
    stmt = json.loads((rel / "attestation.json").read_text())
    data = stmt["predicate"]["data"]
    roots = order_roots(order, {r["id"]: bytes.fromhex(r["sha256"]) for r in rows},
                        {r["id"]: r["source_name"] for r in rows}, list(data["source_merkle_roots"]))
    data.update(order_sha256=sha256_file(path), mix_merkle_root=roots["mix"], source_merkle_roots=roots["sources"])
    (rel / "attestation.json").write_text(json.dumps(stmt, indent=2, sort_keys=True) + "\n")
    failed = failures(verify_release(rel, data=True))
    assert "data order rule" in failed and "sorted by sha256(seed, id, repeat)" in failed["data order rule"]
    assert "data order" not in failed and "data merkle root" not in failed  # the recomputed hashes agree


def test_a_changed_pack_document_fails_naming_it(run_root, tmp_path, capsys):
    from glassforge.cli import main

    rel = copy_release(run_root, tmp_path / "release")
    victim = _pack_rows(rel)[3]
    _rewrite_pack_document(rel, victim["id"], victim["text"].replace("e", "E", 1), recompute=False)
    assert main(["verify", str(rel), "--data"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL data documents: document {victim['id']} in documents.parquet: its text does not hash" in out
    assert "FAIL file data/documents.parquet: changed" in out


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing"])
def test_a_damaged_data_pack_is_a_fail_naming_the_file(run_root, tmp_path, capsys, damage):
    from glassforge.cli import main

    rel = copy_release(run_root, tmp_path / "release")
    pack = rel / "data" / "documents.parquet"
    if damage == "truncated":
        pack.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])
    elif damage == "corrupt":
        data = bytearray(pack.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        pack.write_bytes(bytes(data))
    else:
        pack.unlink()
    assert main(["verify", str(rel), "--data"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    fails = [line for line in captured.out.splitlines() if line.startswith("FAIL ")]
    assert any(line.startswith("FAIL file data/documents.parquet") for line in fails), fails
    assert any(line.startswith("FAIL data") and "documents.parquet" in line for line in fails), fails


def test_sample_coverage_is_the_verifiers_draw(run_root):
    from glassforge.release.replay import Attested, choose

    rel = run_root / "release"
    pred = json.loads((rel / "attestation.json").read_text())["predicate"]
    attested = Attested.of(rel, pred)
    first, again = choose(attested, "sample", 2, seed=5), choose(attested, "sample", 2, seed=5)
    assert first == again and len(first) == 2
    assert {str(i) for s in range(20) for i in choose(attested, "sample", 1, seed=s)} == {
        str(i) for st in ("pretrain", "sft", "rl") for i in attested.intervals(st)}  # every interval can be drawn
    assert [str(i) for i in choose(attested, "last", 2, 0)] == ["pretrain steps 40..60", "sft steps 20..30",
                                                               "rl steps 3..6"]


def test_a_fine_tuning_interval_replayed_alone_is_bit_for_bit(run_root, tmp_path):
    """The build compiled fine-tuning after pretraining in one process; a replay of one fine-tuning interval
    compiles it first: the same kernels only because each training starts dynamo afresh."""
    from glassforge.release.replay import Attested, choose
    from glassforge.release.verify import verify_release

    rel = copy_release(run_root, tmp_path / "release")
    pred = json.loads((rel / "attestation.json").read_text())["predicate"]
    seed = next(s for s in range(100) if [str(i) for i in choose(Attested.of(rel, pred), "sample", 1, s)]
                == ["sft steps 10..20"])
    claims = verify_release(rel, replay="sample", samples=1, seed=seed)
    assert not failures(claims), failures(claims)
    assert dict((n, r) for n, ok, r in claims)["replay sft steps 10..20"].startswith("bit for bit")


def test_run_data_check_names_an_altered_document(run_root, tmp_path):
    """`--data RUN` checks the builder's run folder instead of the release's pack."""
    from glassforge.release.verify import verify_release

    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(run_root / "recipe.toml", run / "recipe.toml")
    shutil.copytree(run_root / "data", run / "data")
    shutil.copytree(run_root / "tokenizer", run / "tokenizer")
    first = (run / "data" / "order.txt").read_text().splitlines()[0]
    lines = (run / "data" / "documents.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        doc = json.loads(line)
        if doc["id"] == first:
            doc["text"] = doc["text"].replace(" the ", " a ", 1) + "\nAnd one more sentence, added later."
            lines[i] = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    (run / "data" / "documents.jsonl").write_text("\n".join(lines) + "\n")
    failed = failures(verify_release(run_root / "release", data=run))
    assert any(first in reason for reason in failed.values()), failed  # the changed document is named


def test_cli_verify_exit_codes(run_root, tmp_path, capsys):
    from glassforge.cli import main
    from test_standards import ec_key

    assert main(["verify", str(run_root / "release")]) == 0
    rel = copy_release(run_root, tmp_path / "release")
    _edit_recipe(rel)
    assert main(["verify", str(rel)]) == 1
    assert "FAIL file recipe.toml" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["verify", str(run_root / "release"), "--replay", "everything"])
    assert e.value.code == 2
    assert main(["verify", str(run_root / "release"), "--replay", "sample", "--samples", "0"]) == 2
    assert "--samples 0: must be at least 1" in capsys.readouterr().err
    _, pub = ec_key(tmp_path)
    assert main(["verify", str(run_root / "release"), "--public-key", str(pub)]) == 1  # not signed
    assert main(["verify", str(run_root / "release"), "--public-key", str(tmp_path / "none.pub")]) == 2
    assert "--public-key" in capsys.readouterr().err


def test_a_release_with_a_sharded_trace_index_attests_and_checks_each_shard(run_root, tmp_path):
    """[release] trace_shards = 3: the release's trace/ holds three shards built by two worker processes, the
    attestation lists each shard's index hash, verify passes, traces equal the single index's, and a changed
    shard is named."""
    import tomllib

    import tomli_w

    from glassforge.core.runfolder import Run
    from glassforge.release.stage import run_release
    from glassforge.release.trace import Tracer
    from glassforge.release.verify import verify_release

    copy = tmp_path / "run"
    shutil.copytree(run_root, copy, ignore=shutil.ignore_patterns("release"))
    recipe = tomllib.loads((copy / "recipe.toml").read_text())
    recipe["release"] = {"trace_shards": 3}
    recipe["data"].update(executor="processes", workers=2)
    (copy / "recipe.toml").write_text(tomli_w.dumps(recipe))
    run_release(Run(copy))
    rel = copy / "release"
    shards = json.loads((rel / "attestation.json").read_text())["predicate"]["trace_index"]["shards"]
    assert [s["folder"] for s in shards] == ["shard-000", "shard-001", "shard-002"]
    claims = verify_release(rel)
    assert not failures(claims) and sum(n.startswith("trace shard ") for n, _, _ in claims) == 3
    text = _pack_rows(rel)[5]["text"][:200]
    one, many = Tracer(run_root / "release" / "trace").trace(text), Tracer(rel / "trace").trace(text)
    one.pop("elapsed_ms"), many.pop("elapsed_ms")
    assert one == many and one["spans"]
    _flip_byte(rel / "trace" / "shard-001" / "sa.bin", 7)
    failed = failures(verify_release(rel))
    assert "file trace/shard-001/sa.bin" in failed and "trace index" in failed
