"""Calibrate `verify --replay`'s tolerance: the distance floating-point noise makes, against the distance a change
to the data makes, on training intervals of a real release.

For each chosen interval (default: each stage's first and last interval whose
start and end the release carries; --every: all of them), it re-trains from the
release alone and measures the relative distance of release/replay.py (l2 of
replayed minus attested weights, over l2 of the interval's attested update)
under:

  probe   the compile decision flipped: what `verify` measures as this
          machine's rounding noise on the interval when a replay is not bit
          for bit (the recorded settings replay bit for bit here, so the
          probe's distance to the attested weights is that noise);
  noise   one thread and three threads instead of the recorded count (what
          another machine's rounding does to an honest replay);
  signal  one token of one training window the interval reads changed, the
          batches of two of its steps swapped, one document it reads
          replaced by another document's text, and one sentence added to it.

It prints each distance and its ratio to the probe's: a replay passes when
the ratio is at most `glassforge.release.replay.NOISE_FACTOR`, which should
lie above every noise ratio and below every ratio of a changed document or
swapped batches, on every recipe shipped.

    .venv/bin/python bench/replay_calibration.py runs/default/release
    .venv/bin/python bench/replay_calibration.py runs/tiny/release --every --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glassforge.core.recipe import parse_recipe  # noqa: E402
from glassforge.core.runfolder import RECIPE, WEIGHTS, Release  # noqa: E402
from glassforge.release.datapack import pack_conversation_files  # noqa: E402
from glassforge.release.replay import (  # noqa: E402
    NOISE_FACTOR,
    Attested,
    Interval,
    _as_recorded,
    _examples,
    _initial_weights,
    _scratch_run,
    distance,
)
from glassforge.tokenizer.shards import write_shards  # noqa: E402
from glassforge.train.loop import retrain  # noqa: E402
from glassforge.train.order import DataOrder  # noqa: E402


class Remapped:
    """Examples whose indices pass through a mapping (to swap two steps' batches)."""

    def __init__(self, inner, mapping: dict[int, int]):
        self.inner, self.mapping = inner, mapping
        self.bytes_per_token = inner.bytes_per_token
        for name in ("target_count",):
            if hasattr(inner, name):
                setattr(self, name, lambda rows: inner.target_count(np.array([mapping.get(int(r), int(r)) for r in rows])))

    def __len__(self):
        return len(self.inner)

    def batch(self, indices):
        return self.inner.batch(np.array([self.mapping.get(int(i), int(i)) for i in indices]))


class OneTokenChanged:
    """Examples with one token of one example changed (the smallest change to the data there is)."""

    def __init__(self, inner, example: int, position: int, vocab: int):
        self.inner, self.example, self.position, self.vocab = inner, example, position, vocab
        self.bytes_per_token = inner.bytes_per_token
        if hasattr(inner, "target_count"):
            self.target_count = inner.target_count

    def __len__(self):
        return len(self.inner)

    def batch(self, indices):
        x, y, *extra = self.inner.batch(indices)
        for row, i in enumerate(np.asarray(indices).tolist()):
            if i == self.example:
                k = self.position
                x = x.clone()
                x[row, k] = (x[row, k] + 1) % self.vocab
                if k > 0:
                    y = y.clone()
                    if y[row, k - 1] != -100:
                        y[row, k - 1] = x[row, k]
        return (x, y, *extra)


def measure(release: Path, pred: dict, it: Interval, *, threads: int | None = None, compile: bool | None = None,
            examples_change=None, documents_change=None) -> dict:
    attested = Attested.of(release, pred)
    recipe = parse_recipe(Release(release).recipe.read_bytes(), RECIPE)
    info = attested.training[it.stage]
    cfg = _as_recorded(getattr(recipe, it.stage), info.get("env") or {}, threads)
    if compile is not None:
        cfg = dataclasses.replace(cfg, compile="on" if compile else "off")
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="glassforge-calibrate-") as tmp:
        run = _scratch_run(release, pred, Path(tmp) / "run")
        if documents_change is not None:
            documents_change(run)
            write_shards(run)
        examples = _examples(run, recipe, it.stage, pack_conversation_files(release, pred.get("data") or {}))
        if examples_change is not None:
            examples = examples_change(examples, cfg, int(info.get("seed") or 0))
        start_dir = attested.carried.get((it.stage, it.start)) if it.start else None
        init = attested.init_weights(it.stage) if it.start == 0 else None
        start = load_file(start_dir / WEIGHTS) if start_dir else (
            load_file(init) if init else _initial_weights(recipe, int(info.get("seed") or 0)))
        got: dict = {}

        def at_end(step: int, folder: Path) -> bool:
            if step == it.end:
                got.update(distance(folder / WEIGHTS, attested.weights_at(it.stage, it.end), start))
            return True

        t = time.perf_counter()
        retrain(recipe.model, examples, cfg, int(info.get("seed") or 0), str(info.get("input_hash") or ""), it.end,
                start=start_dir, init_weights=init, on_checkpoint=at_end, workdir=Path(tmp),
                label=f"calibrate {it}")
        got["seconds"] = round(time.perf_counter() - t, 1)
    return got


