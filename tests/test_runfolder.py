"""Run-folder helpers: within one command (`hashing_once`) a file is read once to be hashed, and only
while it is unchanged; outside one, every call reads the file."""

from __future__ import annotations

import hashlib
import os

from glassforge.core.hashing import copy_file, hashing_once, sha256_file


def test_a_file_is_hashed_once_per_command_until_it_changes(tmp_path, file_reads):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    with hashing_once():
        assert sha256_file(path) == sha256_file(path) == hashlib.sha256(b"weights").hexdigest()
        assert file_reads[str(path)] == 1
        tmp = tmp_path / "new"
        tmp.write_bytes(b"other weights")
        os.replace(tmp, path)  # how the run folder rewrites a file: a new one renamed into place
        assert sha256_file(path) == hashlib.sha256(b"other weights").hexdigest()
        assert file_reads[str(path)] == 2
    sha256_file(path)
    sha256_file(path)
    assert file_reads[str(path)] == 4  # outside a command nothing is remembered


def test_a_copy_is_hashed_on_the_way(tmp_path, file_reads):
    src, dst = tmp_path / "a.bin", tmp_path / "b.bin"
    src.write_bytes(b"x" * 3_000_000)
    with hashing_once():
        copy_file(src, dst)
        assert sha256_file(src) == sha256_file(dst) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert dst.read_bytes() == src.read_bytes()
    assert file_reads == {str(src): 1}
