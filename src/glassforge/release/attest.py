"""The attestation: one signed statement of what the released weights came from.

`attestation.json` is an in-toto Statement v1 (https://in-toto.io/Statement/v1).
Its subject is `model.safetensors` by sha256; its predicate binds the data
mix's Merkle root (and each source's, as the data stage computed them over the
training order: see `glassforge.data.merkle_root`), the data-order hash, the tokenizer's hash, the resolved
recipe's hash, the code version, the dependency lock's hash, the steps and
tokens trained, the chain of kept checkpoints, and the hash of the release's
`manifest.json` (which lists the sha256 of every other file). So one digest
reaches every byte of the release: signature -> statement -> manifest -> files.

The checkpoint chain is a hash chain: each kept checkpoint's `link` is the
sha256 of its own hashes and the previous checkpoint's link, across stages (the
first fine-tuning checkpoint links to pretraining's last), so dropping,
reordering or swapping a checkpoint breaks every link after it.

The statement is checked with the in-toto project's own bindings
(`in_toto_attestation.v1`, `validate_statement`) before it is written and by
`glassforge verify`. It is not signed on its own: the release's OpenSSF Model
Signing signature (signing.py) lists the sha256 of `attestation.json` with
every other file, so that one signature reaches the statement and, through it,
every byte.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

from glassforge import __version__
from glassforge.core.errors import UserError
from glassforge.core.hashing import canonical_json, sha256_bytes, sha256_file
from glassforge.core.manifest import read_manifest_head
from glassforge.core.runfolder import (
    RECIPE,
    TOKENIZER_JSON,
    TRAINER,
    TRAINING_STAGES,
    WEIGHTS,
    Release,
    Run,
    list_checkpoints,
)
from glassforge.model.checkpoints import read_checkpoint_log
from glassforge.train.device import cpu_threads

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://glassforge.dev/attestation/training/v1"


# --------------------------------------------------------------------------- provenance pieces

def package_root() -> Path:
    """The glassforge package folder (src/glassforge in a checkout)."""
    return Path(__file__).resolve().parents[1]


def repo_root() -> Path:
    """The source checkout this package runs from (src/glassforge -> repo root)."""
    return package_root().parents[1]


def source_sha256() -> str:
    """One hash of the package's own source (.py files, built-in recipes, card templates): the code that
    ran, committed or not."""
    pkg = package_root()
    files = sorted(p for p in pkg.rglob("*") if p.is_file() and p.suffix in (".py", ".toml", ".j2")
                   and "__pycache__" not in p.parts)
    return sha256_bytes(canonical_json({p.relative_to(pkg).as_posix(): sha256_file(p) for p in files}))


def code_version() -> dict:
    info: dict = {"package": "glassforge", "version": __version__, "source_sha256": source_sha256(),
                  "git_commit": None, "git_dirty": None}
    root = repo_root()
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10)
            if commit.returncode == 0:
                info["git_commit"] = commit.stdout.strip()
                status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=30)
                info["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    if info["git_commit"] is None:
        info["reason"] = "not running from a git checkout"
    return info


def dependency_lock() -> dict:
    path = repo_root() / "constraints.txt"
    if path.is_file():
        return {"file": "constraints.txt", "sha256": sha256_file(path)}
    return {"file": "constraints.txt", "sha256": None,
            "reason": "glassforge is installed without its source checkout; constraints.txt not found"}


def platform_info() -> dict:
    """What bit-for-bit replay depends on besides the inputs: software, processor, threads."""
    import torch


    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "system": platform.system(), "cpu": cpu, "cpu_threads": cpu_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def chain_link(prev: str | None, entry: dict) -> str:
    body = {k: entry[k] for k in ("stage", "step", "model_sha256", "optimizer_sha256", "trainer_sha256")}
    return sha256_bytes(canonical_json({"prev": prev, **body}))


def checkpoint_chain(stages: list[tuple[str, list[dict]]]) -> list[dict]:
    """Every checkpoint each stage wrote (its checkpoints.jsonl), in training order, each linked to the one before."""
    chain, prev = [], None
    for stage, logged in stages:
        for logged_entry in logged:
            entry = {"stage": stage, "step": logged_entry["step"],
                     **{k: logged_entry[k] for k in ("model_sha256", "optimizer_sha256", "trainer_sha256")}}
            entry["link"] = prev = chain_link(prev, entry)
            chain.append(entry)
    return chain


def check_chain(chain: list[dict]) -> str | None:
    """None if every link is right, else the first broken one, described."""
    prev = None
    for i, entry in enumerate(chain):
        try:
            link = chain_link(prev, entry)
        except (KeyError, TypeError):
            return f"checkpoint {i} is missing a field"
        if entry.get("link") != link:
            return f"{entry.get('stage')} step {entry.get('step')}: link does not follow from the entries before it"
        prev = link
    return None


# --------------------------------------------------------------------------- the predicate


def _trained(folder: Path) -> dict | None:
    ckpts = list_checkpoints(folder)
    if not ckpts:
        return None
    meta = json.loads((ckpts[-1][1] / TRAINER).read_text())
    # env: how it ran (world size, threads, dtype, compile, torch), which bit-for-bit replay needs to match;
    # seed and input_hash: what a replay from step 0 starts from and tags its checkpoints with
    return {"steps": meta["step"], "tokens": meta.get("tokens"), "env": meta.get("env"), "seed": meta.get("seed"),
            "input_hash": meta.get("recipe_hash"), "checkpoint_every": None}


def attestation_predicate(run: Run, carried: list[dict], pack: dict, manifest_sha256: str,
                          trace_sha256: str | None, trace_shards: list[dict] | None = None) -> dict:
    """Everything the attestation binds, read from the run folder; carried: the checkpoints under replay/,
    pack: what datapack.write_pack wrote; trace_shards: a sharded trace index's shards (folder, index_sha256)."""
    recipe = run.load_recipe()
    data_manifest = read_manifest_head(run)
    merkle = data_manifest.get("merkle") or {}
    if not run.shards.is_file():
        raise UserError(f"{run.shards}: missing; run `glassforge shards {run.root}` first")
    shards = json.loads(run.shards.read_text())
    tokenizer_sha = sha256_file(run.tokenizer_json)
    if shards.get("tokenizer_sha256") != tokenizer_sha:
        raise UserError(f"{run.shards}: made with another tokenizer than {run.tokenizer}; "
                        f"run `glassforge shards {run.root}` again")
    order_sha = data_manifest.get("order_sha256")
    if shards.get("order_sha256") != order_sha:
        raise UserError(f"{run.shards}: made from another order.txt than the manifest's; "
                        f"run `glassforge shards {run.root}` again")
    stages = [(name, read_checkpoint_log(run.stage_dir(name))) for name in TRAINING_STAGES]
    stages = [(name, logged) for name, logged in stages if logged]
    training = {name: _trained(run.stage_dir(name)) for name, _ in stages}
    for name in training:
        training[name]["checkpoint_every"] = getattr(recipe, name).checkpoint_every
    if "rl" in training and run.rollouts.is_file():
        training["rl"]["rollouts"] = {"file": Release(run.release).rollouts.name, "sha256": sha256_file(run.rollouts)}
    return {
        "recipe": {"name": recipe.name, "sha256": recipe.hash(), "file": RECIPE},
        "data": {"mix_merkle_root": merkle["mix"], "source_merkle_roots": merkle.get("sources", {}),
                 "merkle_construction": merkle.get("construction"), "merkle_leaves": merkle.get("leaves"),
                 "order_sha256": order_sha, "seed": data_manifest.get("seed", recipe.seed),
                 "train_order_entries": len(shards.get("train", {}).get("documents", [])),
                 "train_tokens": shards.get("train", {}).get("tokens"), "pack": pack},
        "tokenizer": {"sha256": tokenizer_sha, "file": TOKENIZER_JSON},
        "code": code_version(),
        "dependency_lock": dependency_lock(),
        "platform": platform_info(),
        "training": training,
        "checkpoints": checkpoint_chain(stages),
        "replay": {"carried": carried},
        "trace_index": {"sha256": trace_sha256, "folder": Release(run.release).trace.name,
                        **({"shards": trace_shards} if trace_shards else {})} if trace_sha256 else None,
        "release": {"manifest_sha256": manifest_sha256},
    }



