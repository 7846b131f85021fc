"""The `release` stage: a folder anyone can load with the tools they already have, and check.

Hugging Face layout: `config.json` (LlamaForCausalLM), `model.safetensors`,
`generation_config.json`, the tokenizer files with the chat template, a model
card `README.md`, `DATA_CARD.md`, `metrics.jsonl`, `loss.png`, `recipe.toml`,
`croissant.json` (the training data in MLCommons Croissant, croissant.py),
`manifest.json` (the sha256 and size of every file) and `attestation.json`, an
in-toto Statement binding the weights to their data, recipe, code and
checkpoints (see attest.py). With a signing key, an OpenSSF Model Signing
signature over every file (`model.sig`, signing.py) is written last, once the
folder is in place, so it names the folder `release`.

The release also carries what a stranger needs to re-train it: the data pack
(`data/`: every training document's text, the dropped ones' hashes and
reasons, the training order, the conversation files; see datapack.py), and
every checkpoint the run kept (`replay/STAGE/step_N/`: weights, optimiser and
trainer state), but the last one of the last stage, whose weights are the
released model itself. So `glassforge verify --data --replay` needs nothing
but this folder: a replay starts from step 0 (the seed's initial weights) or
from a carried checkpoint, and its end is compared bit for bit with the
attested hashes of every checkpoint the run ever wrote (the stages'
checkpoints.jsonl), or, on another platform, by distance to the carried
weights. Which checkpoints a run keeps is the recipe's `keep_last` and
`keep_every`: more kept checkpoints mean a larger release and more intervals a
verifier can sample.

Nothing here or in `verify` loads pickle or uses `torch.load`: weights and
optimiser state are safetensors, everything else is JSON or text.
"""


from __future__ import annotations

import json
from pathlib import Path

from glassforge import __version__
from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_bytes, atomic_write_dir, atomic_write_json, atomic_write_text
from glassforge.core.hashing import copy_file, hashing_once, sha256_file
from glassforge.core.manifest import file_manifest, folder_sha256
from glassforge.core.recipe import ModelConfig
from glassforge.core.runfolder import (
    OPTIMIZER,
    TOKENIZER_FILES,
    TRAINER,
    TRAINING_STAGES,
    WEIGHTS,
    Release,
    Run,
    checkpoint_name,
    list_checkpoints,
)
from glassforge.data.card import write_data_card
from glassforge.release.attest import attestation_predicate, statement, statement_bytes, validate_statement
from glassforge.release.card import model_card
from glassforge.release.croissant import write_croissant
from glassforge.release.datapack import write_pack
from glassforge.release.signing import load_private_key, sign_release
from glassforge.release.trace_index import build_index
from glassforge.tokenizer.bpe import END, ENDOFTEXT, PAD, load_tokenizer


def write_model_folder(folder: Path, model_cfg: ModelConfig, weights: Path, tokenizer_dir: Path) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files into folder."""
    tok = load_tokenizer(tokenizer_dir)
    end, eot, pad = tok.token_to_id(END), tok.token_to_id(ENDOFTEXT), tok.token_to_id(PAD)
    release = Release(folder)
    atomic_write_json(release.config, model_cfg.to_hf(eos_token_id=[end, eot], pad_token_id=pad))
    atomic_write_json(release.generation_config, {
        "eos_token_id": [end, eot], "pad_token_id": pad, "do_sample": False, "max_new_tokens": 256})
    copy_file(weights, release.weights)
    for name in TOKENIZER_FILES:
        copy_file(tokenizer_dir / name, folder / name)


def carried_checkpoints(run: Run) -> list[dict]:
    """The kept checkpoints the release carries under replay/: all but the released weights' own."""
    stages = [(stage, list_checkpoints(run.stage_dir(stage))) for stage in TRAINING_STAGES]
    stages = [(stage, ckpts) for stage, ckpts in stages if ckpts]
    carried = []
    for i, (stage, ckpts) in enumerate(stages):
        for step, path in ckpts:
            if i == len(stages) - 1 and step == ckpts[-1][0]:
                continue  # the released model.safetensors: its optimiser state starts no interval
            carried.append({"stage": stage, "step": step, "folder": f"replay/{stage}/{checkpoint_name(step)}",
                            "source": path})
    return carried


