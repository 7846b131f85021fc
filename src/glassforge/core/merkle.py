"""Merkle trees over documents: one root commits to the whole training order.

The tree is RFC 6962's (Certificate Transparency): a leaf is sha256(0x00 ||
digest), an inner node sha256(0x01 || left || right), so a leaf can never pass
for an inner node. Leaves are the documents' 32-byte sha256 digests, in the
training order; a document listed twice (weight > 1) is two leaves.
"""

from __future__ import annotations

import hashlib


def merkle_root(leaves: list[bytes] | list[str]) -> str:
    """Root (hex) of the binary Merkle tree over sha256 digests, in the given order.

    Leaves are the documents' 32-byte sha256 digests (bytes or hex). A leaf is
    hashed as sha256(0x00 || digest), an inner node as sha256(0x01 || left ||
    right); levels are built bottom-up pairing neighbours, and an odd node at
    the end of a level moves up unchanged. This equals RFC 6962's Merkle tree
    hash (its split at the largest power of two below n gives the same tree).
    The empty tree's root is sha256 of no bytes. A document listed twice in
    the order (weight > 1) is two leaves.
    """
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    sha = hashlib.sha256
    level = [sha(b"\x00" + (bytes.fromhex(x) if isinstance(x, str) else x)).digest() for x in leaves]
    while len(level) > 1:
        nxt = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def order_roots(order: list[str], digest_of: dict[str, bytes], source_of: dict[str, str],
                source_names: list[str]) -> dict:
    """Merkle roots of the training order: the mix, and each source's subsequence."""
    per: dict[str, list[bytes]] = {name: [] for name in source_names}
    for doc_id in order:
        per[source_of[doc_id]].append(digest_of[doc_id])
    return {"mix": merkle_root([digest_of[d] for d in order]),
            "sources": {name: merkle_root(leaves) for name, leaves in per.items()}}

