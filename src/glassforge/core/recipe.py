"""Recipes: TOML files that say everything a build does, and nothing else does.

A recipe is parsed into typed dataclasses; an unknown section or field, or a
value of the wrong type, is a `UserError` naming it. The resolved recipe (every
default filled in) is written to the run folder, and its hash is what later
stages and the attestation bind to.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from glassforge.core.errors import UserError
from glassforge.core.hashing import canonical_json, sha256_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # fewer than n_heads gives grouped-query attention
    d_ff: int = 0  # 0: the Llama rule, about 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not a multiple of model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # Hugging Face LlamaConfig, both ways: the release's config.json is this.
    def to_hf(self, bos_token_id: int | None = None, eos_token_id=None, pad_token_id: int | None = None) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        return cls(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            d_ff=cfg["intermediate_size"],
            max_seq_len=cfg["max_position_embeddings"],
            rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)



@dataclass
class SourceConfig:
    name: str = "pystdlib"
    kind: str = "pystdlib"  # pystdlib | files | hf
    license: str = "PSF-2.0"
    weight: float = 1.0
    path: str = ""  # files: a file or folder; hf: the dataset name
    text_field: str = "text"  # .jsonl/.json/.parquet/hf: the field holding the text
    split: str = "train"  # hf: which split
    modules: list[str] = field(default_factory=list)  # pystdlib: only these top-level modules (empty: all)
    max_documents: int = 0  # 0: no limit


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    val_fraction: float = 0.05
    min_chars: int = 16
    max_chars: int = 200_000
    max_non_text_fraction: float = 0.3
    max_repeated_line_fraction: float = 0.5
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8
    near_dedup_shingle: int = 5
    near_dedup_bands: int = 14
    near_dedup_rows: int = 8
    decontaminate: list[str] = field(default_factory=list)  # eval sets: paths of .jsonl/.json/.txt files
    decontaminate_ngram: int = 13
    # How the stage runs, not what it makes (outside the stage's input hash: every executor gives the same bytes)
    executor: str = "inprocess"  # inprocess | processes | ray
    workers: int = 0  # processes, ray: how many (0: one per core; ray: the cluster's CPUs)
    ray_address: str = ""  # ray: host:port of a running cluster ("" starts one in this process)


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class TrainConfig:
    steps: int = 1000
    seq_len: int = 256
    batch_tokens: int = 16384  # global batch in tokens; accumulation makes up the rest
    micro_batch: int = 16  # sequences per forward pass on one process
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | muon
    muon_lr: float = 0.02  # Muon's peak learning rate (hidden matrices); lr stays AdamW's for the rest
    dtype: str = "auto"  # auto (bf16 where the hardware has it) | bf16 | fp32
    compile: str = "auto"  # auto (GPUs always; CPUs for long runs, where compiling pays) | on | off
    fsdp: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    keep_every: int = 0  # also keep every Nth step's checkpoint (0: none)
    threads: int = 0  # torch threads per process (0: all cores / local world size)


@dataclass
class SFTConfig(TrainConfig):
    enabled: bool = True
    conversations: list[str] = field(default_factory=lambda: ["pystdlib-qa"])
    pretrain_mix: float = 0.0  # share of each batch's rows that are pretraining text (keeps plain-text skill)
    pack: bool = False  # several conversations a row, each attending only to itself (train/sft.py)


@dataclass
class RLConfig(TrainConfig):
    """Reinforcement learning with verifiable rewards (train/rl.py). A step takes prompts_per_step prompts,
    samples `group` completions of each, and trains on them; seq_len bounds prompt plus completion, and
    batch_tokens is prompts_per_step x seq_len (derived, whatever is written)."""

    enabled: bool = False
    prompts: list[str] = field(default_factory=lambda: ["pystdlib-names"])  # built-in sets or .jsonl files
    prompts_per_step: int = 16
    group: int = 8  # completions sampled per prompt; the group's mean reward is the baseline
    max_new_tokens: int = 48
    temperature: float = 1.0
    kl: float = 0.0  # weight of the per-token KL penalty towards the fine-tuned model (0: none)

    def __post_init__(self):
        if self.prompts_per_step < 1 or self.group < 2:
            raise ValueError(f"rl.prompts_per_step must be >= 1 and rl.group >= 2 (a group's mean is its "
                             f"baseline); got {self.prompts_per_step}, {self.group}")
        self.batch_tokens = self.prompts_per_step * self.seq_len


@dataclass
class EvalConfig:
    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: ["val-loss", "pystdlib-docmatch", "pystdlib-names"])
    limit: int = 200  # items per task, to keep evaluation short
    names_limit: int = 500  # functions per set of pystdlib-names (training modules, held-out modules)


@dataclass
class ReleaseConfig:
    # The trace index in this many document-aligned shards, each its own suffix array, built in parallel on the
    # data stage's executor (release/trace_index.py); 1 is one index over the whole stream.
    trace_shards: int = 1


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    seed: int = 1337
    measured: str = ""  # what the recipe's build measured when last timed (documentation)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=200, lr=1e-3))
    rl: RLConfig = field(default_factory=lambda: RLConfig(steps=60, lr=3e-4, seq_len=128, micro_batch=4,
                                                          warmup_steps=5, eval_every=10**9, checkpoint_every=20))
    eval: EvalConfig = field(default_factory=EvalConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    def __post_init__(self):
        # The model's vocabulary is the tokenizer's; one number, stated once.
        self.model.vocab_size = self.tokenizer.vocab_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        d = self.to_dict()
        for name, keys in RUNTIME_FIELDS.items():
            for key in keys:
                d[name].pop(key, None)
        return sha256_bytes(canonical_json({n: d[n] for n in names}))

    def hash(self) -> str:
        return sha256_bytes(canonical_json(self.to_dict()))


RUNTIME_FIELDS = {"data": ("executor", "workers", "ray_address")}


def output_fields_hash(cfg: "DataConfig") -> str:
    """The hash of the `[data]` fields that decide the stage's output (RUNTIME_FIELDS left out)."""
    d = dataclasses.asdict(cfg)
    for key in RUNTIME_FIELDS["data"]:
        d.pop(key)
    return sha256_bytes(canonical_json(d))


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a table, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where or 'recipe'}: {e}") from None


def _convert(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _wrap(raw: dict, where: str) -> Recipe:
    try:
        return _build(Recipe, raw, "")
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("glassforge.core.recipes").iterdir() if p.name.endswith(".toml"))


def resolve_recipe_path(name_or_path: str) -> tuple[str, bytes]:
    """A built-in recipe name or a path to a TOML file: (label, bytes)."""
    p = Path(name_or_path)
    if name_or_path.endswith(".toml") or p.exists():
        if not p.is_file():
            raise UserError(f"recipe {name_or_path}: no such file")
        return str(p), p.read_bytes()
    if name_or_path in builtin_recipes():
        return name_or_path, resources.files("glassforge.core.recipes").joinpath(f"{name_or_path}.toml").read_bytes()
    raise UserError(f"unknown recipe '{name_or_path}' (built in: {', '.join(builtin_recipes())}; or give a .toml path)")


def parse_recipe(data: bytes, label: str) -> Recipe:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {label}: malformed TOML: {e}") from None
    return _wrap(raw, f"recipe {label}")


def load_recipe(name_or_path: str | Path) -> Recipe:
    label, data = resolve_recipe_path(str(name_or_path))
    return parse_recipe(data, label)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as TOML (every default written out)."""
    return tomli_w.dumps(recipe.to_dict())
