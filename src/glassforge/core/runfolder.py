"""The run folder and the release: the one artifact contract every stage reads and writes.

Every file and folder name of both is named here, once; stages ask a `Run` or
a `Release` for a path and never spell a name themselves. Layout (see
docs/ARCHITECTURE.md):

    RUN/recipe.toml            the resolved recipe this run was built with
    RUN/state.json             per stage: the hash of its inputs when it last completed
    RUN/data/                  documents.jsonl, order.txt, manifest.json + manifest.jsonl, token shards
    RUN/tokenizer/             tokenizer.json, tokenizer_config.json, special_tokens_map.json
    RUN/pretrain/, RUN/sft/,   checkpoints/step_NNNNNNN/, checkpoints.jsonl, metrics.jsonl, loss.png
    RUN/rl/                    (sft: summary.json; rl: rollouts.jsonl)
    RUN/eval/                  eval.json
    RUN/release/               the Hugging Face-layout release (`Release`), with the training data itself
                               (data/documents.parquet, dropped.parquet, order.txt, conversations/), its
                               Croissant description (croissant.json) and, when signed, an OpenSSF Model
                               Signing signature over every other file (model.sig, signing_key.pub)

A training stage's checkpoints are folders `checkpoints/step_NNNNNNN/` holding
model.safetensors, optimizer.safetensors and trainer.json; trainer.json is
written last, so a folder without it is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_json
from glassforge.core.recipe import load_recipe

TRAINING_STAGES = ("pretrain", "sft", "rl")

# --------------------------------------------------------------------------- names shared by run and release

RECIPE = "recipe.toml"
STATE = "state.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
CHECKPOINT_FILES = (WEIGHTS, OPTIMIZER, TRAINER)
CHECKPOINTS = "checkpoints"
ROLLOUT_LOG = "rollouts.jsonl"  # RL: every step's prompts, completions, rewards and advantages
CHECKPOINT_LOG = "checkpoints.jsonl"  # every checkpoint ever written, with its hashes, kept or pruned since
_CHECKPOINT_RE = re.compile(r"^step_(\d{7})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_dir(stage_dir: Path, step: int) -> Path:
    return Path(stage_dir) / CHECKPOINTS / checkpoint_name(step)


def list_checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a training stage's folder, oldest first."""
    ckpts = []
    root = Path(stage_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            m = _CHECKPOINT_RE.match(p.name)
            if m and (p / TRAINER).is_file():
                ckpts.append((int(m.group(1)), p))
    return sorted(ckpts)


def latest_weights(stage_dir: Path) -> Path:
    ckpts = list_checkpoints(stage_dir)
    if not ckpts:
        raise UserError(f"{stage_dir}: no checkpoint")
    return ckpts[-1][1] / WEIGHTS


# --------------------------------------------------------------------------- the run folder


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
        if not (root / RECIPE).is_file():
            raise UserError(f"{path}: not a run folder (no {RECIPE}); create one with `glassforge build`")
        return cls(root)

    recipe = property(lambda self: self.root / RECIPE)
    state = property(lambda self: self.root / STATE)
    data = property(lambda self: self.root / "data")
    tokenizer = property(lambda self: self.root / "tokenizer")
    pretrain = property(lambda self: self.root / "pretrain")
    sft = property(lambda self: self.root / "sft")
    rl = property(lambda self: self.root / "rl")
    eval = property(lambda self: self.root / "eval")
    release = property(lambda self: self.root / "release")

    # data/
    documents = property(lambda self: self.data / "documents.jsonl")
    data_work = property(lambda self: PartFiles(self.data / "work"))  # the data stage's parts, while it runs
    order = property(lambda self: self.data / "order.txt")
    data_manifest = property(lambda self: self.data / "manifest.json")
    manifest_entries = property(lambda self: self.data / "manifest.jsonl")
    shards = property(lambda self: self.data / "shards.json")

    def split_tokens(self, split: str) -> Path:
        return self.data / f"{split}.bin"

    def split_offsets(self, split: str) -> Path:
        return self.data / f"{split}.offsets.npy"

    # tokenizer/, eval/, the training stages
    tokenizer_json = property(lambda self: self.tokenizer / TOKENIZER_JSON)
    eval_results = property(lambda self: self.eval / "eval.json")
    sft_summary = property(lambda self: self.sft / "summary.json")

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def metrics(self, stage: str) -> Path:
        return self.stage_dir(stage) / METRICS

    def loss_plot(self, stage: str) -> Path:
        return self.stage_dir(stage) / LOSS_PLOT

    rollouts = property(lambda self: self.rl / ROLLOUT_LOG)

    def load_recipe(self):
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

    def final_weights(self) -> tuple[str, Path]:
        """The weights to release: the last checkpoint of the last training stage that ran."""
        for stage in reversed(TRAINING_STAGES):
            ckpts = list_checkpoints(self.stage_dir(stage))
            if ckpts:
                return stage, ckpts[-1][1] / WEIGHTS
        raise UserError(f"{self.root}: holds no model (no pretrain or sft checkpoint); "
                        f"run `glassforge pretrain` first")


# --------------------------------------------------------------------------- the release


@dataclass(frozen=True)
class Release:
    """Paths inside a release folder (Hugging Face layout plus the files that make it checkable)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    generation_config = property(lambda self: self.root / "generation_config.json")
    weights = property(lambda self: self.root / WEIGHTS)
    tokenizer_json = property(lambda self: self.root / TOKENIZER_JSON)
    tokenizer_config = property(lambda self: self.root / TOKENIZER_CONFIG)
    model_card = property(lambda self: self.root / "README.md")
    data_card = property(lambda self: self.root / "DATA_CARD.md")
    data_lengths_plot = property(lambda self: self.root / "data_lengths.png")
    data_summary = property(lambda self: self.root / "data_summary.json")
    metrics = property(lambda self: self.root / METRICS)
    eval_results = property(lambda self: self.root / "eval.json")
    recipe = property(lambda self: self.root / RECIPE)
    manifest = property(lambda self: self.root / "manifest.json")
    attestation = property(lambda self: self.root / "attestation.json")
    rollouts = property(lambda self: self.root / f"rl_{ROLLOUT_LOG}")  # the rl stage's log, re-scored by verify
    croissant = property(lambda self: self.root / "croissant.json")  # the data pack, described in Croissant 1.1
    signature = property(lambda self: self.root / "model.sig")  # OpenSSF Model Signing: model-signing's own name
    signing_key = property(lambda self: self.root / "signing_key.pub")  # the signer's public key, signed over
    data = property(lambda self: self.root / "data")
    pack_documents = property(lambda self: self.root / "data" / "documents.parquet")
    pack_dropped = property(lambda self: self.root / "data" / "dropped.parquet")
    pack_order = property(lambda self: self.root / "data" / "order.txt")
    pack_conversations = property(lambda self: self.root / "data" / "conversations")
    trace = property(lambda self: self.root / "trace")
    trace_index = property(lambda self: self.root / "trace" / "index.json")
    replay = property(lambda self: self.root / "replay")

    def loss_plot(self, stage: str) -> Path:
        """Pretraining's curve is loss.png (what the model card shows first); other stages' are STAGE_loss.png."""
        return self.root / (LOSS_PLOT if stage == "pretrain" else f"{stage}_{LOSS_PLOT}")

    @property
    def signed_files(self) -> tuple[str, ...]:
        """Files that manifest.json cannot list: the attestation binds the manifest's hash, and the signature
        (with its public key, which `glassforge sign` adds to a finished release) signs over both."""
        return (self.attestation.name, self.signature.name, self.signing_key.name)


@dataclass(frozen=True)
class PartFiles:
    """The data stage's working folder (RUN/data/work/, on storage every worker shares): what each part's
    task wrote, named by the part's number; removed when the stage completes (see data/analyse.py)."""

    root: Path

    def entries(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.entries.jsonl"

    def documents(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.documents.jsonl"

    def arrays(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.arrays.npz"

    def signatures(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.signatures.npy"

    def result(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.json"

    # after the decisions: the part's final manifest entries and kept documents, concatenated in part order
    def final_entries(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.final.entries.jsonl"

    def kept_documents(self, i: int) -> Path:
        return self.root / f"part-{i:06d}.kept.documents.jsonl"

    # every part's final entries in part order, before write_data_manifest streams them into manifest.jsonl
    merged_entries = property(lambda self: self.root / "merged.entries.jsonl")

    # the near-duplicate search's inputs, one row per eligible document (see data/dedup.py BandTask)
    near_keys = property(lambda self: self.root / "near.keys.npy")
    near_ranks = property(lambda self: self.root / "near.ranks.npy")
    near_places = property(lambda self: self.root / "near.places.npy")


@dataclass(frozen=True)
class TraceFolder:
    """Paths inside a trace index folder (release/trace/); the format is described in release/trace_index.py."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    index = property(lambda self: self.root / "index.json")
    tokens = property(lambda self: self.root / "tokens.bin")
    suffix_array = property(lambda self: self.root / "sa.bin")
    buckets = property(lambda self: self.root / "buckets.npy")
    doc_offsets = property(lambda self: self.root / "doc_offsets.npy")
    documents = property(lambda self: self.root / "documents.jsonl")
    documents_index = property(lambda self: self.root / "documents.idx.npy")

    def shard(self, k: int) -> Path:
        """A sharded index's shard k: a folder in this same layout."""
        return self.root / f"shard-{k:03d}"

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file index.json lists with its sha256 and size."""
        return (self.tokens, self.suffix_array, self.buckets, self.doc_offsets, self.documents, self.documents_index)


def resolve_release(path: Path | str) -> Path:
    """A run folder or its release/: the folder that holds the model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    for candidate in (path, path / "release"):
        release = Release(candidate)
        if release.config.is_file() and release.weights.is_file():
            return candidate
    raise UserError(f"{path}: holds no model (no release/ with config.json and {WEIGHTS}); "
                    f"run `glassforge build` first")
