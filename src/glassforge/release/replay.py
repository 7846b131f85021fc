"""`glassforge verify --replay`: re-train attested intervals from the release alone, and say what it shows.

The release carries its data (datapack.py), its recipe and tokenizer, and its
kept checkpoints; the attestation holds the hashes of every checkpoint the run
wrote, and how each stage ran (thread count, dtype, compile decision, seed).
An interval is the stretch between two attested checkpoints of a stage (the
first starts at step 0: the seed's initial weights, or for fine-tuning the
pretrained weights). A replay re-tokenizes the documents with the release's
tokenizer, re-trains with the recorded settings, and compares each
checkpoint it writes with the attested one.

Coverage, chosen by the verifier:

- `last`: each stage's last interval;
- `all`: every interval of every stage, as one continuous training per stage;
- `sample`: K intervals drawn with the verifier's own seed among those whose
  start the release carries (Proof-of-Learning's spot checks, Jia et al. 2021).

The output says what share of the training steps the verdicts cover.

Verdicts, per interval:

- "bit for bit": the weights and optimiser state hash to the attested ones.
  This holds on the same CPU kind and torch build whatever the cores: the
  replay runs with the recorded thread count, which fixes how every reduction
  is split (a machine with one core runs two threads and gets the same bits).
- "within floating-point tolerance (distance d, noise n)": the bits differ
  (another CPU, torch build or GPU rounds differently), so the verifier
  measures this machine's own rounding noise on the interval: it re-trains it
  a second time with the compile decision flipped (other kernels, other
  rounding) and takes n, the distance between its two replays. The replay
  passes if d <= NOISE_FACTOR x n. Distances are l2 between weights divided
  by the l2 length of the interval's attested update (end minus start): the
  share of what the interval did that is not reproduced. The noise grows
  with the interval (rounding differences compound through training), which
  is why it is measured on the interval rather than fixed; NOISE_FACTOR is
  calibrated (docs/PERFORMANCE.md, "Replay tolerance") between the noise of
  another thread count and the signal of one changed document or two swapped
  batches. The next interval then starts from the attested checkpoint, so
  rounding does not compound across intervals.
- FAIL otherwise, with the distance.

A tolerance verdict is evidence, not proof: training that is spoofed to land
within the noise of a checkpoint is a known attack on Proof-of-Learning (Zhang et al.
2022). Bit for bit is proof that these data and this recipe give these
weights on this platform.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from glassforge.core.errors import UserError
from glassforge.core.hashing import sha256_file
from glassforge.core.recipe import parse_recipe
from glassforge.core.runfolder import OPTIMIZER, RECIPE, TOKENIZER_FILES, TRAINING_STAGES, WEIGHTS, Release, Run
from glassforge.model.llama import Llama
from glassforge.release.datapack import pack_conversation_files, unpack
from glassforge.tokenizer.bpe import load_tokenizer
from glassforge.tokenizer.shards import TokenStream, write_shards
from glassforge.train.loop import retrain
from glassforge.train.order import Windows
from glassforge.train.rl import rl_examples
from glassforge.train.sft import sft_examples

Claim = tuple[str, bool, str]
MODES = ("last", "all", "sample")
#: A replay that is not bit for bit passes when its distance to the attested weights is at most this many
#: times the distance between two replays of the interval on this machine with other kernels (the module
#: docstring; calibrated in docs/PERFORMANCE.md, "Replay tolerance").
NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class Interval:
    stage: str
    start: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.stage} steps {self.start}..{self.end}"


@dataclass
class Attested:
    """What the attestation says of the training: each stage's checkpoints, how it ran, what the release carries."""

    release: Release
    chain: dict[str, dict[int, dict]]  # stage -> step -> {model_sha256, optimizer_sha256, ...}
    training: dict[str, dict]
    carried: dict[tuple[str, int], Path]

    @classmethod
    def of(cls, release: Path, pred: dict) -> "Attested":
        rel = Release(release)
        chain: dict[str, dict[int, dict]] = {}
        for entry in pred.get("checkpoints") or []:
            chain.setdefault(entry["stage"], {})[int(entry["step"])] = entry
        carried = {(c["stage"], int(c["step"])): rel.root / c["folder"]
                   for c in (pred.get("replay") or {}).get("carried", [])}
        return cls(rel, chain, pred.get("training") or {}, carried)

    def stages(self) -> list[str]:
        return [s for s in TRAINING_STAGES if s in self.chain]

    def intervals(self, stage: str) -> list[Interval]:
        steps = [0, *sorted(self.chain[stage])]
        return [Interval(stage, a, b) for a, b in zip(steps, steps[1:])]

    def weights_at(self, stage: str, step: int) -> Path | None:
        """The attested weights of a checkpoint, where the release holds them."""
        if (stage, step) in self.carried:
            return self.carried[(stage, step)] / WEIGHTS
        last = self.stages()[-1]
        if stage == last and step == max(self.chain[last]):
            return self.release.weights
        return None

    def init_weights(self, stage: str) -> Path | None:
        """What a stage's step 0 starts from: None (the seed's initial weights) for the first stage, else
        the previous stage's final weights."""
        stages = self.stages()
        i = stages.index(stage)
        if i == 0:
            return None
        prev = stages[i - 1]
        return self.weights_at(prev, max(self.chain[prev]))

    def startable(self, it: Interval) -> bool:
        if it.start == 0:
            return self.stages().index(it.stage) == 0 or self.init_weights(it.stage) is not None
        return (it.stage, it.start) in self.carried


