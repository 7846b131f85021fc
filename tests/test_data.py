"""The data stage: sources, cleaning, filters, dedup, decontamination, manifest, Merkle roots, shards, inspect."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_text
from glassforge.core.manifest import iter_manifest_entries, read_manifest_head
from glassforge.core.merkle import merkle_root
from glassforge.core.recipe import dump_recipe, parse_recipe
from glassforge.core.runfolder import Run
from glassforge.data.card import write_data_card
from glassforge.data.checks import verify_data
from glassforge.data.clean import filter_reason, json_string_of_normalized, normalize
from glassforge.data.documents import iter_documents
from glassforge.data.stage import input_fingerprint, run_data
from glassforge.tools.inspect import inspect

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ru", "sa", "ti", "vo", "ze", "bra", "cle", "dro")
         for b in ("n", "st", "ve", "rd", "mp", "ll", "x", "th", "ck", "ng", "sh", "rk", "lf", "ft", "pt")]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def prose(rng: random.Random, n_sentences: int = 6) -> str:
    return " ".join(words(rng, rng.randint(8, 16)).capitalize() + "." for _ in range(n_sentences))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def make_run(root: Path, sources: list[dict], seed: int = 7, **data) -> Run:
    """A run folder whose recipe has these sources and [data] settings (tokenizer small for speed)."""
    lines = [f"name = \"t\"\nseed = {seed}\n", "[data]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in data.items()]
    for s in sources:
        lines.append("\n[[data.sources]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in s.items()]
    lines.append("\n[tokenizer]\nvocab_size = 300\nmin_frequency = 1\n")
    lines.append("[pretrain]\nseq_len = 16\nbatch_tokens = 64\n")
    recipe = parse_recipe("\n".join(lines).encode(), "test")
    run = Run.create(root)
    atomic_write_text(run.recipe, dump_recipe(recipe))
    return run


def entries(run: Run) -> dict[str, dict]:
    """Manifest entries by name (where an item is in its source); `duplicate_of` turned from an id into a name."""
    found = list(iter_manifest_entries(run))
    name_of = {d["id"]: d["name"] for d in found}
    return {d["name"]: {**d, "duplicate_of": name_of.get(d["duplicate_of"])} for d in found}


def one_kept_one_dropped(e: dict, x: str, y: str, reason: str) -> bool:
    """Of x and y, the one with the lower id is kept and the other is dropped for `reason`, naming it."""
    keep, drop = sorted((x, y), key=lambda n: e[n]["id"])
    return e[keep]["status"] == "kept" and e[drop]["reason"] == reason and e[drop]["duplicate_of"] == keep


def build_shards(run: Run) -> None:
    from glassforge.tokenizer.bpe import run_tokenizer
    from glassforge.tokenizer.shards import run_shards

    run_data(run)
    run_tokenizer(run)
    run_shards(run)


# --------------------------------------------------------------------------- cleaning and filters


def test_normalize_nfc_controls_whitespace():
    text = "Cafe\u0301\x00 ok\u00a0here \t\r\nline\x07two  \n\n\n\nend\u2028x  "
    out = normalize(text)
    assert out == "Caf\u00e9 ok here\nlinetwo\n\nend\nx"
    assert normalize(out) == out


def test_filter_reasons():
    from glassforge.core.recipe import DataConfig

    cfg = DataConfig(min_chars=10, max_chars=100, max_non_text_fraction=0.3, max_repeated_line_fraction=0.5)
    assert filter_reason("short", cfg) == "too_short"
    assert filter_reason("x" * 101, cfg) == "too_long"
    assert filter_reason("12345 67890 {}[]<> ##", cfg) == "non_text"
    assert filter_reason("été 1234567890 ÷÷÷÷", cfg) == "non_text"  # non-ASCII path
    assert filter_reason("same line\nsame line\nsame line\nsame line\nother", cfg) == "repeated_lines"
    assert filter_reason("A plain sentence, with words.", cfg) is None
    assert filter_reason("Une phrase en français, déjà écrite.", cfg) is None


# --------------------------------------------------------------------------- sources and bad input


def test_file_formats_and_bad_input_are_recorded_not_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(prose(rng))
    (src / "b.md").write_text("# Title\n\n" + prose(rng))
    (src / "sub" / "c d#e.rst").write_text(prose(rng))
    (src / "d.jsonl").write_text(json.dumps({"text": prose(rng)}) + "\n\n" + "{not json\n"
                                 + json.dumps({"body": "no text field"}) + "\n" + json.dumps([1, 2]) + "\n"
                                 + json.dumps({"text": prose(rng)}) + "\n")
    (src / "e.json").write_text(json.dumps([{"text": prose(rng)}, {"text": 3}]))
    pq.write_table(pa.table({"text": [prose(rng), None, prose(rng)]}), src / "f.parquet")
    pq.write_table(pa.table({"body": [prose(rng)]}), src / "g.parquet")
    (src / "bad_utf8.txt").write_bytes(b"caf\xe9 " + prose(rng).encode())
    (src / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "empty.txt").write_bytes(b"")
    (src / "one_line_50mb.txt").write_bytes(b"word " * (10 << 20))
    (src / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    (src / "image.png").write_bytes(b"\x89PNG")
    os.symlink(tmp_path / "nowhere.txt", src / "unreadable.txt")
    run = make_run(tmp_path / "run", [{"name": "files", "kind": "files", "path": str(src), "license": "CC0-1.0"}])
    summary = run_data(run)
    e = entries(run)
    reason = {k: (v["status"], v["reason"]) for k, v in e.items()}
    assert reason["files:a.txt"] == ("kept", None)
    assert reason["files:b.md"] == ("kept", None)
    assert reason["files:sub/c%20d%23e.rst"] == ("kept", None)
    assert reason["files:d.jsonl#L1"] == ("kept", None)
    assert reason["files:d.jsonl#L3"] == ("dropped", "malformed_json")
    assert reason["files:d.jsonl#L4"] == ("dropped", "missing_text_field")
    assert reason["files:d.jsonl#L5"] == ("dropped", "malformed_json")
    assert reason["files:d.jsonl#L6"] == ("kept", None)
    assert "files:d.jsonl#L2" not in e  # a blank line holds nothing
    assert reason["files:e.json#0"] == ("kept", None)
    assert reason["files:e.json#1"] == ("dropped", "missing_text_field")
    assert reason["files:f.parquet#0"] == ("kept", None)
    assert reason["files:f.parquet#1"] == ("dropped", "missing_text_field")
    assert reason["files:f.parquet#2"] == ("kept", None)
    assert reason["files:g.parquet"] == ("dropped", "missing_text_field")
    assert reason["files:bad_utf8.txt"] == ("dropped", "invalid_utf8")
    assert reason["files:binary.txt"] == ("dropped", "binary")
    assert reason["files:empty.txt"] == ("dropped", "empty_file")
    assert reason["files:one_line_50mb.txt"] == ("dropped", "too_long")
    assert reason["files:corrupt.parquet"] == ("dropped", "corrupt_parquet")
    assert reason["files:image.png"] == ("dropped", "unsupported_file_type")
    assert reason["files:unreadable.txt"] == ("dropped", "unreadable")
    assert e["files:a.txt"]["license"] == "CC0-1.0" and e["files:a.txt"]["source"].startswith("file://")
    assert e["files:f.parquet#2"]["source"].endswith("f.parquet#2")
    assert summary["documents_kept"] == 8 and summary["documents_seen"] == len(e)
    for code in ("malformed_json", "missing_text_field", "invalid_utf8", "binary", "empty_file", "too_long",
                 "corrupt_parquet", "unreadable", "unsupported_file_type"):
        assert summary["dropped"][code] >= 1, code
    card = write_data_card(run, tmp_path / "card").read_text()
    for code, n in summary["dropped"].items():
        assert f"| `{code}` |" in card and f" {n} |" in card
    assert "CC0-1.0" in card and (tmp_path / "card" / "data_lengths.png").stat().st_size > 1000


def test_missing_source_path_is_a_user_error_before_any_work(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.txt").write_text("Enough words to keep this document around.")
    run = make_run(tmp_path / "run", [{"name": "good", "kind": "files", "path": str(good)},
                                      {"name": "gone", "kind": "files", "path": str(tmp_path / "missing")}])
    with pytest.raises(UserError, match=r"data.sources\[1\] 'gone': path '.*missing' does not exist"):
        run_data(run)
    assert not (run.data / "documents.jsonl").exists()
    from glassforge.cli import main

    assert main(["data", str(run.root)]) == 2  # one line on stderr, no traceback
    run = make_run(tmp_path / "run2", [{"name": "x", "kind": "files", "path": str(good), "weight": -1.0}])
    with pytest.raises(UserError, match="weight"):
        run_data(run)
    (tmp_path / "x.csv").write_text("a,b")
    run = make_run(tmp_path / "run3", [{"name": "x", "kind": "files", "path": str(tmp_path / "x.csv")}])
    with pytest.raises(UserError, match="cannot read '.csv'"):
        run_data(run)


def test_hf_dataset_offline_from_local_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    texts = [prose(rng) for _ in range(5)]
    folder = tmp_path / "hub_layout" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"content": texts[:3]}), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"content": texts[3:]}), folder / "train-00001-of-00002.parquet")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": texts[:2] + [None]}).save_to_disk(str(saved))
    run = make_run(tmp_path / "run", [
        {"name": "hub", "kind": "hf", "path": str(tmp_path / "hub_layout"), "text_field": "content",
         "split": "train", "license": "CC-BY-4.0"},
        {"name": "disk", "kind": "hf", "path": str(saved), "text_field": "content", "split": "train"}])
    run_data(run)
    e = entries(run)
    kept = [d for d in iter_documents(run)]
    assert sorted(d["text"] for d in kept) == sorted(normalize(t) for t in texts)
    assert e["hub:train#4"]["license"] == "CC-BY-4.0"
    assert one_kept_one_dropped(e, "disk:train#0", "hub:train#0", "exact_duplicate")
    assert e["disk:train#2"]["reason"] == "missing_text_field"
    with pytest.raises(UserError, match="does not exist"):
        run_data(make_run(tmp_path / "r2", [{"name": "h", "kind": "hf", "path": str(tmp_path / "nope")}]))


# --------------------------------------------------------------------------- dedup and decontamination


def test_exact_and_planted_near_duplicates_found(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "c"
    src.mkdir()
    originals = {}
    for i in range(60):
        text = words(rng, rng.randint(80, 200))
        originals[i] = text
        (src / f"{i:03d}_a.txt").write_text(text)
    for i, text in originals.items():
        w = text.split()
        j = rng.randrange(len(w))
        w[j] = "changedword" if w[j] != "changedword" else "other"
        (src / f"{i:03d}_b.txt").write_text(" ".join(w))
    (src / "999_copy.txt").write_text(originals[3])
    run = make_run(tmp_path / "run", [{"name": "c", "kind": "files", "path": str(src)}])
    summary = run_data(run)
    e = entries(run)
    assert one_kept_one_dropped(e, "c:999_copy.txt", "c:003_a.txt", "exact_duplicate")
    first = min(("c:999_copy.txt", "c:003_a.txt"), key=lambda n: e[n]["id"])
    pairs = [(f"c:{i:03d}_a.txt" if i != 3 else first, f"c:{i:03d}_b.txt") for i in originals]
    found = sum(one_kept_one_dropped(e, a, b, "near_duplicate") for a, b in pairs)
    assert found / len(originals) >= 0.9
    assert all(e[a]["status"] == "kept" or e[b]["status"] == "kept" for a, b in pairs)  # no false positives
    assert summary["dedup"]["near_duplicates"] == found


def test_minhash_estimates_jaccard_like_datasketch():
    from datasketch import MinHash

    from glassforge.data.dedup import MinHasher, estimated_jaccard

    rng = random.Random(11)
    mh = MinHasher(112, 5)
    ours, theirs, exact = [], [], []
    for _ in range(40):
        a = words(rng, 150).split()
        b = list(a)
        for _ in range(rng.randint(1, 12)):
            b[rng.randrange(len(b))] = rng.choice(VOCAB)
        sa = {" ".join(a[i:i + 5]) for i in range(len(a) - 4)}
        sb = {" ".join(b[i:i + 5]) for i in range(len(b) - 4)}
        exact.append(len(sa & sb) / len(sa | sb))
        ours.append(estimated_jaccard(mh.signature(" ".join(a)), mh.signature(" ".join(b))))
        m1, m2 = MinHash(num_perm=112, seed=1), MinHash(num_perm=112, seed=1)
        m1.update_batch([s.encode() for s in sa])
        m2.update_batch([s.encode() for s in sb])
        theirs.append(m1.jaccard(m2))
    err_ours = np.sqrt(np.mean((np.array(ours) - exact) ** 2))
    err_theirs = np.sqrt(np.mean((np.array(theirs) - exact) ** 2))
    assert err_ours < 0.06 and err_ours < 1.6 * err_theirs + 0.01


def test_decontamination_drops_and_counts(tmp_path):
    rng = random.Random(9)
    src = tmp_path / "c"
    src.mkdir()
    docs = [words(rng, 60) for _ in range(4)]
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_text(d)
    passage = " ".join(docs[1].split()[20:35])  # 15 words of doc 1
    near_miss = " ".join(docs[2].split()[10:22])  # 12 words of doc 2: shorter than a 13-gram
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(json.dumps({"question": passage.upper(), "choices": ["a"], "answer": 0}) + "\n"
                       + json.dumps({"prompt": near_miss, "answer": "x"}) + "\n")
    run = make_run(tmp_path / "run", [{"name": "c", "kind": "files", "path": str(src)}],
                   decontaminate=[str(evalset)])
    summary = run_data(run)
    e = entries(run)
    assert e["c:1.txt"]["reason"] == "contaminated" and e["c:1.txt"]["contaminated_by"] == [str(evalset)]
    assert e["c:2.txt"]["status"] == "kept"
    s = summary["decontamination"]["sets"][str(evalset)]
    assert s["documents_dropped"] == 1 and s["items"] == 4 and s["items_shorter_than_n"] == 3
    card = write_data_card(run, tmp_path / "card").read_text()
    assert f"| `{evalset}` | 4 | 3 |" in card


# --------------------------------------------------------------------------- manifest, Merkle roots, order


def test_merkle_root_definition():
    import hashlib

    h = [hashlib.sha256(bytes([i])).digest() for i in range(7)]
    leaf = [hashlib.sha256(b"\x00" + x).digest() for x in h]

    def node(a, b):
        return hashlib.sha256(b"\x01" + a + b).digest()

    # RFC 6962: split at the largest power of two below n.
    assert merkle_root(h[:1]) == leaf[0].hex()
    assert merkle_root(h[:3]) == node(node(leaf[0], leaf[1]), leaf[2]).hex()
    want7 = node(node(node(leaf[0], leaf[1]), node(leaf[2], leaf[3])), node(node(leaf[4], leaf[5]), leaf[6]))
    assert merkle_root(h) == want7.hex() == merkle_root([x.hex() for x in h])
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()

    def rfc6962(leaves: list[bytes]) -> bytes:  # the RFC's recursive definition, MTH(D[n])
        if len(leaves) == 1:
            return hashlib.sha256(b"\x00" + leaves[0]).digest()
        k = 1 << ((len(leaves) - 1).bit_length() - 1)  # the largest power of two below n
        return node(rfc6962(leaves[:k]), rfc6962(leaves[k:]))

    digests = [hashlib.sha256(bytes([i])).digest() for i in range(70)]
    for n in range(1, 71):
        assert merkle_root(digests[:n]) == rfc6962(digests[:n]).hex(), n


def _two_source_corpus(tmp_path: Path, seed: int = 2) -> tuple[Path, Path]:
    rng = random.Random(seed)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for i in range(6):
        (a / f"{i}.txt").write_text(prose(rng))
    for i in range(4):
        (b / f"{i}.txt").write_text(prose(rng))
    return a, b


def test_one_byte_changes_its_hash_its_source_root_and_the_mix_root_only(tmp_path):
    a, b = _two_source_corpus(tmp_path / "in")
    sources = [{"name": "a", "kind": "files", "path": str(a)}, {"name": "b", "kind": "files", "path": str(b)}]
    run1 = make_run(tmp_path / "r1", sources, val_fraction=0.0)
    run_data(run1)
    text = (a / "3.txt").read_bytes()
    (a / "3.txt").write_bytes(text[:10] + (b"Q" if text[10:11] != b"Q" else b"R") + text[11:])
    run2 = make_run(tmp_path / "r2", sources, val_fraction=0.0)
    run_data(run2)
    m1, m2 = read_manifest_head(run1), read_manifest_head(run2)
    d1, d2 = entries(run1), entries(run2)
    changed = [k for k in d1 if d1[k]["sha256"] != d2[k]["sha256"]]
    assert changed == ["a:3.txt"] and d1["a:3.txt"]["id"] != d2["a:3.txt"]["id"]  # its content address
    assert all(d1[k] == d2[k] for k in d1 if k != "a:3.txt")
    assert m1["merkle"]["sources"]["a"] != m2["merkle"]["sources"]["a"]
    assert m1["merkle"]["sources"]["b"] == m2["merkle"]["sources"]["b"]
    assert m1["merkle"]["mix"] != m2["merkle"]["mix"]
    order1, order2 = ((r.data / "order.txt").read_text().split() for r in (run1, run2))
    assert [i for i in order1 if i != d1["a:3.txt"]["id"]] == [i for i in order2 if i != d2["a:3.txt"]["id"]]
    checks = verify_data(run2)
    assert all(ok for _, ok, _ in checks), checks


def test_sampling_weights_repeat_and_subsample(tmp_path):
    rng = random.Random(4)
    folders = {}
    for name, n in (("twice", 5), ("half", 40), ("none", 3)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i in range(n):
            (folders[name] / f"{i}.txt").write_text(prose(rng))
    run = make_run(tmp_path / "run", [{"name": "twice", "kind": "files", "path": str(folders["twice"]), "weight": 2.0},
                                      {"name": "half", "kind": "files", "path": str(folders["half"]), "weight": 0.5},
                                      {"name": "none", "kind": "files", "path": str(folders["none"]), "weight": 0.0}],
                   val_fraction=0.0)
    run_data(run)
    order = (run.data / "order.txt").read_text().splitlines()
    counts = {}
    for d in order:
        counts[d] = counts.get(d, 0) + 1
    e = entries(run)
    assert all(counts[e[f"twice:{i}.txt"]["id"]] == 2 for i in range(5))
    assert not any(d.startswith("none:") for d in order)
    half = sum(d.startswith("half:") for d in order)
    assert 10 <= half <= 30 and all(counts[d] == 1 for d in order if d.startswith("half:"))
    assert sum(v.get("repeats", 0) for v in e.values()) == len(order)
    assert all(ok for _, ok, _ in verify_data(run))


def test_same_inputs_give_byte_identical_manifest_and_shards(tmp_path):
    a, b = _two_source_corpus(tmp_path / "in")
    sources = [{"name": "a", "kind": "files", "path": str(a), "weight": 1.5},
               {"name": "b", "kind": "files", "path": str(b)}]
    runs = [make_run(tmp_path / f"r{i}", sources, val_fraction=0.3) for i in range(2)]
    for run in runs:
        build_shards(run)
    names = ["manifest.json", "manifest.jsonl", "documents.jsonl", "order.txt", "shards.json", "train.bin",
             "val.bin", "train.offsets.npy", "val.offsets.npy"]
    for name in names:
        assert (runs[0].data / name).read_bytes() == (runs[1].data / name).read_bytes(), name
    assert sorted(p.name for p in runs[0].data.iterdir()) == sorted(names)  # no temporary files left


def test_shards_follow_order_and_every_token_maps_back(tmp_path):
    from glassforge.tokenizer.bpe import load_tokenizer
    from glassforge.tokenizer.shards import TokenStream, document_tokens

    a, b = _two_source_corpus(tmp_path / "in")
    run = make_run(tmp_path / "run", [{"name": "a", "kind": "files", "path": str(a), "weight": 2.0},
                                      {"name": "b", "kind": "files", "path": str(b)}], val_fraction=0.2)
    build_shards(run)
    stream = TokenStream(run, "train")
    assert stream.doc_ids == (run.data / "order.txt").read_text().splitlines()
    info = json.loads((run.data / "shards.json").read_text())
    assert info["order_sha256"] == read_manifest_head(run)["order_sha256"]
    tok = load_tokenizer(run.tokenizer)
    texts = {d["id"]: d["text"] for d in iter_documents(run)}
    per_doc = document_tokens(run)
    for i, doc_id in enumerate(stream.doc_ids):
        lo, hi = int(stream.offsets[i]), int(stream.offsets[i + 1])
        assert tok.decode(stream.tokens[lo:hi - 1].tolist()) == texts[doc_id]
        assert per_doc[doc_id] == hi - lo - 1
        assert stream.document_of(lo) == i and stream.document_of(hi - 1) == i
    val = TokenStream(run, "val")
    assert val.doc_ids == [d["id"] for d in iter_documents(run, "val")]


def test_verify_detects_a_changed_document(tmp_path):
    a, b = _two_source_corpus(tmp_path / "in")
    run = make_run(tmp_path / "run", [{"name": "a", "kind": "files", "path": str(a)}], val_fraction=0.0)
    run_data(run)
    assert all(ok for _, ok, _ in verify_data(run))
    lines = (run.data / "documents.jsonl").read_text().splitlines()
    doc = json.loads(lines[2])
    doc["text"] = doc["text"].replace("a", "b", 1) if "a" in doc["text"] else doc["text"] + "!"
    lines[2] = json.dumps(doc)
    (run.data / "documents.jsonl").write_text("\n".join(lines) + "\n")
    failed = {name for name, ok, _ in verify_data(run) if not ok}
    assert failed == {"document hashes", "mix merkle root", "merkle root of source a"}


def test_input_fingerprint_tracks_files_and_seed(tmp_path):
    from glassforge.core.recipe import load_recipe

    a, _ = _two_source_corpus(tmp_path / "in")
    run = make_run(tmp_path / "run", [{"name": "a", "kind": "files", "path": str(a)}])
    recipe = load_recipe(run.recipe)
    fp = input_fingerprint(recipe)
    assert fp == input_fingerprint(recipe)
    (a / "new.txt").write_text("another document here")
    fp2 = input_fingerprint(recipe)
    assert fp2 != fp
    recipe.seed += 1
    assert input_fingerprint(recipe) != fp2
    assert input_fingerprint(load_recipe("tiny")) == input_fingerprint(load_recipe("tiny"))


def test_inspect_doc_token_and_step(tmp_path):
    a, b = _two_source_corpus(tmp_path / "in")
    run = make_run(tmp_path / "run", [{"name": "a", "kind": "files", "path": str(a), "license": "MIT"},
                                      {"name": "b", "kind": "files", "path": str(b)}], val_fraction=0.0)
    (a / "zz_dup.txt").write_text((a / "0.txt").read_text())
    build_shards(run)
    out = inspect(run, doc="a:1.txt")
    assert "licence  MIT" in out and (a / "1.txt").read_text().strip() in out
    e = entries(run)
    dropped, kept = sorted(("a:0.txt", "a:zz_dup.txt"), key=lambda n: e[n]["status"] == "kept")
    assert e[kept]["id"] < e[dropped]["id"]  # the lower id is kept
    out = inspect(run, doc=dropped)
    assert "exact_duplicate" in out and e[kept]["id"] in out and inspect(run, doc=e[dropped]["id"]) == out
    from glassforge.tokenizer.shards import TokenStream

    stream = TokenStream(run, "train")
    n = int(stream.offsets[3]) + 2
    out = inspect(run, token=n)
    assert f"document {stream.doc_ids[3]}" in out and "token 2 of" in out
    out = inspect(run, step=1)
    from glassforge.train.order import DataOrder, Windows

    windows = Windows(stream, 16)
    first = DataOrder(len(windows), 64 // 16, 7).global_batch(0)[0]
    assert stream.doc_ids[stream.document_of(int(first) * 16)] in out and "step 1: 4 windows" in out
    with pytest.raises(UserError):
        inspect(run, doc="nope")
    with pytest.raises(UserError):
        inspect(run, token=10 ** 9)
    from glassforge.cli import main

    assert main(["data", "inspect", str(run.root), "--doc", "a:1.txt"]) == 0


def test_pystdlib_ids_are_unique_even_for_repeated_names(tmp_path):
    run = make_run(tmp_path / "run", [{"name": "py", "kind": "pystdlib", "modules": ["posixpath"]}])
    run_data(run)
    found = list(iter_manifest_entries(run))
    ids, names = [d["id"] for d in found], [d["name"] for d in found]
    assert len(ids) == len(set(ids)) and len(names) == len(set(names)) and "py:posixpath.normpath~2" in names


def test_fast_ascii_encoder_gives_the_tokenizers_ids(tmp_path):
    from glassforge.data import pystdlib
    from glassforge.tokenizer.bpe import train_tokenizer
    from glassforge.tokenizer.fast import FastAsciiEncoder

    texts = [normalize(d.text) for d in pystdlib.iter_documents(["json", "textwrap", "string", "shlex"])]
    tok = train_tokenizer(texts, 600)
    fast = FastAsciiEncoder(tok)
    rng = random.Random(8)
    alphabet = "abZ09'\n.,!-_ ?(){}\"sltvedmAB"
    tricky = ["  leading", "trailing  ", "a\n\n b", "it's I'LL we've 'S", "123abc4.5", "x  y   z", "!!! ?",
              "a <|endoftext|> b", "caf\u00e9 na\u00efve"]
    samples = texts + tricky + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(800)]
    used = 0
    for t in samples:
        if fast.usable(t):
            used += 1
            assert fast.encode(t) == tok.encode(t, add_special_tokens=False).ids, repr(t)
    assert used > len(samples) * 0.8
    assert not fast.usable("a <|endoftext|> b") and not fast.usable("caf\u00e9")


STRESS = "abZ09'\n\t\r\x0b\x0c\x1c\x1f\x00\x7f.,!-_ ?(){}\"sltvedmrAB     "


def test_piece_starts_are_the_byte_level_pre_tokenizer_pieces():
    """Contractions, whitespace runs, \\x1c-\\x1f (not whitespace for tokenizers' regex), documents end to end."""
    from tokenizers import pre_tokenizers

    from glassforge.tokenizer.fast import piece_starts

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rng = random.Random(5)
    fixed = ["it's 're x'll 'd\n've 'S ''s .'s", "a  b\n\n c \t\nd", "  ", "'", "'r", "x'v", "\x1c\x1c. \x1fa"]
    for trial in range(300):
        docs = fixed if trial == 0 else ["".join(rng.choice(STRESS) for _ in range(rng.randint(0, 30)))
                                          for _ in range(rng.randint(1, 8))]
        want, at = [], 0
        for d in docs:
            # pre_tokenize_str's offsets count characters; all ASCII here, so they are bytes too
            want += [at + start for _, (start, _) in pre.pre_tokenize_str(d)]
            at += len(d)
        doc_starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
        got = piece_starts(np.frombuffer("".join(docs).encode(), dtype=np.uint8), doc_starts)
        assert got.tolist() == want, docs


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_fast_ascii_encoder_batches_equal_tokenizers(dtype):
    from glassforge.data import pystdlib
    from glassforge.tokenizer.bpe import train_tokenizer
    from glassforge.tokenizer.fast import FastAsciiEncoder

    texts = [normalize(d.text) for d in pystdlib.iter_documents(["json", "textwrap"])]
    tok = train_tokenizer(texts, 400)
    fast = FastAsciiEncoder(tok, dtype)
    rng = random.Random(6)
    batches = [texts] + [["".join(rng.choice(STRESS) for _ in range(rng.randint(0, 50)))
                          for _ in range(rng.randint(1, 20))] for _ in range(200)]
    for batch in batches:
        ids, counts = fast.encode_batch(batch)
        want = [tok.encode(t, add_special_tokens=False).ids for t in batch]
        assert ids.dtype == dtype and counts.tolist() == [len(w) for w in want], batch
        assert ids.tolist() == [i for w in want for i in w], batch
    fast.MAX_CACHE = 10  # a full cache is emptied and refilled: same ids
    ids, counts = fast.encode_batch(texts[:3])
    assert ids.tolist() == [i for t in texts[:3] for i in tok.encode(t, add_special_tokens=False).ids]


def test_shards_fall_back_to_tokenizers_when_the_fast_path_disagrees(tmp_path, monkeypatch):
    from glassforge.tokenizer import fast, shards
    from glassforge.tokenizer.bpe import load_tokenizer

    a, b = _two_source_corpus(tmp_path / "in")
    (a / "unicode.txt").write_text("Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9: " + prose(random.Random(1)))
    run = make_run(tmp_path / "run", [{"name": "a", "kind": "files", "path": str(a)}], val_fraction=0.0)
    build_shards(run)
    good = (run.data / "train.bin").read_bytes()
    monkeypatch.setattr(fast.FastAsciiEncoder, "encode_batch", lambda self, texts: (
        np.full(3 * len(texts), 5, dtype=self.dtype), np.full(len(texts), 3)))
    shards.run_shards(run)
    assert (run.data / "train.bin").read_bytes() == good
    tok = load_tokenizer(run.tokenizer)
    stream = shards.TokenStream(run, "train")
    texts = {d["id"]: d["text"] for d in iter_documents(run)}
    unicode_id = entries(run)["a:unicode.txt"]["id"]
    i = stream.doc_ids.index(unicode_id)
    assert stream.tokens[stream.offsets[i]:stream.offsets[i + 1] - 1].tolist() == tok.encode(
        texts[unicode_id], add_special_tokens=False).ids


def test_chunk_tokenizer_mixes_fast_and_tokenizers_documents_in_order():
    from glassforge.data import pystdlib
    from glassforge.tokenizer.bpe import ENDOFTEXT, train_tokenizer
    from glassforge.tokenizer.fast import ChunkTokenizer

    texts = [normalize(d.text) for d in pystdlib.iter_documents(["json"])]
    tok = train_tokenizer(texts, 400)
    eot = tok.token_to_id(ENDOFTEXT)
    chunk = ["plain words", "caf\u00e9 cr\u00e8me", "", f"a {ENDOFTEXT} b", texts[0], "it's", "na\u00efve"]
    tokenize = ChunkTokenizer(tok, np.dtype(np.uint16), eot)
    stream, lengths = tokenize(chunk)
    want = [tok.encode(t, add_special_tokens=False).ids + [eot] for t in chunk]
    assert tokenize.fast is not None  # the check against tokenizers passed
    assert lengths.tolist() == [len(w) for w in want]
    assert stream.tolist() == [i for w in want for i in w]


def test_word_hashes_are_the_documented_polynomial_hash():
    """Pinned definition (dedup decisions and similarities in the manifest depend on it): words are runs of ASCII
    letters and digits and bytes >= 0x80, lower-cased; hash = mix64(sum((byte + 1) * BASE**k) + length)."""
    import re

    from glassforge.data.dedup import _BASE, Words, mix64

    rng = random.Random(4)
    alphabet = "aZ9_ .\n\u00e9\u00dc\u4e2d-'" + "xyzXYZ"
    blobs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))).encode() for _ in range(200)]
    got = Words(blobs)
    for d, blob in enumerate(blobs):
        want = []
        for w in re.findall(rb"[A-Za-z0-9\x80-\xff]+", blob):
            h = sum((c + 1) * pow(_BASE, k, 1 << 64) for k, c in enumerate(w.lower())) + len(w)
            want.append(h % (1 << 64))
        assert got.of(d).tolist() == mix64(np.array(want, dtype=np.uint64)).tolist(), blob


