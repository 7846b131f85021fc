"""The build's stage fingerprints: every output counts, and a run hashes the same wherever it lies."""

from __future__ import annotations

import shutil
from pathlib import Path

from glassforge.core.stages import fingerprint
from glassforge.core.runfolder import Run


def _weights(run: Run) -> list[Path]:
    paths = [run.pretrain / "checkpoints" / "step_0000010" / "model.safetensors",
             run.sft / "checkpoints" / "step_0000010" / "model.safetensors"]
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"weights %d" % i)
    return paths


def test_same_named_outputs_in_different_stage_folders_both_count(tmp_path):
    run = Run(tmp_path / "run")
    pre, sft = _weights(run)
    before = fingerprint(run, [pre, sft])
    pre.write_bytes(b"other pretraining weights")
    after_pre = fingerprint(run, [pre, sft])
    sft.write_bytes(b"other fine-tuned weights")
    after_sft = fingerprint(run, [pre, sft])
    assert len({before, after_pre, after_sft}) == 3


def test_fingerprint_does_not_depend_on_where_the_run_lies(tmp_path):
    run = Run(tmp_path / "run")
    paths = _weights(run)
    moved = Run(tmp_path / "elsewhere" / "copy")
    shutil.copytree(run.root, moved.root)
    assert fingerprint(run, paths) == fingerprint(moved, [moved.root / p.relative_to(run.root) for p in paths])
