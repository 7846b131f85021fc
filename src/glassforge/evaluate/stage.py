"""The `eval` stage: numbers anyone can reproduce, on data the model never trained on.

Tasks:
- `val-loss`: loss and bits per byte on the validation split, per source.
- `pystdlib-docmatch` (built in): for a function from the validation split
  (never seen in pretraining or fine-tuning), which of four docstring first
  lines belongs to its signature? Scored by log-likelihood, like the field's
  multiple-choice tasks.
- a local JSONL path ending in `.jsonl`: multiple choice when lines have
  `question`, `choices` and `answer` (index); generation with exact match when
  lines have `prompt` and `answer` (a string).

Multiple choice follows lm-evaluation-harness: the context is
"Question: {question}\nAnswer:", each choice is " {choice}"; `acc` picks the
highest summed log-probability, `acc_norm` divides by the choice's length in
bytes. Items sharing a 13-gram of tokens with the training stream are removed
first (decontamination), and the count is reported.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_json
from glassforge.core.runfolder import Run, latest_weights
from glassforge.data.documents import iter_documents
from glassforge.evaluate.names import mcnemar, name_prompts, score_names
from glassforge.evaluate.scoring import (
    TrainingNgrams,
    decontaminate,
    docmatch_items,
    read_task_jsonl,
    score_docmatch,
    score_generation,
    score_multiple_choice,
)
from glassforge.model.hf import load_weights
from glassforge.model.llama import Llama
from glassforge.tokenizer.bpe import load_tokenizer
from glassforge.tokenizer.shards import TokenStream
from glassforge.train.rewards import reward_table
from glassforge.train.sft import sft_summary

BUILTIN_TASKS = ("val-loss", "pystdlib-docmatch", "pystdlib-names")


def val_loss_by_source(model, run: Run, seq_len: int, max_windows: int = 128) -> dict:
    """Loss and bits per byte over up to max_windows windows of each source's validation tokens.

    128 windows is what pretraining validates on (eval_batches x micro_batch in
    the default recipe), so for a one-source run the base model's figure here
    matches pretraining's last validation loss up to precision (f32 here,
    bf16 autocast there); fewer windows made the card's figure a noisy sample.
    """
    stream = TokenStream(run, "val")
    docs = {d["id"]: d for d in iter_documents(run, "val")}
    by_source: dict[str, list[int]] = {}
    for i, doc_id in enumerate(stream.doc_ids):
        by_source.setdefault(doc_id.split(":", 1)[0], []).append(i)
    out = {}
    for source, idxs in sorted(by_source.items()):
        tokens = np.concatenate([np.asarray(stream.tokens[stream.offsets[i]: stream.offsets[i + 1]]) for i in idxs])
        n_bytes = sum(len(docs[stream.doc_ids[i]]["text"].encode()) for i in idxs)
        windows = min(max_windows, (len(tokens) - 1) // seq_len)
        if windows < 1:
            continue
        x = torch.from_numpy(tokens[: windows * seq_len + 1].astype(np.int64))
        total = 0.0
        rows = x[: windows * seq_len].view(windows, seq_len)
        targets = x[1: windows * seq_len + 1].view(windows, seq_len)
        with torch.inference_mode():
            for w in range(0, windows, 16):
                _, loss = model(rows[w: w + 16], targets[w: w + 16], reduction="sum")
                total += float(loss)
        used = windows * seq_len
        loss = total / used
        bytes_per_token = n_bytes / max(1, len(tokens))
        out[source] = {"tokens": used, "loss": loss, "bpb": loss / math.log(2) / bytes_per_token}
    return out


def evaluate_model(run: Run, model: Llama, tasks: list[str], limit: int) -> dict:
    """Every task's scores for one model, with what decontamination removed."""
    recipe = run.load_recipe()
    tok = load_tokenizer(run.tokenizer)
    ngrams = TrainingNgrams(np.asarray(TokenStream(run, "train").tokens), recipe.data.decontaminate_ngram)
    results: dict = {"tasks": {}, "decontamination": {"ngram": ngrams.n, "removed": {}}}
    for task in tasks:
        if task == "val-loss":
            results["tasks"][task] = val_loss_by_source(model, run, recipe.pretrain.seq_len)
        elif task == "pystdlib-docmatch":
            items = docmatch_items(iter_documents(run, "val"), recipe.seed, limit * 2)
            items, removed = decontaminate(items, tok, ngrams)
            results["decontamination"]["removed"][task] = removed
            results["tasks"][task] = score_docmatch(model, tok, items[:limit])
        elif task == "pystdlib-names":
            results["tasks"][task] = names_task(run, model, tok)
        elif task.endswith(".jsonl"):
            kind, items = read_task_jsonl(Path(task))
            items, removed = decontaminate(items, tok, ngrams)
            results["decontamination"]["removed"][task] = removed
            items = items[:limit]
            results["tasks"][task] = (score_multiple_choice(model, tok, items) if kind == "multiple_choice"
                                      else score_generation(model, tok, items))
        else:
            raise UserError(f"eval: unknown task '{task}' (built in: {', '.join(BUILTIN_TASKS)}; or a .jsonl path)")
    return results


