"""The `release` stage: a folder anyone can load with the tools they already have.

Hugging Face layout: `config.json` (LlamaForCausalLM), `model.safetensors`,
`generation_config.json`, the tokenizer files with the chat template, a model
card `README.md`, `metrics.jsonl`, `loss.png`, and `manifest.json`: the sha256
and size of every file, so any change to any file is detectable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from glassforge import __version__
from glassforge.errors import UserError
from glassforge.model import Llama, ModelConfig
from glassforge.runfolder import Run, atomic_write_dir, atomic_write_json, atomic_write_text, sha256_file


def write_model_folder(folder: Path, model_cfg: ModelConfig, weights: Path, tokenizer_dir: Path) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files into folder."""
    from glassforge.tokenizer import END, ENDOFTEXT, PAD, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    end, eot, pad = tok.token_to_id(END), tok.token_to_id(ENDOFTEXT), tok.token_to_id(PAD)
    atomic_write_json(folder / "config.json", model_cfg.to_hf(eos_token_id=[end, eot], pad_token_id=pad))
    atomic_write_json(folder / "generation_config.json", {
        "eos_token_id": [end, eot], "pad_token_id": pad, "do_sample": False, "max_new_tokens": 256})
    shutil.copyfile(weights, folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)


def file_manifest(folder: Path) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
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


def model_card(run: Run, stage: str) -> str:
    from glassforge.train import read_metrics

    recipe = run.load_recipe()
    data_manifest = json.loads((run.data / "manifest.json").read_text()) if (run.data / "manifest.json").is_file() else {}
    summary = data_manifest.get("summary", {})
    licenses = sorted({s.license for s in recipe.data.sources})
    pre = read_metrics(run.pretrain / "metrics.jsonl")
    sft = read_metrics(run.sft / "metrics.jsonl")
    evals = json.loads((run.eval / "eval.json").read_text()) if (run.eval / "eval.json").is_file() else None
    n_params = Llama(recipe.model).num_params(non_embedding=False)

    def last(rows, key):
        vals = [r[key] for r in rows if key in r]
        return f"{vals[-1]:.4f}" if vals else "n/a"

    lines = [
        "---",
        f"license: {licenses[0].lower() if len(licenses) == 1 else 'other'}",
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
        f"AdamW, peak learning rate {recipe.pretrain.lr}, {recipe.pretrain.schedule} schedule; "
        f"final train loss {last(pre, 'loss')}, validation loss {last(pre, 'val_loss')} "
        f"({last(pre, 'val_bpb')} bits per byte).",
    ]
    if sft:
        lines.append(f"- Chat fine-tuning: {recipe.sft.steps} steps on {', '.join(recipe.sft.conversations)}; "
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
        "Or serve it with an OpenAI-compatible API: `glassforge serve path/to/release`.",
        "",
        "## Intended use and limits",
        "",
        "A small model for learning, teaching and auditing how a language model comes from its data. "
        "It knows only what its training documents say, makes mistakes confidently, and is not fit for "
        "decisions that matter.",
        "",
    ]
    return "\n".join(lines)


def run_release(run: Run) -> dict:
    recipe = run.load_recipe()
    stage, weights = final_weights(run)

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
                shutil.copyfile(run.root / src_stage / "loss.png", tmp / ("loss.png" if src_stage == "pretrain" else "sft_loss.png"))
        atomic_write_text(tmp / "README.md", model_card(run, stage))
        atomic_write_text(tmp / "recipe.toml", run.recipe.read_text())
        atomic_write_json(tmp / "manifest.json", {"glassforge_version": __version__, "recipe_sha256": recipe.hash(),
                                                  "files": file_manifest(tmp)})

    atomic_write_dir(run.release, fill)
    return {"release": str(run.release), "weights_from": stage,
            "model_sha256": sha256_file(run.release / "model.safetensors")}
