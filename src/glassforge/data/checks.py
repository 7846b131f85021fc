"""`glassforge verify --data`'s first half: a run's documents against its own data manifest.

Every kept document's sha256 is recomputed from its text, the Merkle roots of
the training order from those digests, and the order file's and the shards'
hashes are compared with what the manifest and shards.json recorded.
"""

from __future__ import annotations

import hashlib
import json

from glassforge.core.errors import UserError
from glassforge.core.hashing import sha256_file
from glassforge.core.manifest import iter_manifest_entries, read_manifest_head
from glassforge.core.merkle import order_roots
from glassforge.core.runfolder import Run
from glassforge.data.documents import iter_documents


def verify_data(run: Run) -> list[tuple[str, bool, str]]:
    """Recompute every kept document's hash and the Merkle roots from documents.jsonl; compare to the manifest."""
    checks: list[tuple[str, bool, str]] = []
    try:
        head = read_manifest_head(run)
    except UserError as e:
        return [("manifest", False, str(e))]
    entries = head.get("entries") or {}
    got_entries = sha256_file(run.manifest_entries) if run.manifest_entries.is_file() else None
    if got_entries != entries.get("sha256"):
        return [("manifest", False, f"{run.manifest_entries} does not hash to the sha256 its head "
                                    f"{run.data_manifest.name} records")]
    want: dict[str, str] = {}
    source_of: dict[str, str] = {}
    for d in iter_manifest_entries(run):
        if d.get("status") == "kept":
            want[d["id"]] = d["sha256"]
            source_of[d["id"]] = d["source_name"]
    got: dict[str, bytes] = {}
    bad: list[str] = []
    try:
        for doc in iter_documents(run):
            digest = hashlib.sha256(doc["text"].encode("utf-8")).digest()
            got[doc["id"]] = digest
            if want.get(doc["id"]) != digest.hex():
                bad.append(doc["id"])
    except (OSError, json.JSONDecodeError, KeyError) as e:
        return checks + [("documents", False, f"{run.documents}: {e}")]
    missing = sorted(set(want) - set(got))
    if bad or missing:
        what = (f"{bad[0]} does not hash to its manifest entry" if bad
                else f"{missing[0]} is missing from documents.jsonl")
        n = len(bad) + len(missing)
        checks.append(("document hashes", False, what + (f" ({n - 1} more)" if n > 1 else "")))
    else:
        checks.append(("document hashes", True, f"all {len(got)} kept documents hash to their manifest entries"))
    order_path = run.order
    if not order_path.is_file():
        return checks + [("order", False, f"{order_path} is missing")]
    order_sha = sha256_file(order_path)
    checks.append(("order", order_sha == head.get("order_sha256"),
                   f"order.txt sha256 {order_sha[:16]}... " + ("matches the manifest" if order_sha == head.get(
                       "order_sha256") else f"but the manifest says {str(head.get('order_sha256'))[:16]}...")))
    order = order_path.read_text(encoding="utf-8").splitlines()
    unknown = [d for d in order if d not in got]
    if unknown:
        return checks + [("merkle roots", False, f"order.txt names {unknown[0]}, not a kept document")]
    names = list((head.get("merkle") or {}).get("sources", {}))
    roots = order_roots(order, got, source_of, names or sorted(set(source_of.values())))
    merkle = head.get("merkle") or {}
    checks.append(("mix merkle root", roots["mix"] == merkle.get("mix"),
                   f"recomputed {roots['mix'][:16]}... " + ("matches" if roots["mix"] == merkle.get("mix")
                                                             else f"!= manifest {str(merkle.get('mix'))[:16]}...")))
    for name, root in roots["sources"].items():
        ok = root == merkle.get("sources", {}).get(name)
        checks.append((f"merkle root of source {name}", ok, f"recomputed {root[:16]}... " +
                       ("matches" if ok else "differs from the manifest")))
    shards = run.shards
    if shards.is_file():
        info = json.loads(shards.read_text())
        ok = info.get("order_sha256") == order_sha
        checks.append(("shards order", ok, "shards.json was built from this order.txt" if ok
                       else "shards.json names another order.txt; run the shards stage again"))
        tok = run.tokenizer_json
        if tok.is_file():
            ok = info.get("tokenizer_sha256") == sha256_file(tok)
            checks.append(("shards tokenizer", ok, "shards.json was tokenized with tokenizer/tokenizer.json" if ok
                           else "shards.json names another tokenizer; run the shards stage again"))
    return checks

