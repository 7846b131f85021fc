"""Scoring primitives and the built-in tasks: log-likelihood multiple choice, greedy generation, decontamination.

Multiple choice follows lm-evaluation-harness: the context is
"Question: {question}\nAnswer:", each choice is " {choice}"; `acc` picks the
highest summed log-probability, `acc_norm` divides by the choice's length in
bytes. `pystdlib-docmatch` asks, for a function from the validation split
(never seen in pretraining or fine-tuning), which of four docstring first
lines belongs to its signature, in the pretraining format. Items sharing a
13-gram of tokens with the training stream are removed before scoring.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glassforge.core.errors import UserError
from glassforge.data.pystdlib import first_paragraph, parse_doc
from glassforge.model.generate import generate_ids
from glassforge.tokenizer.bpe import END, ENDOFTEXT


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
    stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
    hits = 0
    for item in items:
        ids = tok.encode(item["prompt"], add_special_tokens=False).ids
        out = [t for t in generate_ids(model, ids, max_tokens, stop_ids=stop) if t not in stop]
        text = tok.decode(out).split("\n")[0].strip()
        hits += int(text == str(item["answer"]).strip())
    return {"n": len(items), "exact_match": hits / max(1, len(items))}


def docmatch_items(documents, seed: int, limit: int) -> list[dict]:
    """Four-way: which docstring first line belongs to this function? From validation documents."""
    funcs = []
    for doc in documents:
        parsed = parse_doc(doc["text"])
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

