"""Inclusion proofs: one document was in the training data, shown with about log2(n) hashes instead of all n leaves.

The attestation binds the RFC 6962 Merkle roots of the training order (the
mix, and each source's subsequence; core/merkle.py). `glassforge prove
RELEASE --doc ID` writes an inclusion proof in RFC 9162's shape (section
2.1.3): for each tree, its root, `tree_size`, `leaf_index` (0-based) and
`inclusion_path` (the audit path as hex, bottom first). The leaf is
sha256(0x00 || sha256(text)), the document's text as cleaned UTF-8 bytes. A
document that its weight lists several times in data/order.txt is several
leaves; the proof is for its first, and says how many there are.

`glassforge verify-proof PROOF --release RELEASE` checks a proof offline
against the release's attested roots and the document's text from its data
pack; `--root HASH --text FILE` checks it against a root one trusts (from a
signed attestation, say) and a text one holds, with no release at all. The
verdict is RFC 9162's algorithm (2.1.3.2) run over the hashes: the text must
hash to the leaf, and the path must lead from the leaf to the root.

What a proof cannot show: that a document was *not* trained on. Absence is a
lookup in the data pack (documents.parquet lists every kept document,
dropped.parquet every dropped one with its reason), whose hashes give the
attested roots; the tree is in training order, not sorted, so it has no
proof of absence.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_text
from glassforge.core.merkle import inclusion_path, root_from_path
from glassforge.core.runfolder import Release, resolve_release

Claim = tuple[str, bool, str]
FORMAT = "glassforge-inclusion-proof/1"
SPEC = ("RFC 9162 section 2.1.3 inclusion proof over the RFC 6962 Merkle tree hash with SHA-256: leaf = "
        "sha256(0x00 || sha256(text as UTF-8)), node = sha256(0x01 || left || right); leaf_index is 0-based, "
        "inclusion_path is bottom first")
HEX64 = re.compile(r"[0-9a-f]{64}")


def _read_columns(path: Path, columns: list[str], doc_id: str | None = None) -> dict[str, list]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path}: missing from the release's data pack")
    try:
        table = pq.read_table(path, columns=columns, filters=[("id", "==", doc_id)] if doc_id is not None else None)
    except Exception as e:  # noqa: BLE001 - pyarrow reports a damaged or foreign file as several exception types
        raise UserError(f"{path}: not a readable data pack file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    return table.to_pydict()


def _attested_data(release: Path) -> dict:
    try:
        stmt = json.loads(Release(release).attestation.read_text(encoding="utf-8"))
        data = stmt["predicate"]["data"]
        roots = {"mix": data["mix_merkle_root"], "sources": dict(data.get("source_merkle_roots") or {})}
        return {"roots": roots, "weights_sha256": stmt["subject"][0]["digest"]["sha256"]}
    except FileNotFoundError:
        raise UserError(f"{release}: no {Release(release).attestation.name}: there is no attested root to prove "
                        f"against") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise UserError(f"{Release(release).attestation}: no attested Merkle roots ({type(e).__name__}: {e})") \
            from None


# --------------------------------------------------------------------------- making a proof


def build_proof(doc_id: str, order: list[str], digest_of: dict[str, bytes], source_of: dict[str, str],
                roots: dict) -> dict:
    """The proof of doc_id's first leaf in the mix and in its source's tree (pure: the tests call it directly).

    roots: the attested {"mix": hex, "sources": {name: hex}}; a tree the leaves do not rebuild is refused.
    """
    positions = [i for i, d in enumerate(order) if d == doc_id]
    if not positions:
        raise UserError(f"--doc {doc_id}: not in the training order")
    source = source_of[doc_id]
    source_order = [d for d in order if source_of[d] == source]
    trees = {}
    for tree, leaves_ids, root in (("mix", order, roots.get("mix")),
                                   ("source", source_order, (roots.get("sources") or {}).get(source))):
        leaves = [digest_of[d] for d in leaves_ids]
        index = leaves_ids.index(doc_id)
        path = inclusion_path(leaves, index)
        got = root_from_path(digest_of[doc_id], index, len(leaves), path)
        if got is None or got.hex() != root:
            raise UserError(f"the data pack's documents do not rebuild the attested {tree} Merkle root "
                            f"{str(root)[:16]}...; `glassforge verify RELEASE --data` says what differs")
        trees[tree] = {**({"name": source} if tree == "source" else {}), "root": root, "tree_size": len(leaves),
                       "leaf_index": index, "inclusion_path": [h.hex() for h in path]}
    note = "listed once in the training order" if len(positions) == 1 else (
        f"listed {len(positions)} times in the training order (its weight repeats it), at mix leaves "
        f"{', '.join(map(str, positions[:20]))}{', ...' if len(positions) > 20 else ''}; this proves the first "
        f"occurrence, which is enough to show it was trained on")
    return {"format": FORMAT, "spec": SPEC,
            "document": {"id": doc_id, "sha256": digest_of[doc_id].hex(), "source_name": source},
            "occurrences": len(positions), "note": note, "trees": trees}


def prove(release: Path, doc_id: str) -> dict:
    """The inclusion proof of one document of a release, against the release's attested roots."""
    release = resolve_release(release)
    rel = Release(release)
    attested = _attested_data(release)
    cols = _read_columns(rel.pack_documents, ["id", "sha256", "source_name", "split"])
    if doc_id not in set(cols["id"]):
        dropped = _read_columns(rel.pack_dropped, ["id", "reason"], doc_id)
        if dropped["id"]:
            raise UserError(f"--doc {doc_id}: dropped by the data stage ({dropped['reason'][0]}; "
                            f"{rel.pack_dropped.name} lists it), so it is not in the training data: nothing to prove")
        raise UserError(f"--doc {doc_id}: no such document in {release}'s data pack ({len(cols['id']):,} kept "
                        f"documents in {rel.pack_documents.name}, the dropped ones in {rel.pack_dropped.name})")
    split = cols["split"][cols["id"].index(doc_id)]
    if split != "train":
        kind = "validation" if split == "val" else split
        raise UserError(f"--doc {doc_id}: a {kind} document: kept for evaluation, never in the training order, "
                        f"so it is in no training tree")
    if not rel.pack_order.is_file():
        raise UserError(f"{rel.pack_order}: missing from the release's data pack")
    order = rel.pack_order.read_text(encoding="utf-8").splitlines()
    digest_of = {i: bytes.fromhex(h) for i, h in zip(cols["id"], cols["sha256"])}
    source_of = dict(zip(cols["id"], cols["source_name"]))
    stray = next((d for d in order if d not in digest_of), None)
    if stray is not None:
        raise UserError(f"{rel.pack_order}: names {stray}, which {rel.pack_documents.name} does not hold")
    proof = build_proof(doc_id, order, digest_of, source_of, attested["roots"])
    return {**proof, "release": {"weights_sha256": attested["weights_sha256"]}}


