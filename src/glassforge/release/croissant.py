"""croissant.json: the release's training data described in MLCommons Croissant 1.1, with the RAI extension.

Croissant is what dataset tools already read: the Hugging Face Hub serves it
for every dataset it can convert to Parquet, NeurIPS Datasets & Benchmarks
checks it, and `mlcroissant` loads records from it. The file is built with
mlcroissant's own classes (`mlc.Metadata`, `FileObject`, `RecordSet`,
`Field`) and describes the data pack (datapack.py):

- a FileObject per pack file (documents.parquet, dropped.parquet, order.txt,
  the conversation files) with its sha256, which mlcroissant's loader checks
  before it reads a byte;
- a record set per table: `documents` (id, split, text, sha256, bytes, tokens,
  repeats, source, source_name, license), `dropped` (id, source, licence,
  sha256, reason, duplicate_of, similarity, contaminated_by, ...) and `order`
  (the training order, one id a line, with its position);
- the licences of the sources;
- the RAI fields from what the data stage recorded (the data manifest's
  summary and `data.card.data_summary`): how the data was collected, cleaned,
  filtered, deduplicated and decontaminated, each with its figures, and what
  was not checked.

`check_croissant` is `glassforge verify`'s claim: mlcroissant accepts the
file, and its file hashes are the pack's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from glassforge import __version__
from glassforge.core.files import atomic_write_text
from glassforge.core.hashing import sha256_file
from glassforge.core.manifest import read_manifest_head
from glassforge.core.runfolder import Release, Run
from glassforge.data.card import data_summary

Claim = tuple[str, bool, str]
CONFORMS_TO = ["http://mlcommons.org/croissant/1.1", "http://mlcommons.org/croissant/RAI/1.0"]
TEXT, INT, FLOAT = "TEXT", "INTEGER", "FLOAT"  # names of mlcroissant.DataType's schema.org types
DOCUMENT_FIELDS = [
    ("id", TEXT, "the document's content address: {source name}:{first 24 hex digits of "
                 "sha256(name, newline, sha256)}"),
    ("name", TEXT, "where the document is in its source: {source name}:{module.qualname or path[#record]}"),
    ("split", TEXT, "train or val, a function of the document's hash"),
    ("text", TEXT, "the cleaned UTF-8 text the tokenizer and the model read"),
    ("sha256", TEXT, "sha256 of the text's UTF-8 bytes: the document's Merkle leaf"),
    ("bytes", INT, "length of the text in UTF-8 bytes"),
    ("tokens", INT, "length of the text in tokens of the release's tokenizer"),
    ("repeats", INT, "how many times the training order lists it (0 for validation documents)"),
    ("source", TEXT, "URI of the document in its source"),
    ("source_name", TEXT, "the recipe's name of its source"),
    ("license", TEXT, "the licence of its source"),
]
DROPPED_FIELDS = [
    ("id", TEXT, "the document's content address"),
    ("name", TEXT, "where the document is in its source"),
    ("source", TEXT, "URI of the document in its source"),
    ("source_name", TEXT, "the recipe's name of its source"),
    ("license", TEXT, "the licence of its source"),
    ("sha256", TEXT, "sha256 of the cleaned text (none where there was no text)"),
    ("bytes", INT, "length of the cleaned text in UTF-8 bytes"),
    ("reason", TEXT, "why it was dropped (see rai:dataPreprocessingProtocol)"),
    ("duplicate_of", TEXT, "the lowest id of its duplicate group (exact or near duplicates)"),
    ("similarity", FLOAT, "estimated Jaccard similarity to duplicate_of (near duplicates)"),
    ("contaminated_by", TEXT, "the evaluation sets it shares an n-gram with (contaminated)"),
    ("detail", TEXT, "more about the reason, where there is more"),
]
KIND_TYPE = {"pystdlib": "Software documentation extracted from source code", "files": "Existing text files",
             "hf": "Existing dataset (Hugging Face)"}
KIND_COLLECTION = {
    "pystdlib": "docstrings of the Python standard library's modules, read from the source files of the Python "
                "that built the run (the corpus differs between Python versions)",
    "files": "files read from a local path: .txt/.md/.rst one document each, .jsonl/.json/.parquet one per record",
    "hf": "a Hugging Face dataset, streamed",
}


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "n/a" if x is None else str(x)


def _fields(mlc, record_set: str, file_id: str, spec: list[tuple]) -> list:
    return [mlc.Field(id=f"{record_set}/{name}", name=name, description=desc, data_types=[getattr(mlc.DataType, dtype)],
                      repeated=name == "contaminated_by" or None,
                      source=mlc.Source(file_object=file_id, extract=mlc.Extract(column=name)))
            for name, dtype, desc in spec]


def _file(mlc, release: Release, path: Path, fmt: str, description: str):
    rel = path.relative_to(release.root).as_posix()
    return mlc.FileObject(id=rel, name=path.name, description=description, content_url=rel,
                          content_size=f"{path.stat().st_size} B", encoding_formats=[fmt], sha256=sha256_file(path))


# --------------------------------------------------------------------------- the RAI fields


def _collection(recipe, d: dict) -> str:
    parts = []
    for src, s in zip(recipe.data.sources, d["sources"]):
        where = {"pystdlib": f"modules {', '.join(src.modules)}" if src.modules else "every module",
                 "files": f"path {src.path}", "hf": f"dataset {src.path}, split {src.split}"}.get(src.kind, src.path)
        parts.append(f"`{src.name}` ({src.kind}: {KIND_COLLECTION.get(src.kind, src.kind)}; {where}; licence "
                     f"{src.license}; weight {src.weight:g}): {_n(s['seen'])} documents seen, {_n(s['kept'])} kept")
    return (f"{_n(d['documents_seen'])} documents ({_n(d['bytes_seen'])} bytes) read by the glassforge data stage "
            f"from the {len(parts)} source(s) of recipe `{recipe.name}`: " + "; ".join(parts) + ".")


def _preprocessing(recipe, head: dict, d: dict) -> list[str]:
    cfg, summary = recipe.data, head["summary"]
    dropped, reasons = d["dropped"], head.get("reasons") or {}
    dedup, decon = summary.get("dedup") or {}, summary.get("decontamination") or {}
    near = dedup.get("near_dedup") or {}
    read = {k: v for k, v in dropped.items() if k not in ("too_short", "too_long", "non_text", "repeated_lines",
                                                          "exact_duplicate", "near_duplicate", "contaminated")}
    steps = [
        "Reading: an item that could not become text is recorded with its reason, never skipped silently: "
        + (", ".join(f"{k} {_n(v)} ({reasons.get(k, '')})" for k, v in sorted(read.items())) or "none") + ".",
        "Cleaning (glassforge.data.clean.normalize): Unicode NFC, line ends to \\n, control characters removed, "
        "exotic spaces to spaces, tabs to four spaces, no trailing spaces, at most one blank line in a row. "
        "A document's sha256 is that of its cleaned UTF-8 text.",
        f"Filtering: dropped when shorter than {cfg.min_chars} or longer than {cfg.max_chars} characters "
        f"(too_short {_n(dropped.get('too_short', 0))}, too_long {_n(dropped.get('too_long', 0))}), when the share "
        f"of non-text characters is above {cfg.max_non_text_fraction} (non_text {_n(dropped.get('non_text', 0))}), "
        f"when the share of repeated lines is above {cfg.max_repeated_line_fraction} (repeated_lines "
        f"{_n(dropped.get('repeated_lines', 0))}).",
        f"Exact deduplication by the sha256 of the cleaned text, the first in stage order kept: "
        f"{_n(dedup.get('exact_duplicates', 0))} dropped.",
        (f"Near-duplicate removal: {near.get('method')}; {near.get('shingle_words')}-word shingles, "
         f"{near.get('bands')} bands x {near.get('rows')} rows, estimated Jaccard >= {near.get('threshold')}: "
         f"{_n(dedup.get('near_duplicates', 0))} dropped"
         + (f", mean estimated similarity {near['mean_similarity_of_dropped']}" if
            near.get("mean_similarity_of_dropped") is not None else "") + "."
         if near.get("enabled") else "Near-duplicate removal: off (data.near_dedup = false)."),
        ("Decontamination: training documents sharing a " f"{decon.get('ngram')}-word n-gram with an evaluation set "
         "were dropped: " + "; ".join(f"{name}: {_n(s.get('items'))} items, {_n(s.get('documents_matched'))} "
                                      f"documents matched, {_n(s.get('documents_dropped'))} dropped"
                                      for name, s in decon["sets"].items()) + "."
         if decon.get("sets") else "Decontamination: none; no evaluation set was named in data.decontaminate."),
        f"Split by document hash (val_fraction {cfg.val_fraction}): {_n(d['train_documents'])} training and "
        f"{_n(d['val_documents'])} validation documents kept, {_n(d['bytes_kept'])} bytes.",
        f"Training order: {(summary.get('order') or {}).get('weights', '')}; {_n(d['order_entries'])} entries "
        f"shuffled with seed {head.get('seed')}, the order's sha256 {d['order_sha256']}, its RFC 6962 Merkle root "
        f"{d['merkle']['mix']} (inclusion proofs: glassforge prove).",
    ]
    return steps


def _mix(d: dict) -> list[str]:
    total = sum(s.get("train") or 0 for s in d["sources"]) or 1
    return ["The mix is only its sources: " + "; ".join(
        f"`{s['name']}` {(s.get('train') or 0) / total:.1%} of the training documents (weight {s['weight']:g}, "
        f"licence {s['license']})" for s in d["sources"]) + ". No other analysis of bias was run."]


# --------------------------------------------------------------------------- writing


def write_croissant(run: Run, release_dir: Path, pack: dict) -> Path:
    """croissant.json into a release folder whose data pack is written (pack: what write_pack returned)."""
    import mlcroissant as mlc

    rel = Release(release_dir)
    recipe, head, d = run.load_recipe(), read_manifest_head(run), data_summary(run)
    files = [_file(mlc, rel, rel.pack_documents, mlc.EncodingFormat.PARQUET,
                   "every kept document, in the data stage's order, with its text"),
             _file(mlc, rel, rel.pack_dropped, mlc.EncodingFormat.PARQUET,
                   "every dropped document with its reason (no text)"),
             _file(mlc, rel, rel.pack_order, mlc.EncodingFormat.TEXT,
                   "the training order: one document id a line, a document repeated by its weight")]
    files += [_file(mlc, rel, rel.root / spec["file"], mlc.EncodingFormat.JSON_LINES,
                    f"fine-tuning conversations (recipe sft.conversations {name})")
              for name, spec in sorted((pack.get("conversations") or {}).items())]
    doc_id, drop_id, order_id = (f.id for f in files[:3])
    record_sets = [
        mlc.RecordSet(id="documents", name="documents", key="documents/id", fields=_fields(
            mlc, "documents", doc_id, DOCUMENT_FIELDS), description="The kept documents: what the model read."),
        mlc.RecordSet(id="dropped", name="dropped", key="dropped/id", fields=_fields(
            mlc, "dropped", drop_id, DROPPED_FIELDS), description="The documents the data stage dropped, and why."),
        mlc.RecordSet(id="order", name="order", description="The training order (the Merkle tree's leaves).", fields=[
            mlc.Field(id="order/position", name="position", data_types=[mlc.DataType.INTEGER],
                      description="0-based leaf index",
                      source=mlc.Source(file_object=order_id,
                                        extract=mlc.Extract(file_property=mlc.FileProperty.lineNumbers))),
            mlc.Field(id="order/id", name="id", data_types=[mlc.DataType.TEXT], description="a documents/id",
                      source=mlc.Source(file_object=order_id,
                                        extract=mlc.Extract(file_property=mlc.FileProperty.lines)),
                      references=mlc.Source(field="documents/id"))]),
    ]
    licences = sorted({s.license for s in recipe.data.sources})
    name = f"glassforge-{recipe.name}-training-data"
    metadata = mlc.Metadata(
        name=name, conforms_to=CONFORMS_TO, version=__version__, license=licences, in_language=["en"],
        description=f"The training data of the glassforge model of recipe `{recipe.name}` ({recipe.description}), "
                    f"as it was trained on: {_n(d['documents_kept'])} kept documents, "
                    f"{_n(d['documents_seen'] - d['documents_kept'])} dropped ones with their reasons, and the "
                    f"training order.",
        cite_as=f"@misc{{{name}, title={{{name}}}, note={{training data Merkle root {d['merkle']['mix']}}}}}",
        keywords=["glassforge", "language model pretraining", "training data"],
        distribution=files, record_sets=record_sets,
        data_collection=_collection(recipe, d),
        data_collection_type=sorted({KIND_TYPE.get(s.kind, s.kind) for s in recipe.data.sources}),
        data_collection_raw_data="The sources named in data_collection; this pack keeps every kept document's cleaned "
                                 "text and every dropped one's id, source URI, sha256 and reason.",
        data_preprocessing_protocol=_preprocessing(recipe, head, d),
        data_biases=_mix(d),
        data_limitations=[
            f"The model saw only these {_n(d['train_documents'])} training documents ({_n(d['order_entries'])} "
            "order entries); what they do not cover it does not know.",
            "Dropped documents ship without text: not what the model learned from, and a contaminated document "
            "holds evaluation-set text that republishing would leak; an exact duplicate's text is the kept "
            "document it names."],
        personal_sensitive_information=["Not checked: the data stage runs no detector of personal or sensitive "
                                        "information; the licences are the sources' as the recipe states them."],
        data_use_cases=[f"Training and validating the glassforge model of recipe `{recipe.name}`, and checking its "
                        "attestation: the documents' hashes give the attested Merkle roots."],
    )
    if metadata.ctx.issues.errors:
        raise RuntimeError(f"croissant.json would not validate: {metadata.ctx.issues.report()}")
    atomic_write_text(rel.croissant, json.dumps(metadata.to_json(), indent=1, ensure_ascii=False) + "\n")
    return rel.croissant


# --------------------------------------------------------------------------- checking


@contextlib.contextmanager
def _quiet():
    """mlcroissant logs its warnings (a missing recommended property) through absl: not ours to print."""
    logger = logging.getLogger("absl")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def load_croissant(release: Path):
    """The release's croissant.json as an `mlcroissant.Dataset` (its records read offline from the pack)."""
    import mlcroissant as mlc

    with _quiet():
        return mlc.Dataset(jsonld=Release(release).croissant)


