"""`glassforge build`: every stage in order, skipping those whose inputs are unchanged.

A stage's input hash covers the recipe sections it reads and the fingerprint
(content hash) of the outputs of every stage before it, so the hashes form a
chain: change a document and everything after `data` runs again; re-run a
finished build and nothing does. The hash is recorded in `state.json` only when
the stage completes; a stage interrupted half way has no record and runs
again, resuming from its checkpoints where it has them.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glassforge.errors import UserError
from glassforge.recipe import dump_recipe, load_recipe
from glassforge.runfolder import Run, atomic_write_text, canonical_json, sha256_bytes, sha256_file


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # recipe sections the stage reads
    outputs: Callable[[Run], list[Path]]  # files whose content is the stage's fingerprint
    folder: Callable[[Run], Path | None]  # what to clear when the stage's inputs change
    entry: Callable[[Run], dict]


def _checkpoint_weights(folder: Path) -> list[Path]:
    from glassforge.train import list_checkpoints

    ckpts = list_checkpoints(folder)
    return [ckpts[-1][1] / "model.safetensors"] if ckpts else []


def _entry(module: str, func: str) -> Callable[[Run], dict]:
    def call(run: Run, **options) -> dict:
        import importlib

        return getattr(importlib.import_module(f"glassforge.{module}"), func)(run, **options)

    return call


STAGES: list[Stage] = [
    # The manifest is left out of the fingerprint: the shards stage adds token counts to it.
    Stage("data", ("seed", "data"), lambda r: [r.data / "documents.jsonl", r.data / "order.txt"], lambda r: None,
          _entry("data", "run_data")),
    Stage("tokenizer", ("tokenizer",), lambda r: [r.tokenizer / "tokenizer.json"], lambda r: r.tokenizer,
          _entry("tokenizer", "run_tokenizer")),
    Stage("shards", ("seed",), lambda r: [r.data / "shards.json", r.data / "train.bin", r.data / "val.bin"],
          lambda r: None, _entry("shards", "run_shards")),
    Stage("pretrain", ("seed", "model", "pretrain"), lambda r: _checkpoint_weights(r.pretrain), lambda r: r.pretrain,
          _entry("pretrain", "run_pretrain")),
    Stage("sft", ("seed", "sft"), lambda r: _checkpoint_weights(r.sft), lambda r: r.sft, _entry("sft", "run_sft")),
    Stage("eval", ("eval",), lambda r: [r.eval / "eval.json"], lambda r: r.eval, _entry("evaluate", "run_eval")),
    Stage("release", ("name", "description"), lambda r: [r.release / "manifest.json"], lambda r: r.release,
          _entry("release", "run_release")),
]
STAGE_NAMES = [s.name for s in STAGES]


def fingerprint(run: Run, paths: list[Path]) -> str:
    """Content hash of a stage's outputs, each keyed by its path inside the run folder.

    Not the bare file name: pretrain's and sft's weights are both model.safetensors,
    and one would overwrite the other. Not the absolute path either: the same run
    moved or copied to another machine must hash the same.
    """
    return sha256_bytes(canonical_json({p.relative_to(run.root).as_posix(): sha256_file(p) if p.is_file() else None
                                        for p in paths}))


def stage_input_hash(run: Run, name: str) -> str:
    """Hash of what stage `name` reads: its recipe sections and every earlier stage's outputs."""
    recipe = run.load_recipe()
    i = STAGE_NAMES.index(name)
    stage = STAGES[i]
    parts = {"stage": name, "recipe": recipe.section_hash(*stage.sections)}
    if i > 0:
        parts["previous"] = fingerprint(run, [p for prev in STAGES[:i] for p in prev.outputs(run)])
    if name == "data":
        from glassforge import data

        fp = getattr(data, "input_fingerprint", None)
        parts["sources"] = fp(recipe) if fp else None
    return sha256_bytes(canonical_json(parts))


def is_current(run: Run, name: str) -> bool:
    stage = STAGES[STAGE_NAMES.index(name)]
    done = run.read_state().get(name)
    if not done or done.get("input_hash") != stage_input_hash(run, name):
        return False
    outputs = stage.outputs(run)
    return bool(outputs) and all(p.is_file() for p in outputs) and done.get("output") == fingerprint(run, outputs)


def run_stage(run: Run, name: str, **options) -> dict:
    """Run one stage (the CLI's `glassforge STAGE RUN`), recording it as complete."""
    stage = STAGES[STAGE_NAMES.index(name)]
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 clears and records
        return {"stage": name, **(stage.entry(run, **options) or {})}
    input_hash = stage_input_hash(run, name)
    previous = run.read_state().get(name)
    folder = stage.folder(run)
    if previous and previous.get("input_hash") != input_hash and folder is not None and folder.exists():
        shutil.rmtree(folder)  # its inputs changed: old checkpoints must not be resumed
    run.forget(name)
    t = time.perf_counter()
    result = stage.entry(run, **options) or {}
    seconds = round(time.perf_counter() - t, 2)
    run.mark_done(name, input_hash, output=fingerprint(run, stage.outputs(run)), seconds=seconds)
    return {"stage": name, "seconds": seconds, **result}


def stage_enabled(run: Run, name: str) -> bool:
    recipe = run.load_recipe()
    if name == "sft":
        return recipe.sft.enabled
    if name == "eval":
        return recipe.eval.enabled
    return True


def build(recipe_name: str, out: Path, force: bool = False) -> dict:
    """Run every stage of a recipe into `out`; return per-stage results."""
    recipe = load_recipe(recipe_name)  # validate before touching the folder
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    run = Run.create(out)
    text = dump_recipe(recipe)
    if not run.recipe.is_file() or run.recipe.read_text() != text:
        atomic_write_text(run.recipe, text)
    results = {}
    t0 = time.perf_counter()
    for stage in STAGES:
        if not stage_enabled(run, stage.name):
            if run.read_state().get(stage.name):
                run.forget(stage.name)
            folder = stage.folder(run)
            if folder is not None and folder.exists():
                shutil.rmtree(folder)
            continue
        if not force and is_current(run, stage.name):
            print(f"[build] {stage.name}: up to date, skipped", flush=True)
            results[stage.name] = "skipped"
            continue
        print(f"[build] {stage.name} ...", flush=True)
        results[stage.name] = run_stage(run, stage.name)
        print(f"[build] {stage.name}: done in {results[stage.name]['seconds']} s", flush=True)
    print(f"[build] {run.root}: complete in {time.perf_counter() - t0:.1f} s; release in {run.release}", flush=True)
    return results