# --------------------------------------------------------------------------- the statement


def attestation_summary(release: Path) -> dict | None:
    """What a page or a report shows of a release's attestation, flat; None when it has none (or none readable)."""
    try:
        stmt = json.loads(Release(release).attestation.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(stmt, dict):
        return None
    pred = stmt.get("predicate") or {}
    subject = (stmt.get("subject") or [{}])[0]
    code, data, recipe = pred.get("code") or {}, pred.get("data") or {}, pred.get("recipe") or {}
    return {
        "subject": subject.get("name"), "weights_sha256": (subject.get("digest") or {}).get("sha256"),
        "predicate_type": stmt.get("predicateType"),
        "recipe_name": recipe.get("name"), "recipe_sha256": recipe.get("sha256"),
        "tokenizer_sha256": (pred.get("tokenizer") or {}).get("sha256"),
        "mix_merkle_root": data.get("mix_merkle_root"), "order_sha256": data.get("order_sha256"),
        "train_tokens": data.get("train_tokens"),
        "code": {"version": code.get("version"), "git_commit": code.get("git_commit"), "git_dirty": code.get("git_dirty")},
        "dependency_lock_sha256": (pred.get("dependency_lock") or {}).get("sha256"),
        "platform": pred.get("platform"),
        "training": pred.get("training"),
        "checkpoints": len(pred.get("checkpoints") or []),
        "trace_index_sha256": (pred.get("trace_index") or {}).get("sha256"),
        "signed": Release(release).signature.is_file(),
    }

def statement(weights_sha256: str, predicate: dict, weights_name: str = WEIGHTS) -> dict:
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": weights_name, "digest": {"sha256": weights_sha256}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": predicate}


def validate_statement(stmt: dict) -> str | None:
    """None if in-toto's own bindings accept stmt as an in-toto Statement v1, else why not (one line)."""
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    if not isinstance(stmt, dict):
        return f"not a JSON object but {type(stmt).__name__}"
    try:
        Statement.copy_from_pb(json_format.ParseDict(stmt, statement_pb2.Statement())).validate()
    except (json_format.ParseError, ValueError, TypeError) as e:
        return str(e).splitlines()[0]
    return None


def statement_bytes(stmt: dict) -> bytes:
    return (json.dumps(stmt, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
