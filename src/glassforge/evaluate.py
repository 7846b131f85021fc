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

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glassforge.errors import UserError
from glassforge.runfolder import Run, atomic_write_json

BUILTIN_TASKS = ("val-loss", "pystdlib-docmatch")


# --------------------------------------------------------------------------- scoring primitives

@torch.inference_mode()
def continuation_logprobs(model, tok, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
    """(summed log-prob, is-greedy) of each continuation after context, one batched pass."""
    ctx = tok.encode(context, add_special_tokens=False).ids
    rows = []
    for c in continuations:
        full = tok.encode(context + c, add_special_tokens=False).ids
        # Tokenize jointly (as a server would), then score the tokens past the context.
        n_ctx = len(ctx) if full[: len(ctx)] == ctx else _common_prefix(full, ctx)
        rows.append((full, max(1, n_ctx)))
    limit = model.cfg.max_seq_len
    width = min(limit, max(len(f) for f, _ in rows))
    x = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (full, _) in enumerate(rows):
        full = full[-width:]
        x[i, : len(full)] = torch.tensor(full)
    logits, _ = model(x)
    logp = F.log_softmax(logits.float(), -1)
    out = []
    for i, (full, n_ctx) in enumerate(rows):
        shift = max(0, len(full) - width)
        full = full[shift:]
        n_ctx = max(1, n_ctx - shift)
        targets = torch.tensor(full[n_ctx:])
        lp = logp[i, n_ctx - 1: len(full) - 1]
        picked = lp.gather(-1, targets[:, None]).squeeze(-1)
        out.append((float(picked.sum()), bool((lp.argmax(-1) == targets).all())))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def score_multiple_choice(model, tok, items: list[dict]) -> dict:
    correct = correct_norm = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        choices = [f" {c}" for c in item["choices"]]
        scores = [s for s, _ in continuation_logprobs(model, tok, context, choices)]
        normed = [s / max(1, len(c.encode())) for s, c in zip(scores, choices)]
        correct += int(np.argmax(scores) == item["answer"])
        correct_norm += int(np.argmax(normed) == item["answer"])
    n = max(1, len(items))
    return {"n": len(items), "acc": correct / n, "acc_norm": correct_norm / n}


def score_generation(model, tok, items: list[dict], max_tokens: int = 32) -> dict:
    from glassforge.generate import generate_ids
    from glassforge.tokenizer import END, ENDOFTEXT

    stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
    hits = 0
    for item in items:
        ids = tok.encode(item["prompt"], add_special_tokens=False).ids
        out = [t for t in generate_ids(model, ids, max_tokens, 0.0, stop_ids=stop) if t not in stop]
        text = tok.decode(out).split("\n")[0].strip()
        hits += int(text == str(item["answer"]).strip())
    return {"n": len(items), "exact_match": hits / max(1, len(items))}


# --------------------------------------------------------------------------- tasks

def docmatch_items(documents, seed: int, limit: int) -> list[dict]:
    """Four-way: which docstring first line belongs to this function? From validation documents."""
    from glassforge.conversations import _parse_doc, first_paragraph

    funcs = []
    for doc in documents:
        parsed = _parse_doc(doc["text"])
        if parsed and parsed[0] == "function" and parsed[3].strip():
            line = first_paragraph(parsed[3], 160)
            if len(line) >= 12:
                funcs.append((parsed[1] + parsed[2], line))
    rng = random.Random(seed)
    items = []
    lines = sorted({line for _, line in funcs})
    for head, line in funcs:
        others = [l for l in lines if l != line]
        if len(others) < 3:
            break
        choices = rng.sample(others, 3) + [line]
        rng.shuffle(choices)
        items.append({"question": f"What does `{head}` do?", "choices": choices, "answer": choices.index(line),
                      "context_override": f"{head}\n\n"})
    rng.shuffle(items)
    return items[:limit]


def score_docmatch(model, tok, items: list[dict]) -> dict:
    """Like multiple choice, but in the pretraining format: signature, blank line, docstring."""
    correct = correct_norm = 0
    for item in items:
        scores = [s for s, _ in continuation_logprobs(model, tok, item["context_override"], item["choices"])]
        normed = [s / max(1, len(c.encode())) for s, c in zip(scores, item["choices"])]
        correct += int(np.argmax(scores) == item["answer"])
        correct_norm += int(np.argmax(normed) == item["answer"])
    n = max(1, len(items))
    return {"n": len(items), "acc": correct / n, "acc_norm": correct_norm / n, "chance": 0.25}


def read_task_jsonl(path: Path) -> tuple[str, list[dict]]:
    if not path.is_file():
        raise UserError(f"eval task {path}: no such file")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"eval task {path}:{lineno}: not JSON") from None
        items.append(obj)
    if not items:
        raise UserError(f"eval task {path}: empty")
    first = items[0]
    if {"question", "choices", "answer"} <= set(first):
        for i, it in enumerate(items):
            if not isinstance(it.get("choices"), list) or not isinstance(it.get("answer"), int) \
                    or not 0 <= it["answer"] < len(it["choices"]):
                raise UserError(f"eval task {path}:{i + 1}: needs question, choices (list) and answer (an index)")
        return "multiple_choice", items
    if {"prompt", "answer"} <= set(first):
        return "generation", items
    raise UserError(f"eval task {path}: lines need question/choices/answer or prompt/answer")


# --------------------------------------------------------------------------- decontamination