def prove_command(release: Path, doc_id: str, out: Path | None) -> int:
    text = json.dumps(prove(release, doc_id), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- checking one


def _field(obj, key: str, where: str, kind, check=None, what: str = ""):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) or (check is not None and not check(value)):
        raise UserError(f"{where}.{key}: {value!r} is not {what or kind.__name__}")
    return value


def parse_proof(data: str, name: str) -> dict:
    """The proof's fields, checked for shape; a UserError naming the file and field when one is wrong."""
    try:
        proof = json.loads(data)
    except ValueError as e:
        raise UserError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(proof, dict) or proof.get("format") != FORMAT:
        raise UserError(f"{name}: not a glassforge inclusion proof (format "
                        f"{proof.get('format') if isinstance(proof, dict) else None!r}, expected {FORMAT})")
    doc = _field(proof, "document", name, dict, what="an object")
    _field(doc, "id", f"{name}: document", str, what="a document id")
    _field(doc, "sha256", f"{name}: document", str, HEX64.fullmatch, "64 lowercase hex digits")
    trees = _field(proof, "trees", name, dict, lambda t: t and set(t) <= {"mix", "source"}, "an object of mix, source")
    for tree, spec in trees.items():
        where = f"{name}: trees.{tree}"
        _field(spec, "root", where, str, HEX64.fullmatch, "64 lowercase hex digits")
        size = _field(spec, "tree_size", where, int, lambda n: n >= 1, "a tree size (at least 1)")
        _field(spec, "leaf_index", where, int, lambda i: 0 <= i < size, f"a leaf index below tree_size {size}")
        _field(spec, "inclusion_path", where, list, lambda p: all(isinstance(h, str) and HEX64.fullmatch(h) for h in p),
               "a list of 64-hex-digit hashes")
    return proof