def test_json_string_of_normalized_text_equals_json_dumps():
    rng = random.Random(9)
    alphabet = [chr(c) for c in range(0, 0xA0)] + ["\u00e9", "\u2028", "\u4e2d", '"', "\\", "\n", " ", "a"] * 8
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(500)]
    for text in texts + ['say "hi" \\ there\n\nnext', ""]:
        clean = normalize(text)
        assert json_string_of_normalized(clean) == json.dumps(clean, ensure_ascii=False), repr(clean)


def test_shards_tokenized_in_two_processes_equal_one_process(tmp_path, monkeypatch):
    from glassforge.tokenizer import shards

    a, _ = _two_source_corpus(tmp_path / "in")
    (a / "unicode.txt").write_text("Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9: " + prose(random.Random(2)))
    run = make_run(tmp_path / "run", [{"name": "a", "kind": "files", "path": str(a)}], val_fraction=0.2)
    build_shards(run)
    names = ["train.bin", "val.bin", "train.offsets.npy", "val.offsets.npy", "shards.json", "manifest.json"]
    one = [(run.data / n).read_bytes() for n in names]
    monkeypatch.setattr(shards, "_PARALLEL_MIN_BYTES", 0)
    parts = []
    real = shards._tokenize_in_parts
    monkeypatch.setattr(shards, "_tokenize_in_parts", lambda *args: parts.extend(real(*args)) or parts)
    shards.run_shards(run)
    assert len(parts) == 2 and parts[0].ids and parts[1].ids  # the second half came from the forked process
    assert [(run.data / n).read_bytes() for n in names] == one
    assert not list(run.data.glob(".tokens_by_document*"))