class TrainingNgrams:
    """Hashes of every n-gram of training tokens, to drop eval items that overlap."""

    def __init__(self, tokens: np.ndarray, n: int = 13):
        self.n = n
        t = np.asarray(tokens, dtype=np.uint64)
        if len(t) < n:
            self.hashes = np.zeros(0, dtype=np.uint64)
            return
        h = np.zeros(len(t) - n + 1, dtype=np.uint64)
        for k in range(n):  # polynomial hash; collisions only ever drop an item, never keep one
            h = h * np.uint64(1_000_003) + t[k: len(t) - n + 1 + k]
        self.hashes = np.unique(h)

    def overlaps(self, ids: list[int]) -> bool:
        if len(ids) < self.n or not len(self.hashes):
            return False
        t = np.asarray(ids, dtype=np.uint64)
        h = np.zeros(len(t) - self.n + 1, dtype=np.uint64)
        for k in range(self.n):
            h = h * np.uint64(1_000_003) + t[k: len(t) - self.n + 1 + k]
        pos = np.searchsorted(self.hashes, h)
        pos = np.minimum(pos, len(self.hashes) - 1)
        return bool((self.hashes[pos] == h).any())


def decontaminate(items: list[dict], tok, ngrams: TrainingNgrams) -> tuple[list[dict], int]:
    kept = []
    for item in items:
        texts = [item.get("question", ""), item.get("prompt", ""), str(item.get("answer", "")) if "prompt" in item else ""]
        texts += [item.get("context_override", "") + c for c in item.get("choices", [])]
        if any(ngrams.overlaps(tok.encode(t, add_special_tokens=False).ids) for t in texts if t):
            continue
        kept.append(item)
    return kept, len(items) - len(kept)


# --------------------------------------------------------------------------- the stage

def val_loss_by_source(model, run: Run, seq_len: int, max_windows: int = 128) -> dict:
    """Loss and bits per byte over up to max_windows windows of each source's validation tokens.

    128 windows is what pretraining validates on (eval_batches x micro_batch in
    the default recipe), so for a one-source run the base model's figure here
    matches pretraining's last validation loss up to precision (f32 here,
    bf16 autocast there); fewer windows made the card's figure a noisy sample.
    """
    from glassforge.shards import TokenStream

    stream = TokenStream(run.data, "val")
    docs = {d["id"]: d for d in _documents(run, "val")}
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


def _documents(run: Run, split: str):
    from glassforge.data import iter_documents

    return iter_documents(run, split)


def evaluate_model(run: Run, model_dir: Path, tasks: list[str], limit: int) -> dict:
    from glassforge.model import Llama
    from glassforge.shards import TokenStream
    from glassforge.tokenizer import load_tokenizer

    recipe = run.load_recipe()
    model = Llama.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    ngrams = TrainingNgrams(np.asarray(TokenStream(run.data, "train").tokens), recipe.data.decontaminate_ngram)
    results: dict = {"tasks": {}, "decontamination": {"ngram": ngrams.n, "removed": {}}}
    for task in tasks:
        if task == "val-loss":
            results["tasks"][task] = val_loss_by_source(model, run, recipe.pretrain.seq_len)
        elif task == "pystdlib-docmatch":
            items = docmatch_items(_documents(run, "val"), recipe.seed, limit * 2)
            items, removed = decontaminate(items, tok, ngrams)
            results["decontamination"]["removed"][task] = removed
            results["tasks"][task] = score_docmatch(model, tok, items[:limit])
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
    import tempfile

    from glassforge.release import final_weights, write_model_folder

    recipe = run.load_recipe()
    stage, weights = final_weights(run)
    task_list = [t.strip() for t in tasks.split(",")] if tasks else recipe.eval.tasks
    with tempfile.TemporaryDirectory() as tmp:
        write_model_folder(Path(tmp), recipe.model, weights, run.tokenizer)
        results = evaluate_model(run, Path(tmp), task_list, recipe.eval.limit)
        if stage == "sft" and "val-loss" in task_list:
            # Fine-tuning trades some language modelling for chat; show both sides of the trade.
            from glassforge.model import Llama
            from glassforge.train import latest_weights

            write_model_folder(Path(tmp), recipe.model, latest_weights(run.pretrain), run.tokenizer)
            base = Llama.from_pretrained(Path(tmp))
            results["tasks"]["val-loss (base model)"] = val_loss_by_source(base, run, recipe.pretrain.seq_len)
    results["model"] = stage
    from glassforge.sft import sft_summary

    summary = sft_summary(run)
    if summary:
        results["sft"] = {"base_val_loss": summary["base_val_loss"], "val_loss": summary["val_loss"]}
    atomic_write_json(run.eval / "eval.json", results)
    return {"eval": str(run.eval / "eval.json"), "tasks": list(results["tasks"])}


def results_table(results: dict) -> str:
    """A markdown table of eval.json for the model card."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, r in results.get("tasks", {}).items():
        if task.startswith("val-loss"):
            which = " (base model)" if "base" in task else ""
            for source, v in r.items():
                rows.append(f"| validation loss{which} ({source}) | nats/token, bits/byte | {v['loss']:.3f}, {v['bpb']:.3f} |")
        else:
            for k, v in r.items():
                if k != "n" and isinstance(v, float):
                    rows.append(f"| {task} (n={r['n']}) | {k} | {v:.3f} |")
    sft = results.get("sft")
    if sft and sft.get("base_val_loss") is not None and sft.get("val_loss") is not None:
        rows.append(f"| held-out conversations | assistant-token loss, base → fine-tuned | "
                    f"{sft['base_val_loss']:.3f} → {sft['val_loss']:.3f} |")
    removed = results.get("decontamination", {}).get("removed", {})
    note = (f"\n\nEvaluation items sharing a {results['decontamination']['ngram']}-gram of tokens with the training "
            f"data were removed before scoring: " + ", ".join(f"{k}: {v}" for k, v in removed.items()) + ".") if removed else ""
    return "\n".join(rows) + note
