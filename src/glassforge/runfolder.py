"""The run folder: the one artifact contract every stage reads and writes.

Layout (see docs/ARCHITECTURE.md):

    RUN/recipe.toml            the resolved recipe this run was built with
    RUN/state.json             per stage: the hash of its inputs when it last completed
    RUN/data/                  documents.jsonl, manifest.json, token shards
    RUN/tokenizer/             tokenizer.json, tokenizer_config.json
    RUN/pretrain/, RUN/sft/    checkpoints/step_NNNNNNN/, metrics.jsonl, loss.png
    RUN/eval/                  eval.json
    RUN/release/               the Hugging Face-layout release

Writes are atomic (temp file, fsync, rename) so an interrupted stage never
leaves a half-written file where a good one stood.

Within one command (`hashing_once`) each file's sha256 is computed once: release
and verify ask for the same weights' hash from several sides, and those files
are the large ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from glassforge.errors import UserError


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_mode(fd: int) -> None:
    """mkstemp makes files private (0600); a written artifact gets the usual 0666 & ~umask."""
    os.fchmod(fd, 0o666 & ~_umask())


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of `path` to write by name, renamed onto `path` when the block succeeds.

    For writers that open the file themselves (the GGUF writer takes a file name);
    the file already has its public mode, which opening it for writing keeps.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    _public_mode(fd)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class AtomicFile:
    """A file written under a temporary name and renamed into place on success."""

    def __init__(self, path: Path | str, mode: str = "wb"):
        self.path = Path(path)
        self.mode = mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        _public_mode(fd)
        self.f = os.fdopen(fd, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8"}))
        return self.f

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        else:
            self.f.close()
            Path(self.tmp).unlink(missing_ok=True)
        return False


def atomic_write_dir(final: Path, fill) -> None:
    """Create `final` by filling a temporary sibling folder, then renaming it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: Path | str) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class Run:
    """Paths inside one run folder. Stages take a `Run` and nothing else about locations."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def create(cls, out: Path | str) -> "Run":
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @classmethod
    def open(cls, path: Path | str) -> "Run":
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"{path}: no such run folder")
        if not (root / "recipe.toml").is_file():
            raise UserError(f"{path}: not a run folder (no recipe.toml); create one with `glassforge build`")
        return cls(root)

    recipe = property(lambda self: self.root / "recipe.toml")
    state = property(lambda self: self.root / "state.json")
    data = property(lambda self: self.root / "data")
    tokenizer = property(lambda self: self.root / "tokenizer")
    pretrain = property(lambda self: self.root / "pretrain")
    sft = property(lambda self: self.root / "sft")
    eval = property(lambda self: self.root / "eval")
    release = property(lambda self: self.root / "release")

    def load_recipe(self):
        from glassforge.recipe import load_recipe

        return load_recipe(self.recipe)

    def read_state(self) -> dict:
        if self.state.is_file():
            return json.loads(self.state.read_text())
        return {}

    def mark_done(self, stage: str, input_hash: str, **extra: Any) -> None:
        state = self.read_state()
        state[stage] = {"input_hash": input_hash, **extra}
        atomic_write_json(self.state, state)

    def forget(self, stage: str) -> None:
        state = self.read_state()
        if state.pop(stage, None) is not None:
            atomic_write_json(self.state, state)