def choose(attested: Attested, mode: str, samples: int, seed: int) -> list[Interval]:
    """The intervals a replay of this coverage re-trains, in training order."""
    if mode not in MODES:
        raise UserError(f"--replay {mode}: expected one of {', '.join(MODES)}")
    every = [it for stage in attested.stages() for it in attested.intervals(stage)]
    if mode == "all":
        return every
    if mode == "last":
        chosen = []
        for stage in attested.stages():
            startable = [it for it in attested.intervals(stage) if attested.startable(it)]
            if startable:
                chosen.append(startable[-1])
        return chosen
    pool = [it for it in every if attested.startable(it)]
    if samples < 1:
        raise UserError(f"--samples {samples}: must be at least 1")
    picked = set(random.Random(seed).sample(range(len(pool)), min(samples, len(pool))))
    return [it for i, it in enumerate(pool) if i in picked]


def distance(replayed: Path, attested: Path, start: dict[str, torch.Tensor]) -> dict:
    """How far replayed weights are from the attested ones: l2 and l-inf per tensor and overall, and the
    overall l2 relative to the interval's attested update (attested minus start)."""
    from safetensors.torch import load_file

    a, b = load_file(replayed), load_file(attested)
    per, total, update, linf = {}, 0.0, 0.0, 0.0
    for name in sorted(b):
        diff = a[name].double() - b[name].double()
        l2, worst = float(diff.norm()), float(diff.abs().max()) if diff.numel() else 0.0
        per[name] = {"l2": l2, "linf": worst}
        total += l2 * l2
        linf = max(linf, worst)
        update += float((b[name].double() - start[name].double()).norm()) ** 2
    l2, update = math.sqrt(total), math.sqrt(update)
    return {"l2": l2, "linf": linf, "update_l2": update, "relative": l2 / update if update else math.inf,
            "tensors": per}


def _bit_for_bit(got: dict, want: dict) -> bool:
    return got["model_sha256"] == want["model_sha256"] and got["optimizer_sha256"] == want["optimizer_sha256"]


def _verdict(it: Interval, d: dict, noise: float) -> Claim:
    """The verdict on an interval that is not bit for bit: its distance d to the attested weights against
    the distance `noise` between two replays of it on this machine."""
    name = f"replay {it}"
    worst = max(d["tensors"].items(), key=lambda kv: kv[1]["l2"])[0]
    numbers = (f"distance {d['relative']:.2e} of the interval's update (l2 {d['l2']:.3e}, l-inf {d['linf']:.3e}; "
               f"most in {worst}); this machine's rounding noise on the interval {noise:.2e}")
    if d["relative"] <= NOISE_FACTOR * noise:  # with no noise, only equal weights (the optimiser state differs)
        return (name, True, f"within floating-point tolerance ({numbers}, threshold {NOISE_FACTOR:g}x noise = "
                            f"{NOISE_FACTOR * noise:.2e}): the bits differ, as on another CPU, torch build or "
                            f"thread count")
    if noise == 0:
        return (name, False, f"not bit for bit ({numbers}): two kernel sets on this machine agree bit for bit, so "
                             f"rounding does not explain the difference from the attested step-{it.end} checkpoint")
    return (name, False, f"beyond floating-point tolerance ({numbers}, threshold {NOISE_FACTOR:g}x noise = "
                         f"{NOISE_FACTOR * noise:.2e}): these documents and this recipe do not give the attested "
                         f"step-{it.end} checkpoint")