def _copy_carried(tmp: Path, carried: list[dict]) -> None:
    for c in carried:
        dest = tmp / c["folder"]
        dest.mkdir(parents=True)
        for name in (WEIGHTS, OPTIMIZER, TRAINER):
            copy_file(c["source"] / name, dest / name)


def _build_trace_index(run: Run, recipe, out: Path) -> dict:
    """The trace index, in `[release] trace_shards` shards built on the data stage's executor."""
    shards = recipe.release.trace_shards
    if shards < 1:
        raise UserError(f"release.trace_shards: must be >= 1, got {shards}")
    if shards == 1:
        return build_index(run, out)
    from glassforge.data.executor import make_executor

    with make_executor(recipe.data.executor, recipe.data.workers, recipe.data.ray_address) as executor:
        return build_index(run, out, shards=shards, executor=executor)


@hashing_once()  # the card, the manifest and the checkpoint chain each ask for the same weights' hash
def run_release(run: Run, sign_key: Path | None = None) -> dict:
    """Assemble RUN/release/: the model in Hugging Face layout, cards, manifest and attestation.

    The release carries its training data (data/) and its kept checkpoints (replay/), so `glassforge
    verify --data --replay` needs nothing else.
    """
    recipe = run.load_recipe()
    stage, weights = run.final_weights()
    if sign_key is not None:
        load_private_key(Path(sign_key), "--sign-key")  # a bad key fails now, before any work
    carried = carried_checkpoints(run)
    released: dict = {}

    def fill(tmp: Path) -> None:
        out = Release(tmp)
        write_model_folder(tmp, recipe.model, weights, run.tokenizer)
        # One log for the whole run: pretraining rows, then fine-tuning's, then RL's, tagged by stage.
        rows = []
        for src_stage in TRAINING_STAGES:
            path = run.metrics(src_stage)
            if path.is_file():
                rows += [json.dumps({"stage": src_stage, **json.loads(line)})
                         for line in path.read_text().splitlines() if line.strip()]
            if run.loss_plot(src_stage).is_file():
                copy_file(run.loss_plot(src_stage), out.loss_plot(src_stage))
        atomic_write_text(out.metrics, "".join(r + "\n" for r in rows))
        atomic_write_text(out.model_card, model_card(run))
        write_data_card(run, tmp)  # DATA_CARD.md, its figure and data_summary.json, by the data stage
        atomic_write_text(out.recipe, run.recipe.read_text())
        if run.eval_results.is_file():
            copy_file(run.eval_results, out.eval_results)
        if run.rollouts.is_file():  # RL's every rollout: what verify re-scores
            copy_file(run.rollouts, out.rollouts)
        _copy_carried(tmp, carried)
        pack = write_pack(run, tmp)
        write_croissant(run, tmp, pack)
        # After tokenizer.json is in place: the index records its hash.
        trace_info = _build_trace_index(run, recipe, out.trace)
        trace_sha = folder_sha256(out.trace)
        files = file_manifest(tmp, exclude=(out.manifest.name, *out.signed_files))
        atomic_write_json(out.manifest, {"glassforge_version": __version__, "recipe_sha256": recipe.hash(),
                                         "weights_from": stage, "files": files})
        predicate = attestation_predicate(run, [{k: c[k] for k in ("stage", "step", "folder")} for c in carried],
                                          pack, sha256_file(out.manifest), trace_sha,
                                          [{k: s[k] for k in ("folder", "index_sha256")}
                                           for s in trace_info.get("shards", [])])
        released["sha256"] = files[WEIGHTS]["sha256"]
        stmt = statement(released["sha256"], predicate)
        why = validate_statement(stmt)
        if why:  # a predicate in-toto's bindings cannot carry (a value JSON has but protobuf's Struct has not)
            raise UserError(f"{out.attestation.name}: not a valid in-toto Statement v1 ({why})")
        atomic_write_bytes(out.attestation, statement_bytes(stmt))

    atomic_write_dir(run.release, fill)
    signed = sign_release(run.release, Path(sign_key), "--sign-key") if sign_key is not None else None
    return {"release": str(run.release), "weights_from": stage, "model_sha256": released["sha256"],
            "signed": signed is not None, **({"signature": signed} if signed else {})}