def run_eval(run: Run, tasks: str | None = None) -> dict:
    """Evaluate the run's final weights (SFT's if it ran, else the base model's) into eval/eval.json."""
    recipe = run.load_recipe()
    stage, weights = run.final_weights()
    task_list = [t.strip() for t in tasks.split(",")] if tasks else recipe.eval.tasks
    results = evaluate_model(run, load_model(recipe.model, weights), task_list, recipe.eval.limit)
    if stage != "pretrain" and "val-loss" in task_list:
        # Fine-tuning trades some language modelling for chat; show both sides of the trade.
        base = load_model(recipe.model, latest_weights(run.pretrain))
        results["tasks"]["val-loss (base model)"] = val_loss_by_source(base, run, recipe.pretrain.seq_len)
    if stage == "rl" and "pystdlib-names" in task_list:
        # what RL changed, on the same prompts, item by item
        before = names_task(run, load_model(recipe.model, latest_weights(run.sft)), load_tokenizer(run.tokenizer))
        after = results["tasks"]["pystdlib-names"]
        results["tasks"]["pystdlib-names (before RL)"] = before
        results["rl"] = {which: {metric: mcnemar(before[which]["outcomes"][metric], after[which]["outcomes"][metric])
                                 for metric in ("name", "signature")} for which in after}
    results["model"] = stage
    summary = sft_summary(run)
    if summary:
        results["sft"] = {"base_val_loss": summary["base_val_loss"], "val_loss": summary["val_loss"]}
    atomic_write_json(run.eval_results, results)
    return {"eval": str(run.eval_results), "tasks": list(results["tasks"])}


def names_task(run: Run, model: Llama, tok) -> dict:
    """pystdlib-names on both sets (evaluate/names.py): the training modules' functions and the held-out ones'."""
    recipe = run.load_recipe()
    table = reward_table(iter_documents(run))
    return {which: score_names(model, tok, items, table)
            for which, items in name_prompts(table, recipe.seed, recipe.eval.names_limit).items()}


def load_model(cfg, weights) -> Llama:
    """A model of shape cfg with the weights of a checkpoint, in eval mode."""
    model = Llama(cfg)
    load_weights(weights, model)
    return model.eval()


def results_rows(results: dict) -> list[dict]:
    """eval.json as table rows {task, metric, value}: what the model card, the web page and the report show."""
    rows: list[dict] = []
    for task, r in (results.get("tasks") or {}).items():
        if not isinstance(r, dict):
            continue
        if task.startswith("val-loss"):
            which = " (base model)" if "base" in task else ""
            for source, v in r.items():
                if isinstance(v, dict) and "loss" in v:
                    rows.append({"task": f"validation loss{which} ({source})", "metric": "nats/token",
                                 "value": f"{v['loss']:.3f}"})
                    if v.get("bpb") is not None:
                        rows.append({"task": f"validation loss{which} ({source})", "metric": "bits/byte",
                                     "value": f"{v['bpb']:.3f}"})
        else:
            parts = [(f"{task}, {k}", v) for k, v in r.items() if isinstance(v, dict) and "n" in v] or [(task, r)]
            for label, part in parts:  # pystdlib-names has a result per set of functions
                for k, v in part.items():
                    if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        rows.append({"task": f"{label} (n={part['n']})" if "n" in part else label, "metric": k,
                                     "value": f"{v:.3f}"})
    before, after = (results.get("tasks") or {}).get("pystdlib-names (before RL)"), (results.get("tasks") or {}).get(
        "pystdlib-names")
    for which, tests in (results.get("rl") or {}).items():
        for metric, key in (("name", "right_name"), ("signature", "exact_signature")):
            t = tests[metric]
            rows.append({"task": f"pystdlib-names, {which}: RL's change (McNemar)", "metric": key,
                         "value": f"{before[which][key]:.3f} → {after[which][key]:.3f} (+{t['gained']} −{t['lost']}, "
                                  f"p = {t['p_value']:.2g})"})
    sft = results.get("sft") or {}
    if sft.get("base_val_loss") is not None and sft.get("val_loss") is not None:
        rows.append({"task": "held-out conversations", "metric": "assistant-token loss, base → fine-tuned",
                     "value": f"{sft['base_val_loss']:.3f} → {sft['val_loss']:.3f}"})
    return rows
