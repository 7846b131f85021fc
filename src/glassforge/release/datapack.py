"""The data pack: the training documents themselves, inside the release, as Parquet with zstd.

A release's central claim is that its weights came from its data, and a
stranger can check that only holding the data. The embedded corpus cannot be
rebuilt elsewhere (the standard library's docstrings differ between Python
versions: 10,517 documents on 3.11.7, 10,036 on 3.12.1), so the release
carries what training read:

    data/documents.parquet   one row per kept document, in the data stage's order:
                             id, name, split, text, sha256, bytes, tokens, repeats,
                             source (URI), source_name, license
    data/dropped.parquet     one row per dropped document: id, name, source, source_name,
                             license, sha256, bytes, reason, duplicate_of,
                             similarity, contaminated_by, detail (no text)
    data/order.txt           the training order the data stage wrote
    data/conversations/      the fine-tuning conversation files the recipe names

Parquet because it is what data users already read: pyarrow, pandas, DuckDB,
`datasets.load_dataset("parquet", ...)`, the Hugging Face Hub's viewer; zstd
because it is the best ratio those readers all decode. Rows are written in
fixed batches, so the same documents give the same bytes.

A dropped document's text does not ship: it is not what the model learned
from; a document dropped as contaminated holds evaluation-set text, which
republishing would leak into the next corpus; unreadable and binary items
have no text; and an exact duplicate's text ships as the kept document it
names. Its id, source, sha256 and reason let anyone who holds the source check
the decision.

`check_pack` is `verify --data` from the release alone: every document's id
recomputed as the content address of its name and text, the order recomputed
from the ids and the seed, every document's hash
from its text, the Merkle roots from the order, the order's hash, the counts,
all against the attestation. `unpack` lays the documents out as a run folder's
data stage wrote them, for `verify --replay`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_text
from glassforge.core.hashing import copy_file, sha256_file
from glassforge.core.manifest import iter_manifest_entries
from glassforge.core.merkle import order_roots
from glassforge.core.runfolder import Release, Run
from glassforge.data.analyse import document_id
from glassforge.data.documents import iter_documents
from glassforge.data.stage import order_key

Claim = tuple[str, bool, str]
BATCH_ROWS = 2048  # rows per Parquet row group: fixed, so the bytes are a function of the documents


def _schemas():
    import pyarrow as pa

    kept = pa.schema([("id", pa.string()), ("name", pa.string()), ("split", pa.string()), ("text", pa.large_string()),
                      ("sha256", pa.string()), ("bytes", pa.int64()), ("tokens", pa.int64()),
                      ("repeats", pa.int64()), ("source", pa.string()), ("source_name", pa.string()),
                      ("license", pa.string())])
    dropped = pa.schema([("id", pa.string()), ("name", pa.string()), ("source", pa.string()), ("source_name", pa.string()),
                         ("license", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                         ("reason", pa.string()), ("duplicate_of", pa.string()), ("similarity", pa.float64()),
                         ("contaminated_by", pa.list_(pa.string())), ("detail", pa.string())])
    return kept, dropped


def _write_batches(path: Path, schema, rows: Iterator[dict]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = 0
    with AtomicFile(path) as f:
        writer = pq.ParquetWriter(f, schema, compression="zstd")
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or not count:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
        writer.close()
    return count


def _kept_rows(run: Run) -> Iterator[dict]:
    """Kept manifest entries joined with their text (both files list kept documents in the same order)."""
    texts = iter_documents(run)
    for entry in iter_manifest_entries(run):
        if entry.get("status") != "kept":
            continue
        doc = next(texts, None)
        if doc is None or doc["id"] != entry["id"]:
            raise UserError(f"{run.documents}: does not list the manifest's kept documents in its order "
                            f"(at {entry['id']}); run `glassforge data {run.root}` again")
        yield {"id": entry["id"], "name": entry.get("name"), "split": entry["split"], "text": doc["text"], "sha256": entry["sha256"],
               "bytes": entry["bytes"], "tokens": entry.get("tokens"), "repeats": entry.get("repeats"),
               "source": entry["source"], "source_name": entry["source_name"], "license": entry["license"]}


def _dropped_rows(run: Run) -> Iterator[dict]:
    for entry in iter_manifest_entries(run):
        if entry.get("status") == "kept":
            continue
        hits = entry.get("contaminated_by")
        yield {"id": entry["id"], "name": entry.get("name"), "source": entry["source"],
               "source_name": entry["source_name"],
               "license": entry["license"], "sha256": entry.get("sha256"), "bytes": entry.get("bytes"),
               "reason": entry.get("reason"), "duplicate_of": entry.get("duplicate_of"),
               "similarity": entry.get("similarity"), "contaminated_by": list(hits) if hits else None,
               "detail": entry.get("detail") or None}


def conversation_files(run: Run) -> dict[str, Path]:
    """The recipe's sft.conversations that are files (not built-in sets), by the name the recipe gives them."""
    recipe = run.load_recipe()
    if not recipe.sft.enabled:
        return {}
    return {name: Path(name) for name in recipe.sft.conversations if name.endswith(".jsonl")}


