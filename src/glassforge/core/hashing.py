"""Content hashes: the sha256 of bytes, of files and of JSON values, each computed the same way everywhere.

Within one command (`hashing_once`) each file's sha256 is computed once: release
and verify ask for the same weights' hash from several sides (manifest,
attestation subject, checkpoint chain), and those files are the large ones.
`canonical_json` is the one serialisation that is hashed, so equal content
hashes equally whatever the key order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# One command's file hashes, by (path, device, inode, size, mtime): a file replaced or rewritten since differs in one.
_HASHES: ContextVar[dict | None] = ContextVar("glassforge_file_hashes", default=None)


@contextmanager
def hashing_once() -> Iterator[None]:
    """Within the block (one command), each file's sha256 is computed once however often it is asked for.

    release and verify check the same weights from several sides (manifest,
    attestation subject, checkpoint chain); each side asks for the hash, and a
    large safetensors should be read once. A file replaced in between (the atomic
    writes here rename a new inode into place) or rewritten with another size or
    modification time is hashed again. Outside the block nothing is kept.
    """
    token = _HASHES.set({}) if _HASHES.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _HASHES.reset(token)


def _hash_key(path: Path | str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _blocks(path: Path | str, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            yield block


def sha256_file(path: Path | str) -> str:
    cache = _HASHES.get()
    key = _hash_key(path) if cache is not None else None
    if key is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    for block in _blocks(path):
        h.update(block)
    digest = h.hexdigest()
    if key is not None:
        cache[key] = digest
    return digest


def copy_file(src: Path | str, dst: Path | str) -> None:
    """shutil.copyfile; inside `hashing_once()` it also hashes the bytes on the way, for both paths,
    so a copied file is not read again to be hashed."""
    cache = _HASHES.get()
    if cache is None:
        shutil.copyfile(src, dst)
        return
    h = hashlib.sha256()
    with open(dst, "wb") as out:
        for block in _blocks(src):
            h.update(block)
            out.write(block)
    cache[_hash_key(src)] = cache[_hash_key(dst)] = h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The bytes we hash: sorted keys, no whitespace, so equal content hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