def _scratch_run(release: Path, pred: dict, root: Path) -> Run:
    """A run folder holding what the release carries: recipe, tokenizer, documents, order, token shards."""
    rel = Release(release)
    run = Run.create(root)
    shutil.copyfile(rel.recipe, run.recipe)
    run.tokenizer.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(rel.root / name, run.tokenizer / name)
    unpack(release, run)
    write_shards(run)
    return run


def _examples(run: Run, recipe, stage: str, files: dict[str, Path]):
    if stage == "pretrain":
        return Windows(TokenStream(run, "train"), recipe.pretrain.seq_len)
    if stage == "sft":
        return sft_examples(run, load_tokenizer(run.tokenizer), files)[0]
    if stage == "rl":
        return rl_examples(run, load_tokenizer(run.tokenizer))
    raise UserError(f"the attestation names a training stage {stage!r} this glassforge cannot replay")


def _as_recorded(cfg, env: dict, threads: int | None):
    """The stage's settings as the run recorded them: dtype, compile decision and thread count."""
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(str(env.get("dtype")), cfg.dtype)
    return dataclasses.replace(cfg, dtype=dtype, compile="on" if env.get("compile") else "off",
                               threads=threads or int(env.get("threads") or 0))


def _initial_weights(recipe, seed: int) -> dict[str, torch.Tensor]:
    """The weights training starts from at step 0: a function of the seed (see train.loop.train)."""
    torch.manual_seed(seed)
    return Llama(recipe.model).hf_state_dict()


def replay_release(release: Path, pred: dict, mode: str = "last", samples: int = 2, seed: int | None = None,
                   threads: int | None = None) -> list[Claim]:
    """Re-train the chosen intervals from the release alone; one claim per interval, then the coverage.

    threads: replay with this many threads instead of each stage's recorded count (to see, or
    calibrate, what another machine's rounding does).
    """
    from safetensors.torch import load_file

    attested = Attested.of(release, pred)
    if not attested.stages():
        return [("replay", False, "the attestation records no training checkpoints")]
    seed = seed if seed is not None else random.randrange(2**31)
    chosen = choose(attested, mode, samples, seed)
    recipe = parse_recipe(Release(release).recipe.read_bytes(), RECIPE)
    claims: list[Claim] = []
    replayed: list[Interval] = []
    threads_before = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="glassforge-verify-") as tmp:
            try:
                run = _scratch_run(release, pred, Path(tmp) / "run")
            except UserError as e:
                return [("replay", False, f"the release's documents do not make a training stream: {e}")]
            files = pack_conversation_files(release, pred.get("data") or {})
            for stage in attested.stages():
                todo = [it for it in chosen if it.stage == stage]
                if todo:
                    claims += _replay_stage(attested, recipe, run, stage, todo, files, threads, Path(tmp), load_file,
                                            replayed)
    finally:
        torch.set_num_threads(threads_before)
    return claims + [_coverage(attested, replayed, claims, mode, seed)]