def write_pack(run: Run, release_dir: Path) -> dict:
    """Write the data pack into a release folder; return what the attestation binds of it."""
    out = Release(release_dir)
    out.data.mkdir(parents=True, exist_ok=True)
    kept_schema, dropped_schema = _schemas()
    kept = _write_batches(out.pack_documents, kept_schema, _kept_rows(run))
    dropped = _write_batches(out.pack_dropped, dropped_schema, _dropped_rows(run))
    copy_file(run.order, out.pack_order)
    conversations = {}
    for i, (name, path) in enumerate(sorted(conversation_files(run).items())):
        if not path.is_file():
            raise UserError(f"sft.conversations: {name}: no such file")
        dest = out.pack_conversations / f"{i:02d}-{path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        copy_file(path, dest)
        conversations[name] = {"file": dest.relative_to(out.root).as_posix(), "sha256": sha256_file(dest)}
    rel = lambda p: p.relative_to(out.root).as_posix()  # noqa: E731
    return {"documents": {"file": rel(out.pack_documents), "sha256": sha256_file(out.pack_documents), "rows": kept},
            "dropped": {"file": rel(out.pack_dropped), "sha256": sha256_file(out.pack_dropped), "rows": dropped},
            "order": {"file": rel(out.pack_order), "sha256": sha256_file(out.pack_order)},
            "conversations": conversations}


# --------------------------------------------------------------------------- reading it back


