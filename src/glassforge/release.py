"""The `release` stage: a folder anyone can load with the tools they already have, and check.

Hugging Face layout: `config.json` (LlamaForCausalLM), `model.safetensors`,
`generation_config.json`, the tokenizer files with the chat template, a model
card `README.md`, `DATA_CARD.md`, `metrics.jsonl`, `loss.png`, `recipe.toml`,
`manifest.json` (the sha256 and size of every file) and `attestation.json`, an
in-toto Statement binding the weights to their data, recipe, code and
checkpoints (see attest.py), optionally signed (`attestation.dsse.json`).

Replay: for each training stage (pretrain, sft) the release also carries the
checkpoint that starts its last kept interval (`replay/STAGE/step_N/`: weights,
optimiser and trainer state, a few times the model's size), so `glassforge
verify --replay --data RUN` can re-train those intervals from the documents
alone and compare the results bit for bit with the attested checkpoints; the
fine-tuning interval ends at the released weights themselves. With fewer than
two kept checkpoints a stage replays from step 0 (fine-tuning then needs
pretraining's final weights, carried as `replay/sft/init/model.safetensors`).

Nothing here or in `verify` loads pickle or uses `torch.load`: weights and
optimiser state are safetensors, everything else is JSON or text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from glassforge import __version__
from glassforge.errors import UserError
from glassforge.model import ModelConfig
from glassforge.runfolder import (Run, atomic_write_bytes, atomic_write_dir, atomic_write_json, atomic_write_text,
                                  canonical_json, copy_file, hashing_once, sha256_bytes, sha256_file)


def write_model_folder(folder: Path, model_cfg: ModelConfig, weights: Path, tokenizer_dir: Path) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files into folder."""
    from glassforge.tokenizer import END, ENDOFTEXT, PAD, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    end, eot, pad = tok.token_to_id(END), tok.token_to_id(ENDOFTEXT), tok.token_to_id(PAD)
    atomic_write_json(folder / "config.json", model_cfg.to_hf(eos_token_id=[end, eot], pad_token_id=pad))
    atomic_write_json(folder / "generation_config.json", {
        "eos_token_id": [end, eot], "pad_token_id": pad, "do_sample": False, "max_new_tokens": 256})
    copy_file(weights, folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        copy_file(tokenizer_dir / name, folder / name)


def file_manifest(folder: Path) -> dict:
    """sha256 and size of every file under folder except the top-level manifest.json."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.relative_to(folder).as_posix() != "manifest.json":
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def final_weights(run: Run) -> tuple[str, Path]:
    """The weights to release: SFT's last checkpoint if SFT ran, else pretraining's."""
    from glassforge.train import list_checkpoints

    for stage, folder in (("sft", run.sft), ("pretrain", run.pretrain)):
        ckpts = list_checkpoints(folder)
        if ckpts:
            return stage, ckpts[-1][1] / "model.safetensors"
    raise UserError(f"{run.root}: holds no model (no pretrain or sft checkpoint); run `glassforge pretrain` first")


def _count_params(weights: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# Licence identifiers the Hugging Face Hub knows; anything else is `other` with its own name.
HUB_LICENSES = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
                "cc-by-nc-4.0", "gpl-2.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "odc-by", "odbl", "unlicense"}


def hub_license_lines(licenses: list[str]) -> list[str]:
    if len(licenses) == 1 and licenses[0].lower() in HUB_LICENSES:
        return [f"license: {licenses[0].lower()}"]
    return ["license: other", f"license_name: {'-'.join(l.lower() for l in licenses) or 'unknown'}"]


def optimizer_words(cfg) -> str:
    """The optimiser of a training section, as the model card states it."""
    if cfg.optimizer == "muon":
        return (f"Muon for the hidden matrices (peak learning rate {cfg.muon_lr}) and AdamW for embeddings and "
                f"norms (peak learning rate {cfg.lr})")
    return f"AdamW, peak learning rate {cfg.lr}"


def model_card(run: Run, stage: str) -> str:
    from glassforge.train import read_metrics

    recipe = run.load_recipe()
    data_manifest = json.loads((run.data / "manifest.json").read_text()) if (run.data / "manifest.json").is_file() else {}
    summary = data_manifest.get("summary", {})
    licenses = sorted({s.license for s in recipe.data.sources})
    pre = read_metrics(run.pretrain / "metrics.jsonl")
    sft = read_metrics(run.sft / "metrics.jsonl")
    evals = json.loads((run.eval / "eval.json").read_text()) if (run.eval / "eval.json").is_file() else None
    n_params = _count_params(final_weights(run)[1])

    def last(rows, key):
        vals = [r[key] for r in rows if key in r]
        return f"{vals[-1]:.4f}" if vals else "n/a"

    lines = [
        "---",
        *hub_license_lines(licenses),
        "language:\n- en",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:\n- glassforge\n- llama\n- open-data",
        "datasets:\n" + "\n".join(f"- {s.name}" for s in recipe.data.sources),
        "---",
        "",
        f"# glassforge `{recipe.name}` model",
        "",
        f"{recipe.description}",
        "",
        "Every step that made this model is public and checkable: the documents it was trained on "
        "(`DATA_CARD.md`, and each document's hash in the run's data manifest), the recipe, the training "
        "log (`metrics.jsonl`) and the hash of every file here (`manifest.json`).",
        "",
        "## Model",
        "",
        f"- Architecture: Llama (LlamaForCausalLM), {n_params:,} parameters; d_model {recipe.model.d_model}, "
        f"{recipe.model.n_layers} layers, {recipe.model.n_heads} heads ({recipe.model.n_kv_heads} key/value heads), "
        f"context {recipe.model.max_seq_len} tokens, vocabulary {recipe.model.vocab_size}.",
        f"- Released weights: the last `{stage}` checkpoint.",
        f"- Built with glassforge {__version__}.",
        "",
        "## Data",
        "",
        "| source | licence | weight |",
        "|---|---|---|",
        *[f"| {s.name} ({s.kind}) | {s.license} | {s.weight} |" for s in recipe.data.sources],
        "",
        f"Documents kept: {summary.get('documents_kept', 'n/a')} of {summary.get('documents_seen', 'n/a')} "
        f"({summary.get('train_documents', 'n/a')} train, {summary.get('val_documents', 'n/a')} validation), "
        f"{summary.get('bytes_kept', 0):,} bytes.",
        "",
        "## Training",
        "",
        f"- Pretraining: {recipe.pretrain.steps} steps of {recipe.pretrain.batch_tokens} tokens, "
        f"{optimizer_words(recipe.pretrain)}, {recipe.pretrain.schedule} schedule; "
        f"final train loss {last(pre, 'loss')}, validation loss {last(pre, 'val_loss')} "
        f"({last(pre, 'val_bpb')} bits per byte).",
    ]
    if sft:
        lines.append(f"- Chat fine-tuning: {recipe.sft.steps} steps on {', '.join(recipe.sft.conversations)}, "
                     f"{optimizer_words(recipe.sft)}; "
                     f"final train loss {last(sft, 'loss')}, held-out assistant-token loss {last(sft, 'val_loss')}.")
    lines += ["", "![loss curve](loss.png)", ""]
    if evals:
        from glassforge.evaluate import results_table

        lines += ["## Evaluation", "", results_table(evals), ""]
    lines += [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("path/to/release")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/release")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],',
        "                              add_generation_prompt=True, return_tensors=\"pt\")",
        "print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "Or serve it with an OpenAI-compatible API: `glassforge serve path/to/release`, or export it for "
        "llama.cpp: `glassforge export path/to/release --format gguf --out model.gguf`.",
        "",
        "## Verify it",
        "",
        "`manifest.json` holds the sha256 of every file here; `attestation.json` is an in-toto Statement whose "
        "subject is the weights and whose predicate binds the data's Merkle root, the data order, the tokenizer, "
        "the recipe, the code version, the dependency lock and the chain of kept checkpoints.",
        "",
        "```",
        "glassforge verify path/to/release                          # every file and every link",
        "glassforge verify path/to/release --data RUN --replay      # also the documents, and re-train the last interval",
        "```",
        "",
        f"- Weights (`model.safetensors`) sha256: `{sha256_file(final_weights(run)[1])}`",
        f"- Data mix Merkle root (training order): `{(data_manifest.get('merkle') or {}).get('mix', 'n/a')}`",
        f"- Data order (`order.txt`) sha256: `{data_manifest.get('order_sha256', 'n/a')}`",
        "",
        "## Intended use and limits",
        "",
        "A small model for learning, teaching and auditing how a language model comes from its data. "
        "It knows only what its training documents say, makes mistakes confidently, and is not fit for "
        "decisions that matter.",
        "",
    ]
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing; run the stage that writes it first")
    return json.loads(path.read_text())


def folder_sha256(folder: Path) -> str | None:
    """One hash for a folder: of the sorted map of its files' relative paths to their sha256."""
    if not folder.is_dir():
        return None
    return sha256_bytes(canonical_json({p.relative_to(folder).as_posix(): sha256_file(p)
                                        for p in sorted(folder.rglob("*")) if p.is_file()}))


def _trained(folder: Path) -> dict | None:
    from glassforge.train import list_checkpoints

    ckpts = list_checkpoints(folder)
    if not ckpts:
        return None
    meta = json.loads((ckpts[-1][1] / "trainer.json").read_text())
    # env: how it ran (world size, threads, dtype, compile, torch), which bit-for-bit replay needs to match
    return {"steps": meta["step"], "tokens": meta.get("tokens"), "env": meta.get("env")}


def replay_intervals(run: Run) -> list[dict]:
    """Per training stage, the last kept interval: the checkpoint it starts from and the one it must reach."""
    from glassforge.train import list_checkpoints

    intervals = []
    for stage in ("pretrain", "sft"):
        ckpts = list_checkpoints(run.root / stage)
        if not ckpts:
            continue
        start = ckpts[-2] if len(ckpts) >= 2 else None
        entry = {"stage": stage, "from_step": start[0] if start else 0, "to_step": ckpts[-1][0],
                 "start_checkpoint": f"replay/{stage}/step_{start[0]:07d}" if start else None,
                 "init_weights": None}
        if start is None and stage == "sft":  # from step 0, fine-tuning starts from pretraining's weights
            entry["init_weights"] = "replay/sft/init/model.safetensors"
        intervals.append(entry)
    return intervals


def _copy_replay_files(run: Run, tmp: Path, intervals: list[dict]) -> None:
    from glassforge.train import list_checkpoints

    for it in intervals:
        if it["start_checkpoint"]:
            src = run.root / it["stage"] / "checkpoints" / Path(it["start_checkpoint"]).name
            dest = tmp / it["start_checkpoint"]
            dest.mkdir(parents=True)
            for name in ("model.safetensors", "optimizer.safetensors", "trainer.json"):
                copy_file(src / name, dest / name)
        if it["init_weights"]:
            (tmp / it["init_weights"]).parent.mkdir(parents=True, exist_ok=True)
            copy_file(list_checkpoints(run.pretrain)[-1][1] / "model.safetensors", tmp / it["init_weights"])


def attestation_predicate(run: Run, replay: list[dict], manifest_sha256: str, trace_sha256: str | None) -> dict:
    """Everything the attestation binds, read from the run folder."""
    from glassforge.attest import checkpoint_chain, code_version, dependency_lock, platform_info
    from glassforge.data import load_manifest
    from glassforge.train import list_checkpoints

    recipe = run.load_recipe()
    data_manifest = load_manifest(run)
    data_manifest.pop("documents", None)
    merkle = data_manifest.get("merkle") or {}
    if not merkle.get("mix"):
        raise UserError(f"{run.data}/manifest.json: has no Merkle roots (made by an older glassforge); "
                        f"run `glassforge data {run.root}` again")
    shards = _read_json(run.data / "shards.json")
    tokenizer_sha = sha256_file(run.tokenizer / "tokenizer.json")
    if shards.get("tokenizer_sha256") != tokenizer_sha:
        raise UserError(f"{run.data}/shards.json: made with another tokenizer than {run.tokenizer}; "
                        f"run `glassforge shards {run.root}` again")
    order_sha = data_manifest.get("order_sha256")
    if shards.get("order_sha256") != order_sha:
        raise UserError(f"{run.data}/shards.json: made from another order.txt than the manifest's; "
                        f"run `glassforge shards {run.root}` again")
    stages = [(name, list_checkpoints(run.root / name)) for name in ("pretrain", "sft")]
    stages = [(name, ckpts) for name, ckpts in stages if ckpts]
    return {
        "recipe": {"name": recipe.name, "sha256": recipe.hash(), "file": "recipe.toml"},
        "data": {"mix_merkle_root": merkle["mix"], "source_merkle_roots": merkle.get("sources", {}),
                 "merkle_construction": merkle.get("construction"), "merkle_leaves": merkle.get("leaves"),
                 "order_sha256": order_sha, "seed": data_manifest.get("seed", recipe.seed),
                 "train_order_entries": len(shards.get("train", {}).get("documents", [])),
                 "train_tokens": shards.get("train", {}).get("tokens")},
        "tokenizer": {"sha256": tokenizer_sha, "file": "tokenizer.json"},
        "code": code_version(),
        "dependency_lock": dependency_lock(),
        "platform": platform_info(),
        "training": {name: _trained(run.root / name) for name, _ in stages},
        "checkpoints": checkpoint_chain(stages),
        "replay": replay,
        "trace_index": {"sha256": trace_sha256, "folder": "trace"} if trace_sha256 else None,
        "release": {"manifest_sha256": manifest_sha256},
    }


@hashing_once()  # the card, the manifest and the checkpoint chain each ask for the same weights' hash
def run_release(run: Run, sign_key: Path | None = None) -> dict:
    """Assemble RUN/release/: the model in Hugging Face layout, cards, manifest and attestation.

    For each training stage the release carries the checkpoint that starts its
    last kept interval (weights, optimiser and trainer state, under replay/), so
    `glassforge verify --replay --data RUN` needs only the documents.
    """
    from glassforge.attest import SIGNED_FILES, sign, statement, statement_bytes
    from glassforge.data import write_data_card

    recipe = run.load_recipe()
    stage, weights = final_weights(run)
    if sign_key is not None:
        sign(b"", Path(sign_key))  # a bad key fails now, before any work
    replay = replay_intervals(run)
    released: dict = {}

    def fill(tmp: Path) -> None:
        write_model_folder(tmp, recipe.model, weights, run.tokenizer)
        # One log for the whole run: pretraining rows, then fine-tuning rows, tagged by stage.
        rows = []
        for src_stage in ("pretrain", "sft"):
            path = run.root / src_stage / "metrics.jsonl"
            if path.is_file():
                rows += [json.dumps({"stage": src_stage, **json.loads(l)}) for l in path.read_text().splitlines() if l.strip()]
        atomic_write_text(tmp / "metrics.jsonl", "".join(r + "\n" for r in rows))
        for src_stage in ("pretrain", "sft"):
            if (run.root / src_stage / "loss.png").is_file():
                copy_file(run.root / src_stage / "loss.png", tmp / ("loss.png" if src_stage == "pretrain" else "sft_loss.png"))
        atomic_write_text(tmp / "README.md", model_card(run, stage))
        write_data_card(run, tmp)  # DATA_CARD.md and its figure, by the data stage
        atomic_write_text(tmp / "recipe.toml", run.recipe.read_text())
        _copy_replay_files(run, tmp, replay)
        from glassforge.trace import build_index

        build_index(run.data, tmp / "trace")  # after tokenizer.json is in place: the index records its hash
        trace_sha = folder_sha256(tmp / "trace")
        files = {k: v for k, v in file_manifest(tmp).items() if k not in SIGNED_FILES}
        atomic_write_json(tmp / "manifest.json", {"glassforge_version": __version__, "recipe_sha256": recipe.hash(),
                                                  "weights_from": stage, "files": files})
        predicate = attestation_predicate(run, replay, sha256_file(tmp / "manifest.json"), trace_sha)
        released["sha256"] = files["model.safetensors"]["sha256"]
        payload = statement_bytes(statement(released["sha256"], predicate))
        atomic_write_bytes(tmp / "attestation.json", payload)
        if sign_key is not None:
            envelope, public = sign(payload, Path(sign_key))
            atomic_write_json(tmp / "attestation.dsse.json", envelope)
            atomic_write_bytes(tmp / "signing_key.pub", public)

    atomic_write_dir(run.release, fill)
    return {"release": str(run.release), "weights_from": stage,
            "model_sha256": released["sha256"], "signed": sign_key is not None}