def check_proof(proof: dict, text: bytes, trusted: dict[str, tuple[str, str]], text_from: str) -> list[Claim]:
    """Claims: the text is the proof's document, and each tree's path leads from it to the trusted root.
    trusted: tree name -> (root to check against, where it comes from: the release's attestation, or --root)."""
    digest = hashlib.sha256(text).digest()
    doc = proof["document"]
    ok = digest.hex() == doc["sha256"]
    hint = "" if ok or not text.endswith(b"\n") or hashlib.sha256(text[:-1]).hexdigest() != doc["sha256"] else \
        " (it matches without the final newline: give the text byte for byte)"
    claims: list[Claim] = [("document", ok, f"{text_from} hashes to sha256 {digest.hex()[:16]}..., the proof's "
                            f"document {doc['id']}" if ok else f"{text_from} hashes to sha256 {digest.hex()[:16]}... "
                            f"but the proof is for {doc['sha256'][:16]}... ({doc['id']}){hint}")]
    for tree, (root, root_from) in trusted.items():
        spec = proof["trees"][tree]
        label = "inclusion in the mix" if tree == "mix" else f"inclusion in source {spec.get('name', '?')}"
        got = root_from_path(digest, spec["leaf_index"], spec["tree_size"],
                             [bytes.fromhex(h) for h in spec["inclusion_path"]])
        where = f"leaf {spec['leaf_index']} of {spec['tree_size']:,}"
        if got is not None and got.hex() == root:
            claims.append((label, True, f"{where}: the {len(spec['inclusion_path'])}-hash audit path leads to "
                                        f"{root[:16]}..., {root_from} (RFC 9162 2.1.3.2)"))
        elif got is None:
            claims.append((label, False, f"{where}: an audit path of {len(spec['inclusion_path'])} hashes cannot be "
                                         f"one for that leaf and tree size"))
        else:
            claims.append((label, False, f"{where}: the audit path leads to {got.hex()[:16]}..., not {root[:16]}..., "
                                         f"{root_from}"))
    return claims


def _read_input(path: str, option: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option}{' ' if option else ''}{path}: no such file")
    return p.read_bytes()


def verify_proof_command(proof_path: str, release: Path | None, root: str | None, text_path: str | None) -> int:
    """Print each claim as PASS or FAIL; 0 if all pass, 1 if one fails, UserError (2) for bad input."""
    raw = _read_input(proof_path, "")
    try:
        proof = parse_proof(raw.decode("utf-8"), proof_path)
    except UnicodeDecodeError:
        raise UserError(f"{proof_path}: not UTF-8 text, so not a proof") from None
    doc = proof["document"]
    trees = proof["trees"]
    if root is not None:
        root = root.strip().lower()
        if not HEX64.fullmatch(root):
            raise UserError(f"--root {root}: not a sha256 Merkle root (64 hex digits)")
        if text_path is None:
            raise UserError("--root needs --text FILE: the document's text, byte for byte, to hash into its leaf")
        trusted = {t: (root, "the --root given") for t, spec in trees.items() if spec["root"] == root}
        if not trusted:
            have = ", ".join(f"{t} {spec['root'][:16]}..." for t, spec in trees.items())
            print(f"FAIL root: the proof's trees have roots {have}, not --root {root[:16]}...")
            print("verify-proof: 0 of 1 claims pass, 1 FAIL")
            return 1
    else:
        release = resolve_release(release)
        roots = _attested_data(release)["roots"]
        attested = f"the root {release}'s attestation binds (`glassforge verify` checks the attestation)"
        trusted = {"mix": (roots["mix"], attested)} if "mix" in trees else {}
        if "source" in trees:
            name = trees["source"].get("name")
            if name not in roots["sources"]:
                raise UserError(f"{proof_path}: trees.source.name {name!r} is not a source of {release} "
                                f"(its sources: {', '.join(roots['sources']) or 'none'})")
            trusted["source"] = (roots["sources"][name], attested)
    if text_path is not None:
        text, text_from = _read_input(text_path, "--text"), f"--text {text_path}"
    else:
        rel = Release(release)
        rows = _read_columns(rel.pack_documents, ["id", "text"], doc["id"])
        if not rows["id"]:
            raise UserError(f"{proof_path}: document {doc['id']} is not in {release}'s data pack, so there is no "
                            f"text to check; pass the text with --text FILE")
        text, text_from = rows["text"][0].encode("utf-8"), f"the text of {doc['id']} in {rel.pack_documents.name}"
    claims = check_proof(proof, text, trusted, text_from)
    for name, ok, reason in claims:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {reason}")
    failed = sum(not ok for _, ok, _ in claims)
    print(f"verify-proof: {len(claims) - failed} of {len(claims)} claims pass" + (f", {failed} FAIL" if failed else ""))
    return 1 if failed else 0