def _table_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    """Rows of a pack file, a batch at a time; UserError naming the file when it is not a readable pack file."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path.name}: missing from the release's data pack")
    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{path}: not a glassforge data pack file (no column {missing[0]!r})")
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow reports a damaged file as several exception types
        raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def check_pack(release: Path, attested: dict) -> list[Claim]:
    """The data pack against itself and the attestation's data section; one claim per check."""
    rel = Release(release)
    pack = attested.get("pack") or {}
    if not pack:
        return [("data pack", False, "the attestation binds no data pack (made by an older glassforge?)")]
    claims: list[Claim] = []
    digest_of: dict[str, bytes] = {}
    source_of: dict[str, str] = {}
    split_of: dict[str, str] = {}
    bad: list[str] = []
    misnamed: list[str] = []
    repeats: dict[str, int] = {}
    try:
        for row in _table_rows(rel.pack_documents, ["id", "name", "split", "text", "sha256", "bytes", "source_name",
                                                     "repeats"]):
            data = row["text"].encode("utf-8")
            digest = hashlib.sha256(data).digest()
            if digest.hex() != row["sha256"] or len(data) != row["bytes"]:
                bad.append(row["id"])
            if document_id(row["source_name"], row["name"] or "", digest.hex()) != row["id"]:
                misnamed.append(row["id"])
            if row["split"] == "train":
                repeats[row["id"]] = row["repeats"] or 0
            if row["id"] in digest_of:
                return [("data documents", False, f"{rel.pack_documents.name}: document {row['id']} is listed twice")]
            digest_of[row["id"]], source_of[row["id"]], split_of[row["id"]] = digest, row["source_name"], row["split"]
        dropped = [row["id"] for row in _table_rows(rel.pack_dropped, ["id", "reason"])]
    except UserError as e:
        return [("data pack", False, str(e))]
    if bad:
        claims.append(("data documents", False, f"document {bad[0]} in {rel.pack_documents.name}: its text does not "
                                                f"hash to its sha256" + (f" ({len(bad) - 1} more)" if len(bad) > 1
                                                                         else "")))
    else:
        claims.append(("data documents", True, f"all {len(digest_of):,} kept documents' texts hash to their sha256"))
    claims.append(("data ids", not misnamed, "every kept document's id is the content address of its name and text"
                   if not misnamed else f"document {misnamed[0]}: its id is not the address of its name and text"
                   + (f" ({len(misnamed) - 1} more)" if len(misnamed) > 1 else "")))
    counts_ok = len(digest_of) == (pack.get("documents") or {}).get("rows") and \
        len(dropped) == (pack.get("dropped") or {}).get("rows") and not set(dropped) & set(digest_of)
    claims.append(("data counts", counts_ok, f"{len(digest_of):,} kept and {len(dropped):,} dropped documents, as "
                   "attested, none both" if counts_ok else
                   f"{len(digest_of):,} kept and {len(dropped):,} dropped rows, but the attestation says "
                   f"{(pack.get('documents') or {}).get('rows')} and {(pack.get('dropped') or {}).get('rows')}"))
    if not rel.pack_order.is_file():
        return claims + [("data order", False, f"{rel.pack_order.name} is missing from the data pack")]
    order_sha = sha256_file(rel.pack_order)
    ok = order_sha == attested.get("order_sha256")
    claims.append(("data order", ok, "order.txt is the attested training order" if ok else
                   f"order.txt sha256 {order_sha[:12]}... but attested {str(attested.get('order_sha256'))[:12]}..."))
    order = rel.pack_order.read_text(encoding="utf-8").splitlines()
    seed = attested.get("seed")
    rule = [d for _, d in sorted((order_key(seed, d, k), d) for d, n in repeats.items() for k in range(n))]
    claims.append(("data order rule", rule == order, f"order.txt sorts the training documents by sha256(seed {seed}, "
                   "id, repeat), as the data stage does" if rule == order else
                   "order.txt is not the training documents sorted by sha256(seed, id, repeat)"))
    stray = next((d for d in order if split_of.get(d) != "train"), None)
    if stray is not None:
        return claims + [("data merkle root", False, f"order.txt names {stray}, not a kept training document")]
    names = list((attested.get("source_merkle_roots") or {}))
    roots = order_roots(order, digest_of, source_of, names or sorted(set(source_of.values())))
    ok = roots["mix"] == attested.get("mix_merkle_root")
    claims.append(("data merkle root", ok, f"recomputed from the documents' texts in training order: "
                   f"{roots['mix'][:16]}..., " + ("the attested root" if ok else
                                                  f"not the attested {str(attested.get('mix_merkle_root'))[:16]}...")))
    for name, root in roots["sources"].items():
        ok = root == (attested.get("source_merkle_roots") or {}).get(name)
        claims.append((f"data merkle root of source {name}", ok, "recomputed, the attested root" if ok
                       else "recomputed, differs from the attested root"))
    for name, spec in (pack.get("conversations") or {}).items():
        path = rel.root / spec["file"]
        ok = path.is_file() and sha256_file(path) == spec["sha256"]
        claims.append((f"data conversations {name}", ok, f"{spec['file']} is the attested file" if ok
                       else f"{spec['file']} is missing or not the attested file"))
    return claims


def pack_documents(release: Path) -> Iterator[dict]:
    """The kept documents of a release's pack ({id, split, text}), in the data stage's order."""
    yield from _table_rows(Release(release).pack_documents, ["id", "split", "text"])


def unpack(release: Path, run: Run) -> None:
    """The pack as the data stage's outputs in a (scratch) run folder: documents.jsonl and order.txt."""
    rel = Release(release)
    run.data.mkdir(parents=True, exist_ok=True)
    with AtomicFile(run.documents, "w") as f:
        for row in pack_documents(release):
            f.write(json.dumps({"id": row["id"], "split": row["split"], "text": row["text"]}, ensure_ascii=False,
                               separators=(",", ":")) + "\n")
    atomic_write_text(run.order, rel.pack_order.read_text(encoding="utf-8"))


def pack_conversation_files(release: Path, attested: dict) -> dict[str, Path]:
    """The recipe's conversation file names mapped to their copies in the release."""
    return {name: Release(release).root / spec["file"]
            for name, spec in ((attested.get("pack") or {}).get("conversations") or {}).items()}