def check_croissant(release: Path, attested_pack: dict) -> list[Claim]:
    """croissant.json is there, mlcroissant accepts it, and it describes this release's data pack."""
    rel = Release(release)
    if not rel.croissant.is_file():
        return [("croissant", False, f"{rel.croissant.name} is missing")]
    try:
        ds = load_croissant(release)
    except Exception as e:  # noqa: BLE001 - mlcroissant reports a bad file as ValidationError, ValueError, ...
        return [("croissant", False, f"mlcroissant rejects {rel.croissant.name} ({type(e).__name__}: "
                                     f"{(str(e).strip().splitlines() or [''])[-1][:300]})")]
    md = ds.metadata
    claims: list[Claim] = [("croissant", True, f"{rel.croissant.name} is valid Croissant for mlcroissant "
                            f"({', '.join(md.conforms_to)}), record sets {', '.join(r.name for r in md.record_sets)}")]
    described = {f.content_url: f.sha256 for f in md.distribution}
    want = [rel.pack_documents, rel.pack_dropped, rel.pack_order] + [
        rel.root / spec["file"] for spec in (attested_pack.get("conversations") or {}).values()]
    bad = []
    for path in want:
        name = path.relative_to(rel.root).as_posix()
        if name not in described:
            bad.append(f"{name} is not described")
        elif not path.is_file():
            bad.append(f"{name} is missing")
        elif described[name] != sha256_file(path):
            bad.append(f"{name} is not the file described (sha256 {sha256_file(path)[:12]}... but croissant.json says "
                       f"{str(described[name])[:12]}...)")
    attested = {spec.get("file"): spec.get("sha256") for key in ("documents", "dropped", "order")
                if (spec := attested_pack.get(key))}
    bad += [f"{name} is described with sha256 {str(described.get(name))[:12]}... but the attestation binds "
            f"{str(sha)[:12]}..." for name, sha in attested.items() if described.get(name) != sha and name in described]
    missing_sets = {"documents", "dropped", "order"} - {r.name for r in md.record_sets}
    if missing_sets:
        bad.append(f"no record set {', '.join(sorted(missing_sets))}")
    claims.append(("croissant data", not bad, "describes the release's data pack: " + ", ".join(
        p.relative_to(rel.root).as_posix() for p in want) + ", by sha256" if not bad else bad[0]))
    return claims
