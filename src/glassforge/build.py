"""`glassforge build`: every stage in order, skipping those whose inputs are unchanged.

The stages themselves are data in `core.stages` (what each reads, writes and
clears); this module binds each name to its entry function and runs them. A
stage's input hash is recorded in `state.json` only when the stage completes;
a stage interrupted half way has no record and runs again, resuming from its
checkpoints where it has them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_text
from glassforge.core.recipe import dump_recipe, load_recipe
from glassforge.core.runfolder import Run
from glassforge.core.stages import STAGES, fingerprint, is_current, stage, stage_enabled, stage_input_hash
from glassforge.data.stage import input_fingerprint, run_data
from glassforge.evaluate.stage import run_eval
from glassforge.release.stage import run_release
from glassforge.tokenizer.bpe import run_tokenizer
from glassforge.tokenizer.shards import run_shards
from glassforge.train.pretrain import run_pretrain
from glassforge.train.rl import run_rl
from glassforge.train.sft import run_sft

ENTRIES: dict[str, Callable[..., dict]] = {
    "data": run_data, "tokenizer": run_tokenizer, "shards": run_shards, "pretrain": run_pretrain,
    "sft": run_sft, "rl": run_rl, "eval": run_eval, "release": run_release,
}


def _extra_inputs(run: Run, name: str) -> str | None:
    """What a stage reads beyond the recipe and earlier stages: the data stage's source files."""
    return input_fingerprint(run.load_recipe()) if name == "data" else None


def run_stage(run: Run, name: str, **options) -> dict:
    """Run one stage (the CLI's `glassforge STAGE RUN`), recording it as complete."""
    spec = stage(name)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 clears and records
        return {"stage": name, **(ENTRIES[name](run, **options) or {})}
    input_hash = stage_input_hash(run, name, _extra_inputs(run, name))
    previous = run.read_state().get(name)
    folder = spec.folder(run)
    if previous and previous.get("input_hash") != input_hash and folder is not None and folder.exists():
        shutil.rmtree(folder)  # its inputs changed: old checkpoints must not be resumed
    run.forget(name)
    t = time.perf_counter()
    result = ENTRIES[name](run, **options) or {}
    seconds = round(time.perf_counter() - t, 2)
    run.mark_done(name, input_hash, output=fingerprint(run, spec.outputs(run)), seconds=seconds)
    return {"stage": name, **result, "seconds": seconds}  # the whole stage, not the entry's own timing


def build(recipe_name: str, out: Path, force: bool = False, data_options: dict | None = None) -> dict:
    """Run every stage of a recipe into `out`; return per-stage results ("skipped" for those up to date).

    data_options: executor, workers, address for the data stage (they change how it runs, not its output)."""
    recipe = load_recipe(recipe_name)  # validate before touching the folder
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    run = Run.create(out)
    text = dump_recipe(recipe)
    if not run.recipe.is_file() or run.recipe.read_text() != text:
        atomic_write_text(run.recipe, text)
    results = {}
    t0 = time.perf_counter()
    for spec in STAGES:
        if not stage_enabled(run, spec.name):
            if run.read_state().get(spec.name):
                run.forget(spec.name)
            folder = spec.folder(run)
            if folder is not None and folder.exists():
                shutil.rmtree(folder)
            continue
        if not force and is_current(run, spec.name, _extra_inputs(run, spec.name)):
            print(f"[build] {spec.name}: up to date, skipped", flush=True)
            results[spec.name] = "skipped"
            continue
        print(f"[build] {spec.name} ...", flush=True)
        results[spec.name] = run_stage(run, spec.name, **((data_options or {}) if spec.name == "data" else {}))
        print(f"[build] {spec.name}: done in {results[spec.name]['seconds']} s", flush=True)
    print(f"[build] {run.root}: complete in {time.perf_counter() - t0:.1f} s; release in {run.release}", flush=True)
    return results
