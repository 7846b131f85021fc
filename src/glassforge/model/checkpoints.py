"""Checkpoints: a training stage's state on disk, written so that a kill at any moment loses nothing.

A checkpoint is a folder `checkpoints/step_NNNNNNN/` (names in core.runfolder)
holding the weights (`model.safetensors`, the Hugging Face state dict), the
optimiser state (`optimizer.safetensors`, flat entries `opt{k}.{param}.{name}`)
and `trainer.json` (step, RNG states, data cursor, the stage's input hash,
and the optimisers' param groups). The folder is filled under a temporary
name and renamed into place, trainer.json last, so a kill leaves the previous
checkpoint intact and a half-written one is never taken for a checkpoint.
Resuming takes the newest one that loads.

Every checkpoint written is also logged, with the sha256 of its three files,
in the stage's `checkpoints.jsonl`, which pruning never touches: the
attestation's checkpoint chain and a full replay compare against every step
that was ever saved, not only the ones still on disk. A resumed run drops the
log's lines past the checkpoint it resumes from; they are written again, with
the same hashes, as training reaches them.

Under FSDP2 (torchrun with `fsdp = true`) every rank gathers whole tensors
(`full_tensor`) and rank 0 writes; loading shards them again (`shard_like`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile, atomic_write_dir, atomic_write_json
from glassforge.core.hashing import sha256_file
from glassforge.core.runfolder import (
    CHECKPOINT_LOG,
    CHECKPOINTS,
    OPTIMIZER,
    TRAINER,
    WEIGHTS,
    checkpoint_dir,
    list_checkpoints,
)
from glassforge.model.llama import Llama


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it); others as they are."""
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else t).detach().cpu().contiguous()


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from disk, sharded like `param` when param is an FSDP2 DTensor."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None or value.dim() == 0:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), mesh, param.placements)


def _optimizer_tensors(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    """Optimiser state as flat safetensors entries `opt{k}.{param index}.{name}` plus JSON metadata.

    Every rank must call this under FSDP (whole tensors are gathered)."""
    tensors, meta = {}, []
    for k, opt in enumerate(opts):
        sd = opt.state_dict()
        for pid, state in sd["state"].items():
            for name, value in state.items():
                t = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt{k}.{pid}.{name}"] = t.reshape(-1) if t.dim() == 0 else t
        meta.append({"param_groups": sd["param_groups"],
                     "scalars": sorted(f"{pid}.{n}" for pid, s in sd["state"].items() for n, v in s.items()
                                       if not torch.is_tensor(v) or v.dim() == 0)})
    return tensors, meta


def load_optimizers(opts, tensors: dict[str, torch.Tensor], meta: list) -> None:
    for k, opt in enumerate(opts):
        scalars = set(meta[k]["scalars"])
        params = [p for g in opt.param_groups for p in g["params"]]
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            prefix, pid, name = key.split(".", 2)
            if prefix != f"opt{k}":
                continue
            state.setdefault(int(pid), {})[name] = (t.reshape(()) if f"{pid}.{name}" in scalars
                                                    else shard_like(t, params[int(pid)]))
        opt.load_state_dict({"state": state, "param_groups": meta[k]["param_groups"]})


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _model_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict, whole (gathered from FSDP shards; every rank must call it)."""
    sd = {k: full_tensor(v) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(folder: Path, step: int, model: Llama, opts, meta: dict, write: bool = True) -> Path:
    """Write checkpoints/step_NNNNNNN atomically; under torchrun every rank calls it (the tensors are
    gathered), and only the one with write=True (rank 0) writes."""
    from safetensors.torch import save_file

    final = checkpoint_dir(folder, step)
    weights = _model_tensors(model)
    opt_tensors, opt_meta = _optimizer_tensors(opts)
    if write:
        def fill(tmp: Path):
            save_file(weights, tmp / WEIGHTS)
            save_file(opt_tensors, tmp / OPTIMIZER)
            # trainer.json last: a folder without it is never taken for a checkpoint.
            atomic_write_json(tmp / TRAINER, {**meta, "step": step, "optimizers": opt_meta,
                                                     "rng": rng_state()})

        atomic_write_dir(final, fill)
    return final


def prune_checkpoints(folder: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest keep_last checkpoints and every keep_every-th; clear interrupted writes."""
    ckpts = list_checkpoints(folder)
    keep = {s for s, _ in ckpts[-max(1, keep_last):]}
    if keep_every:
        keep |= {s for s, _ in ckpts if s % keep_every == 0}
    for s, p in ckpts:
        if s not in keep:
            # Rename first: a kill during rmtree must not leave a half-deleted folder that
            # still looks like a checkpoint.
            doomed = p.with_name(f".{p.name}.deleting")
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for stale in (folder / CHECKPOINTS).glob(".step_*"):  # temp folders of an interrupted write
        shutil.rmtree(stale, ignore_errors=True)


def find_resume(out: Path, recipe_hash: str, verbose: bool = True) -> dict | None:
    """The newest checkpoint that loads: its trainer.json, weights and optimiser tensors."""
    from safetensors.torch import load_file

    for step, path in reversed(list_checkpoints(out)):
        try:
            meta = json.loads((path / TRAINER).read_text())
            state = {"step": step, "path": path, "meta": meta, "weights": load_file(path / WEIGHTS),
                     "optimizer": load_file(path / OPTIMIZER)}
        except (OSError, ValueError) as e:  # damaged on disk (a full disk, a bad copy): try the one before
            if verbose:
                print(f"[train] {path}: unreadable ({e}); trying an older checkpoint", flush=True)
            continue
        if meta.get("recipe_hash") != recipe_hash:
            raise UserError(f"{path}: checkpoint was made with another recipe or data; remove {out} to start over")
        return state
    return None



# --------------------------------------------------------------------------- the checkpoint log


def checkpoint_hashes(path: Path) -> dict:
    """The sha256 of a checkpoint folder's weights, optimiser state and trainer state."""
    return {"model_sha256": sha256_file(path / WEIGHTS), "optimizer_sha256": sha256_file(path / OPTIMIZER),
            "trainer_sha256": sha256_file(path / TRAINER)}


def log_checkpoint(stage_dir: Path, step: int, path: Path) -> dict:
    """Append a written checkpoint's hashes to the stage's checkpoints.jsonl (fsynced); return the entry."""
    entry = {"step": step, **checkpoint_hashes(path)}
    with open(Path(stage_dir) / CHECKPOINT_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def read_checkpoint_log(stage_dir: Path) -> list[dict]:
    """Every logged checkpoint of a stage, in step order (a line cut short by a kill is skipped)."""
    path = Path(stage_dir) / CHECKPOINT_LOG
    entries: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                entries[int(entry["step"])] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return [entries[s] for s in sorted(entries)]


def truncate_checkpoint_log(stage_dir: Path, step: int) -> None:
    """Keep the log's entries up to step (the checkpoint a run resumes from); later ones are written again."""
    path = Path(stage_dir) / CHECKPOINT_LOG
    if not path.is_file():
        return
    kept = [e for e in read_checkpoint_log(stage_dir) if e["step"] <= step]
    with AtomicFile(path, "w") as f:
        f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