def _replay_stage(attested: Attested, recipe, run: Run, stage: str, todo: list[Interval], files, threads,
                  workdir: Path, load_file, replayed: list[Interval]) -> list[Claim]:
    """Re-train a stage's chosen intervals: consecutive ones in one run, restarting from the attested
    checkpoint after a verdict that is not bit for bit."""
    info = attested.training.get(stage) or {}
    cfg = _as_recorded(getattr(recipe, stage), info.get("env") or {}, threads)
    examples = _examples(run, recipe, stage, files)
    claims: list[Claim] = []
    queue = list(todo)
    while queue:
        first = queue[0]
        group = [first]
        for it in queue[1:]:
            if it.start != group[-1].end:
                break
            group.append(it)
        if not attested.startable(first):
            claims.append((f"replay {first}", False, f"the release carries no step-{first.start} checkpoint to "
                                                      f"start from"))
            queue = queue[1:]
            continue
        ends = {it.end: it for it in group}
        start_dir = attested.carried.get((stage, first.start)) if first.start else None
        init = attested.init_weights(stage) if first.start == 0 else None
        start = {"weights": load_file(start_dir / WEIGHTS) if start_dir else (
            load_file(init) if init else _initial_weights(recipe, int(info.get("seed") or 0)))}
        done: list[Interval] = []
        differs: dict = {}  # the interval whose replay is not bit for bit, and what the noise probe needs

        def check(step: int, folder: Path) -> bool:
            it = ends.get(step)
            if it is None:  # a checkpoint between attested ones: none, with the recorded checkpoint_every
                return True
            done.append(it)
            replayed.append(it)
            got = {"model_sha256": sha256_file(folder / WEIGHTS), "optimizer_sha256": sha256_file(folder / OPTIMIZER)}
            if _bit_for_bit(got, attested.chain[stage][step]):
                claims.append((f"replay {it}", True, f"bit for bit: weights and optimiser state equal the attested "
                                                     f"step-{it.end} checkpoint"))
                reached = attested.weights_at(stage, step)
                start["weights"] = load_file(reached) if reached is not None else None
                return True
            # stop here: the next interval starts from the attested checkpoint, not from ours
            differs.update(it=it, start=start["weights"], ours=workdir / "replayed.safetensors")
            shutil.copyfile(folder / WEIGHTS, differs["ours"])
            return False

        retrain(recipe.model, examples, cfg, int(info.get("seed") or 0), str(info.get("input_hash") or ""),
                group[-1].end, start=start_dir, init_weights=init, on_checkpoint=check, workdir=workdir,
                label=f"replay {stage}")
        if not done:
            claims.append((f"replay {first}", False, "the re-training wrote no checkpoint at the attested steps"))
            done = [first]
        if differs:
            it = differs["it"]
            target = attested.weights_at(stage, it.end)
            begin = attested.carried.get((stage, it.start)) if it.start else None
            if target is None or not target.is_file() or differs["start"] is None:
                missing = it.end if target is None or not target.is_file() else it.start
                claims.append((f"replay {it}", False, f"not bit for bit, and the release does not carry the attested "
                                                      f"step-{missing} weights to measure the distance"))
            else:
                d = distance(differs["ours"], target, differs["start"])
                noise = _noise(recipe, examples, cfg, info, it, begin, init, differs, workdir)
                claims.append(_verdict(it, d, noise))
        queue = queue[len(done):]
    return claims


def _noise(recipe, examples, cfg, info: dict, it: Interval, begin: Path | None, init: Path | None,
           differs: dict, workdir: Path) -> float:
    """This machine's rounding noise on an interval: the distance between our replay of it and a second
    replay from the same start with the compile decision flipped (other kernels, other rounding)."""
    flipped = dataclasses.replace(cfg, compile="off" if cfg.compile == "on" else "on")
    probe = workdir / "probe.safetensors"

    def keep(step: int, folder: Path) -> bool:
        if step == it.end:
            shutil.copyfile(folder / WEIGHTS, probe)
            return False
        return True

    retrain(recipe.model, examples, flipped, int(info.get("seed") or 0), str(info.get("input_hash") or ""),
            it.end, start=begin, init_weights=init if begin is None else None, on_checkpoint=keep,
            workdir=workdir, label=f"noise probe {it.stage}")
    if not probe.is_file():
        raise UserError(f"the noise probe of replay {it} wrote no step-{it.end} checkpoint")
    return distance(probe, differs["ours"], differs["start"])["relative"]


def _coverage(attested: Attested, covered: list[Interval], claims: list[Claim], mode: str, seed: int) -> Claim:
    """What share of the training the verdicts cover: the steps of the intervals actually re-trained."""
    total = sum(max(attested.chain[s]) for s in attested.stages())
    steps = sum(it.steps for it in covered)
    bit = sum(1 for name, ok, why in claims if ok and why.startswith("bit for bit"))
    tol = sum(1 for name, ok, why in claims if ok and why.startswith("within"))
    how = f"mode {mode}" + (f", seed {seed}" if mode == "sample" else "")
    return ("replay coverage", bool(covered),
            f"{steps} of {total} training steps ({steps / max(1, total):.0%}) re-trained in {len(covered)} "
            f"intervals ({how}): {bit} bit for bit, {tol} within tolerance")
