"""Trace: suffix-array index over the training stream, spans traced to documents, checked against brute force."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glassforge.core.errors import UserError
from glassforge.core.manifest import iter_manifest_entries
from glassforge.core.runfolder import Run
from glassforge.release.trace import TraceIndex, Tracer
from glassforge.release.trace_index import (build_index, build_index_arrays, shard_bounds, suffix_array,
                                            write_sharded_index)
from glassforge.release.trace_search import ShardedTraceIndex, open_index

EOT = 0

RECIPE = """
name = "trace-test"
description = "trace tests"
seed = 7

[data]
val_fraction = 0.1

[[data.sources]]
name = "pystdlib"
kind = "pystdlib"
license = "PSF-2.0"
modules = ["json", "textwrap", "string", "shlex", "fnmatch", "heapq", "bisect"]

[tokenizer]
vocab_size = 1024
"""


# ------------------------------------------------------------------------------------------ helpers


def stream_of(docs: list[list[int]], dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
    flat, offsets = [], [0]
    for d in docs:
        flat += d + [EOT]
        offsets.append(len(flat))
    return np.asarray(flat, dtype=dtype), np.asarray(offsets, dtype=np.int64)


def build_synthetic(folder: Path, docs: list[list[int]], dtype=np.uint16, sa_width: int | None = None) -> TraceIndex:
    tokens, offsets = stream_of(docs, dtype)
    rows = [{"id": f"doc{i}", "source": f"synthetic://{i}", "license": "CC0-1.0", "sha256": f"{i:064x}"}
            for i in range(len(docs))]
    build_index_arrays(tokens, offsets, rows, folder, eot_id=EOT, sa_width=sa_width)
    return TraceIndex(folder)


def occurs_at(stream: list[int], q: list[int]) -> list[int]:
    m = len(q)
    return [i for i in range(len(stream) - m + 1) if stream[i:i + m] == q]


def brute_longest(stream: list[int], ids: list[int]) -> list[int]:
    out = []
    for i in range(len(ids)):
        length = 0
        while i + length < len(ids) and ids[i + length] != EOT and occurs_at(stream, ids[i:i + length + 1]):
            length += 1
        out.append(length)
    return out


def brute_maximal(stream: list[int], ids: list[int], min_tokens: int) -> list[tuple[int, int]]:
    """Every [i, j) that occurs, holds no <|endoftext|>, and occurs neither extended left nor right."""
    def ok(i, j):
        return i >= 0 and j <= len(ids) and EOT not in ids[i:j] and bool(occurs_at(stream, ids[i:j]))

    return [(i, j) for i in range(len(ids)) for j in range(i + min_tokens, len(ids) + 1)
            if ok(i, j) and not ok(i - 1, j) and not ok(i, j + 1)]


# ------------------------------------------------------------------------------------------ index


def test_suffix_array_sorts_token_suffixes():
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.uint32):
        tokens = rng.integers(0, 300 if dtype == np.uint16 else 70_000, size=400).astype(dtype)
        tokens[::7] = 255  # tokens whose low byte is 0xff or high byte 0 stress the byte order
        tokens[::11] = 256
        sa = suffix_array(tokens)
        ref = sorted(range(len(tokens)), key=lambda i: tokens[i:].tolist())
        assert sa.tolist() == ref


def test_index_files_and_hashes(tmp_path):
    idx = build_synthetic(tmp_path / "trace", [[1, 2, 3], [2, 3, 4, 5]])
    meta = json.loads((tmp_path / "trace" / "index.json").read_text())
    assert meta["tokens"] == 9 and meta["documents"] == 2 and meta["sa_bytes"] == 4
    from glassforge.core.hashing import sha256_file

    for name, rec in meta["files"].items():
        assert sha256_file(tmp_path / "trace" / name) == rec["sha256"]
    # The whole budget besides the tokens: at most 6 bytes per token (plus per-document and per-vocab tables).
    assert meta["files"]["sa.bin"]["bytes"] == 4 * meta["tokens"]
    assert idx.document(1)["id"] == "doc1"
    # A truncated file is refused, not misread.
    (tmp_path / "trace" / "sa.bin").write_bytes(b"\0" * 4)
    with pytest.raises(UserError):
        TraceIndex(tmp_path / "trace")


def test_span_never_straddles_documents(tmp_path):
    # The end of doc 0 followed by the start of doc 1 occurs only across the boundary.
    idx = build_synthetic(tmp_path / "t", [[5, 6, 7, 8], [9, 10, 11], [7, 8, 3]])
    assert idx.count([7, 8, 9, 10]) == 0
    assert idx.longest_matches([7, 8, 9, 10]) == [2, 1, 2, 1]
    assert idx.maximal_spans([7, 8, 9, 10], 1) == [(0, 2), (2, 4)]
    # <|endoftext|> in the query splits it too.
    assert idx.longest_matches([7, 8, EOT, 9, 10]) == [2, 1, 0, 2, 1]
    for span in idx.trace_ids([5, 6, 7, 8, 9, 10, 11], min_tokens=1):
        for doc, _, pos in span["documents"]:
            a, b = idx.doc_span(doc)
            assert a <= pos and pos + span["tokens"] <= b


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=24), min_size=1, max_size=8),
       query=st.lists(st.integers(0, 5), min_size=1, max_size=16),
       dtype=st.sampled_from([np.uint16, np.uint32]), sa_width=st.sampled_from([4, 5]),
       min_tokens=st.integers(1, 4))
def test_counts_and_spans_match_brute_force(docs, query, dtype, sa_width, min_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        idx = build_synthetic(Path(tmp) / "t", docs, dtype, sa_width)
        stream, offsets = stream_of(docs)
        stream_l = stream.tolist()
        # Counts of every substring of the query (and of tokens that never occur).
        for i in range(len(query)):
            for j in range(i + 1, min(len(query), i + 6) + 1):
                assert idx.count(query[i:j]) == len(occurs_at(stream_l, query[i:j]))
        assert idx.longest_matches(query) == brute_longest(stream_l, query)
        assert idx.maximal_spans(query, min_tokens) == brute_maximal(stream_l, query, min_tokens)
        # Each span's occurrences and documents equal a scan; no occurrence leaves its document.
        for span in idx.trace_ids(query, min_tokens=min_tokens, max_docs=100):
            q = query[span["token_start"]:span["token_end"]]
            where = occurs_at(stream_l, q)
            assert span["occurrences"] == len(where)
            doc_of = [int(np.searchsorted(offsets, p, side="right") - 1) for p in where]
            assert span["document_count"] == len(set(doc_of))
            for doc, n, pos in span["documents"]:
                assert n == doc_of.count(doc) and pos == min(p for p, d in zip(where, doc_of) if d == doc)
                a, b = idx.doc_span(doc)
                assert a <= pos and pos + len(q) <= b


def build_sharded_synthetic(folder: Path, docs: list[list[int]], shards: int) -> ShardedTraceIndex:
    """The same stream as build_synthetic, in document-aligned shards."""
    tokens, offsets = stream_of(docs)
    rows = [{"id": f"doc{i}", "source": f"synthetic://{i}", "license": "CC0-1.0", "sha256": f"{i:064x}"}
            for i in range(len(docs))]
    bounds = shard_bounds(offsets, shards)
    built = []
    for k in range(len(bounds) - 1):
        a, b = int(offsets[bounds[k]]), int(offsets[bounds[k + 1]])
        built.append(build_index_arrays(tokens[a:b], offsets[bounds[k]:bounds[k + 1] + 1] - a,
                                        rows[bounds[k]:bounds[k + 1]], folder / f"shard-{k:03d}", eot_id=EOT,
                                        extra={"first_token": a, "first_document": bounds[k]}))
    write_sharded_index(folder, built, eot_id=EOT, tokenizer_sha256=None)
    index = open_index(folder)
    assert isinstance(index, ShardedTraceIndex) and len(index.shards) == len(bounds) - 1
    return index


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=16), min_size=2, max_size=10),
       queries=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=14), min_size=1, max_size=4),
       shards=st.integers(2, 5), min_tokens=st.integers(1, 3))
def test_a_sharded_index_answers_as_one_index(docs, queries, shards, min_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        one = build_synthetic(Path(tmp) / "one", docs)
        many = build_sharded_synthetic(Path(tmp) / "many", docs, shards)
        assert (many.n, many.n_docs) == (one.n, one.n_docs)
        queries = queries + [docs[len(docs) // 2][1:] + [1, 2]]  # a span that runs into another document's text
        for q in queries:
            assert many.longest_matches(q) == one.longest_matches(q)
            assert many.trace_ids(q, min_tokens=min_tokens, max_docs=3) == one.trace_ids(q, min_tokens, max_docs=3)
        for d in range(one.n_docs):
            assert many.document(d) == one.document(d) and many.doc_span(d) == one.doc_span(d)
            a, b = one.doc_span(d)
            assert many.token_slice(a, b).tolist() == one.token_slice(a, b).tolist()


def test_a_changed_shard_is_refused(tmp_path):
    build_sharded_synthetic(tmp_path / "many", [[1, 2, 3], [2, 3, 4], [3, 4, 1]], 3)
    index = json.loads((tmp_path / "many" / "shard-001" / "index.json").read_text())
    index["documents_note"] = "edited"
    (tmp_path / "many" / "shard-001" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="shard-001/index.json: missing, or not the shard index"):
        open_index(tmp_path / "many")


def test_spans_ranked_long_then_rare(tmp_path):
    docs = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [7, 8, 9], [10, 11, 12]]
    idx = build_synthetic(tmp_path / "t", docs)
    spans = idx.trace_ids([10, 11, 12, 0, 7, 8, 9, 0, 1, 2, 3, 4, 5], min_tokens=3)
    assert [(s["tokens"], s["occurrences"]) for s in spans] == [(5, 1), (3, 1), (3, 2)]
    assert spans[2]["document_count"] == 2


# ------------------------------------------------------------------------------------------ real run


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """Data, tokenizer and shards of a small stdlib recipe, and a release folder holding its trace index."""
    from glassforge.core.files import atomic_write_text
    from glassforge.core.recipe import dump_recipe, load_recipe
    from glassforge.core.runfolder import Run
    from glassforge.data.stage import run_data
    from glassforge.tokenizer.bpe import run_tokenizer
    from glassforge.tokenizer.shards import run_shards

    root = tmp_path_factory.mktemp("trace_run")
    (root / "recipe.toml").write_text(RECIPE)
    run = Run.create(root / "run")
    atomic_write_text(run.recipe, dump_recipe(load_recipe(root / "recipe.toml")))
    run_data(run)
    run_tokenizer(run)
    run_shards(run)
    rel = run.release
    rel.mkdir()
    for name in ("config.json", "model.safetensors"):  # enough for resolve_release
        (rel / name).write_text("{}")
    shutil.copyfile(run.tokenizer / "tokenizer.json", rel / "tokenizer.json")
    info = build_index(run, rel / "trace")
    assert info["documents"] == len(json.loads((run.data / "shards.json").read_text())["train"]["documents"])
    return rel


def _train_docs(release: Path) -> list[dict]:
    from glassforge.core.runfolder import Run
    from glassforge.data.documents import iter_documents

    return list(iter_documents(Run(release.parent), "train"))


def test_a_sharded_release_index_built_by_processes_traces_as_the_single_one(release, tmp_path):
    from glassforge.data.executor import ProcessExecutor

    other = tmp_path / "release"
    other.mkdir()
    shutil.copyfile(release / "tokenizer.json", other / "tokenizer.json")
    with ProcessExecutor(2) as executor:
        info = build_index(Run(release.parent), other / "trace", shards=3, executor=executor)
    assert info["format"] == "glassforge-trace-sharded/1" and len(info["shards"]) == 3
    assert sum(s["documents"] for s in info["shards"]) == info["documents"]
    one, many = Tracer(release / "trace"), Tracer(other / "trace")
    docs = _train_docs(release)
    texts = [docs[i]["text"][:300] for i in (0, len(docs) // 3, len(docs) // 2, -1)]
    texts += [docs[1]["text"][-80:] + " " + docs[2]["text"][:80], "Return the number of items in the sequence."]
    for k, text in enumerate(texts):
        a, b = one.trace(text, min_tokens=4), many.trace(text, min_tokens=4)
        a.pop("elapsed_ms"), b.pop("elapsed_ms")
        assert a == b and (a["spans"] or k == len(texts) - 1)
        a, b = one.contains(text[:40]), many.contains(text[:40])
        a.pop("elapsed_ms"), b.pop("elapsed_ms")
        assert a == b


def test_copied_passage_traced_to_its_document(release):
    tracer = Tracer(release / "trace")
    docs = _train_docs(release)
    doc = max(docs, key=lambda d: len(d["text"]))
    passage = doc["text"][len(doc["text"]) // 3:][:600]
    result = tracer.trace(passage, min_tokens=8)
    assert result["spans"], "a copied passage must match"
    top = result["spans"][0]
    assert top["tokens"] >= 0.8 * result["tokens"]
    assert top["text"] == passage[top["start"]:top["end"]]
    assert top["text"] in doc["text"]
    manifest = {e["id"]: e for e in iter_manifest_entries(Run(release.parent))}
    ids = [d["id"] for d in top["documents"]]
    assert doc["id"] in ids
    hit = top["documents"][ids.index(doc["id"])]
    assert hit["sha256"] == manifest[doc["id"]]["sha256"]
    assert hit["license"] == "PSF-2.0" and hit["source"] == manifest[doc["id"]]["source"]
    before, match, after = hit["snippet_parts"]
    assert "«" + match + "»" in hit["snippet"]
    assert match.strip() and match.strip() in top["text"]
    json.dumps(result)  # JSON-ready


def test_unseen_sentence_gives_no_span(release):
    tracer = Tracer(release / "trace")
    text = "Purple giraffes negotiated fiercely over seventeen marmalade satellites orbiting Neptune yesterday."
    result = tracer.trace(text, min_tokens=8)
    assert result["spans"] == [] and result["covered_tokens"] == 0
    assert tracer.contains(text)["count"] == 0


def test_contains_counts_whole_occurrences(release):
    tracer = Tracer(release / "trace")
    docs = _train_docs(release)
    phrase = "Return a"
    expected_docs = {d["id"] for d in docs if phrase in d["text"]}
    result = tracer.contains(phrase)
    assert result["count"] >= 1
    # Token-level matching finds a subset of the substring hits, never a document without the text.
    assert {d["id"] for d in result["documents"]} <= expected_docs
    assert result["document_count"] <= len(expected_docs)
    raw = sum(d["text"].count(phrase) for d in docs)
    assert result["count"] <= raw


def test_cli_trace_and_contains(release, capsys):
    from glassforge.cli import main

    doc = max(_train_docs(release), key=lambda d: len(d["text"]))
    passage = doc["text"][:300]
    assert main(["trace", str(release.parent), passage, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(doc["id"] in [d["id"] for d in s["documents"]] for s in out["spans"])
    assert main(["trace", str(release), "Purple giraffes negotiated over marmalade satellites", "--min-tokens", "4"]) == 0
    assert "No span of 4 or more tokens" in capsys.readouterr().out
    assert main(["contains", str(release), passage[:80].rsplit(" ", 1)[0]]) == 0  # whole words
    assert "Found" in capsys.readouterr().out
    assert main(["contains", str(release), "Purple giraffes negotiated over marmalade"]) == 1
    assert "Not found" in capsys.readouterr().out


def test_cli_without_index_is_a_user_error(tmp_path, release, capsys):
    from glassforge.cli import main

    bare = tmp_path / "release"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(release / name, bare / name)
    assert main(["trace", str(bare), "hello"]) == 2
    assert "no trace index" in capsys.readouterr().err


def test_tracer_refuses_another_tokenizer(tmp_path, release):
    other = tmp_path / "release"
    shutil.copytree(release / "trace", other / "trace")
    tok = json.loads((release / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|eot|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="another tokenizer"):
        Tracer(other / "trace")


def test_frequent_span_counts_stay_exact_when_documents_are_sampled(tmp_path, monkeypatch):
    import glassforge.release.trace_search as trace_mod

    idx = build_synthetic(tmp_path / "t", [[1, 2, 3, 1, 2, 3]] + [[1, 2, 3]] * 5)
    monkeypatch.setattr(trace_mod, "DOC_SCAN_LIMIT", 3)
    (span,) = idx.trace_ids([1, 2, 3], min_tokens=3, max_docs=10)
    assert span["occurrences"] == 7 and not span["documents_exact"] and span["document_count"] <= 3


def test_empty_text(release):
    tracer = Tracer(release / "trace")
    result = tracer.trace("")
    assert result["tokens"] == 0 and result["spans"] == []
    with pytest.raises(UserError):
        tracer.contains("")
