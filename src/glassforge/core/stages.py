"""The stages as data: what each reads from the recipe, what it writes, and when it is up to date.

A stage's input hash covers the recipe sections it reads and the fingerprint
(content hash) of the outputs of every stage before it, so the hashes form a
chain: change a document and everything after `data` runs again; re-run a
finished build and nothing does. The data stage's inputs also include what
the recipe only names (source files, the Python version of the embedded
corpus): its caller passes that fingerprint in as `extra`.

The specs live here, below every stage, so that a stage can name its own
input hash (the trainer tags checkpoints with it) without importing `build`,
which imports every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glassforge.core.hashing import canonical_json, sha256_bytes, sha256_file
from glassforge.core.runfolder import WEIGHTS, Release, Run, list_checkpoints


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # recipe sections the stage reads
    outputs: Callable[[Run], list[Path]]  # files whose content is the stage's fingerprint
    folder: Callable[[Run], Path | None]  # what to clear when the stage's inputs change


def _last_weights(folder: Path) -> list[Path]:
    ckpts = list_checkpoints(folder)
    return [ckpts[-1][1] / WEIGHTS] if ckpts else []


STAGES: list[Stage] = [
    # The data manifest is left out of the fingerprint: the shards stage adds token counts to it.
    Stage("data", ("seed", "data"), lambda r: [r.documents, r.order], lambda r: None),
    Stage("tokenizer", ("tokenizer",), lambda r: [r.tokenizer_json], lambda r: r.tokenizer),
    Stage("shards", ("seed",), lambda r: [r.shards, r.split_tokens("train"), r.split_tokens("val")],
          lambda r: None),
    Stage("pretrain", ("seed", "model", "pretrain"), lambda r: _last_weights(r.pretrain), lambda r: r.pretrain),
    Stage("sft", ("seed", "sft"), lambda r: _last_weights(r.sft), lambda r: r.sft),
    Stage("rl", ("seed", "rl"), lambda r: _last_weights(r.rl), lambda r: r.rl),
    Stage("eval", ("eval",), lambda r: [r.eval_results], lambda r: r.eval),
    Stage("release", ("name", "description", "release"), lambda r: [Release(r.release).manifest], lambda r: r.release),
]
STAGE_NAMES = [s.name for s in STAGES]


def stage(name: str) -> Stage:
    return STAGES[STAGE_NAMES.index(name)]


def fingerprint(run: Run, paths: list[Path]) -> str:
    """Content hash of a stage's outputs, each keyed by its path inside the run folder.

    Not the bare file name: pretrain's and sft's weights are both model.safetensors,
    and one would overwrite the other. Not the absolute path either: the same run
    moved or copied to another machine must hash the same.
    """
    return sha256_bytes(canonical_json({p.relative_to(run.root).as_posix(): sha256_file(p) if p.is_file() else None
                                        for p in paths}))


def stage_input_hash(run: Run, name: str, extra: str | None = None) -> str:
    """Hash of what stage `name` reads: its recipe sections, every earlier stage's outputs, and `extra`."""
    recipe = run.load_recipe()
    i = STAGE_NAMES.index(name)
    parts = {"stage": name, "recipe": recipe.section_hash(*STAGES[i].sections)}
    if i > 0:
        parts["previous"] = fingerprint(run, [p for prev in STAGES[:i] for p in prev.outputs(run)])
    if name == "data":
        parts["sources"] = extra
    return sha256_bytes(canonical_json(parts))


def is_current(run: Run, name: str, extra: str | None = None) -> bool:
    """Whether the stage completed with the inputs it has now and its outputs are as it left them."""
    spec = stage(name)
    done = run.read_state().get(name)
    if not done or done.get("input_hash") != stage_input_hash(run, name, extra):
        return False
    outputs = spec.outputs(run)
    return bool(outputs) and all(p.is_file() for p in outputs) and done.get("output") == fingerprint(run, outputs)


def stage_enabled(run: Run, name: str) -> bool:
    recipe = run.load_recipe()
    if name == "sft":
        return recipe.sft.enabled
    if name == "rl":
        return recipe.rl.enabled and recipe.sft.enabled
    if name == "eval":
        return recipe.eval.enabled
    return True
