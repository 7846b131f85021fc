"""Merkle trees over documents: one root commits to the whole training order, and one short proof to each leaf.

The tree is RFC 6962's (Certificate Transparency), restated in RFC 9162
section 2.1: a leaf is sha256(0x00 || digest), an inner node sha256(0x01 ||
left || right), so a leaf can never pass for an inner node. Leaves are the
documents' 32-byte sha256 digests, in the training order; a document listed
twice (weight > 1) is two leaves.

An inclusion proof (RFC 9162 section 2.1.3) is a leaf index, the tree size and
the audit path: the sibling hashes from the leaf up to the root, bottom first.
`inclusion_path` makes one and `root_from_path` runs RFC 9162's verification
algorithm (2.1.3.2) over one; the tests cross-check both, and the roots,
against an independent implementation (pymerkle).
"""

from __future__ import annotations

import hashlib

HASH_SIZE = 32


def _digest(x: bytes | str) -> bytes:
    return bytes.fromhex(x) if isinstance(x, str) else x


def leaf_hash(digest: bytes | str) -> bytes:
    """RFC 6962's leaf hash of a document digest: sha256(0x00 || digest)."""
    return hashlib.sha256(b"\x00" + _digest(digest)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962's interior node: sha256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: list[bytes] | list[str]) -> list[list[bytes]]:
    """Every level of the tree, leaf hashes first, the root's level (one node) last.

    Levels are built bottom-up pairing neighbours, and an odd node at the end
    of a level moves up unchanged. This equals RFC 6962's Merkle tree hash (its
    split at the largest power of two below n gives the same tree).
    """
    level = [leaf_hash(x) for x in leaves]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(level := nxt)
    return levels


def merkle_root(leaves: list[bytes] | list[str]) -> str:
    """Root (hex) of the RFC 6962 Merkle tree over sha256 digests (bytes or hex), in the given order.

    The empty tree's root is sha256 of no bytes. A document listed twice in
    the order (weight > 1) is two leaves.
    """
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    return _levels(leaves)[-1][0].hex()


def inclusion_path(leaves: list[bytes] | list[str], index: int) -> list[bytes]:
    """RFC 9162's audit path of leaf `index` (0-based): the sibling hashes from the leaf up, bottom first.

    A node with no right neighbour at its level moves up unchanged, so that
    level adds no hash: the path is RFC 6962's PATH(m, D[n]).
    """
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} is not in a tree of {len(leaves)} leaves")
    path = []
    for level in _levels(leaves)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def root_from_path(digest: bytes | str, index: int, size: int, path: list[bytes]) -> bytes | None:
    """The root an audit path leads to from a document digest at `index` of `size` leaves (RFC 9162 2.1.3.2),
    or None when the path cannot be one for that index and size (too short, too long, index out of range)."""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in path):
        return None
    fn, sn, r = index, size - 1, leaf_hash(digest)
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(digest: bytes | str, index: int, size: int, path: list[bytes], root: bytes | str) -> bool:
    """Whether the audit path proves that `digest` is leaf `index` of the `size`-leaf tree with this root."""
    return root_from_path(digest, index, size, path) == _digest(root)


def order_roots(order: list[str], digest_of: dict[str, bytes], source_of: dict[str, str],
                source_names: list[str]) -> dict:
    """Merkle roots of the training order: the mix, and each source's subsequence."""
    per: dict[str, list[bytes]] = {name: [] for name in source_names}
    for doc_id in order:
        per[source_of[doc_id]].append(digest_of[doc_id])
    return {"mix": merkle_root([digest_of[d] for d in order]),
            "sources": {name: merkle_root(leaves) for name, leaves in per.items()}}