def _step_rows(cfg, n_examples: int, seed: int, step: int) -> np.ndarray:
    return DataOrder(n_examples, cfg.batch_tokens // cfg.seq_len, seed).global_batch(step)


def swap_two_steps(it: Interval):
    def change(examples, cfg, seed):
        a = _step_rows(cfg, len(examples), seed, it.start)
        b = _step_rows(cfg, len(examples), seed, it.end - 1)
        mapping = {int(x): int(y) for x, y in zip(a, b)} | {int(y): int(x) for x, y in zip(a, b)}
        return Remapped(examples, mapping)
    return change


def one_token(it: Interval, vocab: int):
    def change(examples, cfg, seed):
        rows = _step_rows(cfg, len(examples), seed, it.start + (it.end - it.start) // 2)
        return OneTokenChanged(examples, int(rows[0]), 5, vocab)
    return change


def one_document(it: Interval, stage: str, appended: str | None = None):
    """Replace the text of a training document read in the middle of the interval by another's (or, with
    `appended`, add that sentence to it)."""
    def change(run):
        from glassforge.tokenizer.shards import TokenStream

        recipe = run.load_recipe()
        cfg = getattr(recipe, stage)
        stream = TokenStream(run, "train")
        n_windows = (len(stream.tokens) - 1) // cfg.seq_len
        rows = DataOrder(n_windows, cfg.batch_tokens // cfg.seq_len, recipe.seed).global_batch(
            it.start + (it.end - it.start) // 2)
        victim = stream.doc_ids[stream.document_of(int(rows[0]) * cfg.seq_len)]
        docs = [json.loads(line) for line in run.documents.read_text().splitlines()]
        donor = next(d["text"] for d in docs if d["id"] != victim and d["split"] == "train")
        for d in docs:
            if d["id"] == victim:
                d["text"] = d["text"] + appended if appended is not None else donor
        run.documents.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return change


def calibrate(release: Path, pred: dict, recipe, it: Interval, recorded: int, compiled: bool) -> dict:
    """Every case's distance on one interval, and its ratio to the noise probe's."""
    probe = f"probe: compile {'off' if compiled else 'on'} (recorded {'on' if compiled else 'off'})"
    cases = {probe: {"compile": not compiled}}
    for t in sorted({1, 3} - {recorded}):
        cases[f"noise: {t} thread{'s' if t > 1 else ''} (recorded {recorded})"] = {"threads": t}
    if it.stage != "rl":  # RL's batches are sampled from the policy as it trains: noise only there
        cases["signal: one token of one example changed"] = {"examples_change": one_token(it, recipe.model.vocab_size)}
        cases["signal: two steps' batches swapped"] = {"examples_change": swap_two_steps(it)}
    if it.stage == "pretrain":
        cases["signal: one document replaced"] = {"documents_change": one_document(it, it.stage)}
        cases["signal: one sentence added to one document"] = {
            "documents_change": one_document(it, it.stage, "\nThis sentence was not in the training data.")}
    figures: dict = {}
    for name, kw in cases.items():
        d = measure(release, pred, it, **kw)
        figures[name] = {"relative": d["relative"], "l2": d["l2"], "linf": d["linf"], "seconds": d["seconds"]}
    noise = figures[probe]["relative"]
    for name, f in figures.items():
        f["ratio_to_probe"] = f["relative"] / noise if noise else None
        verdict = "" if name == probe else ("  passes" if f["relative"] <= NOISE_FACTOR * noise else "  fails")
        ratio = f"{f['ratio_to_probe']:7.2f}x probe" if noise else "    (probe is 0)"
        print(f"{it}: {name:44s} {f['relative']:.3e}  {ratio}{verdict}  ({f['seconds']} s)", flush=True)
    return {"probe_noise": noise, "figures": figures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("release")
    p.add_argument("--stage", action="append", help="stages to measure (default: every training stage)")
    p.add_argument("--every", action="store_true", help="measure every interval, not each stage's first and last")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    release = Path(args.release)
    pred = json.loads(Release(release).attestation.read_text())["predicate"]
    attested = Attested.of(release, pred)
    recipe = parse_recipe(Release(release).recipe.read_bytes(), RECIPE)
    out = {"release": str(release), "noise_factor": NOISE_FACTOR, "torch": torch.__version__, "intervals": {}}
    for stage in args.stage or attested.stages():
        if stage not in attested.chain:
            continue
        its = [i for i in attested.intervals(stage)
               if attested.startable(i) and attested.weights_at(stage, i.end) is not None]
        if not its:
            print(f"{stage}: no interval with a carried start and end", flush=True)
            continue
        env = attested.training[stage].get("env") or {}
        recorded = int(env.get("threads") or 1)
        for it in its if args.every else sorted({its[0], its[-1]}, key=lambda i: i.start):
            out["intervals"][str(it)] = calibrate(release, pred, recipe, it, recorded, bool(env.get("compile")))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
