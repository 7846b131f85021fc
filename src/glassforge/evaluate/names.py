"""The `pystdlib-names` task: asked about a function, does the assistant name it and give its exact signature?

Prompts ask about the standard library's functions in phrasings that neither
fine-tuning nor RL ever uses (`QUESTIONS`), so the task measures what the model
learned, not a memorised question. Two sets, of up to `limit` functions each,
drawn with the recipe's seed:

- `train`: functions of the modules fine-tuning and RL train on;
- `held_out`: functions of the modules fine-tuning holds out (whose documents
  pretraining read, but no conversation or rollout ever asked about), where RL
  must not make things worse.

Answers are greedy, from the model's own forward and the one sampler
(model/generate.py), judged by train/rewards.py on their first line: the
share that names the function asked about, the share with its exact
signature, and the mean word overlap of the rest with the docstring's first
paragraph. Each item's outcomes are kept (as strings of 0 and 1), so two
models can be compared item by item with McNemar's exact test.
"""

from __future__ import annotations

import math
import random

from glassforge.model.generate import generate_batch
from glassforge.tokenizer.bpe import END, ENDOFTEXT, render_chat
from glassforge.train.conversations import held_out_module
from glassforge.train.rewards import Entry, score

#: Phrasings no conversation or rollout uses (train/conversations.py, train/rl.py use their own).
QUESTIONS = [
    "Describe {name} in a sentence.",
    "What is {name} used for?",
    "Tell me about the function {name}.",
    "I want to call {name}. What does it do?",
    "Summarise what {name} does.",
    "Could you explain the function {name} to me?",
]
MAX_TOKENS = 48  # on the default build, 64 gave the same three rates in 37 s of evaluation, 48 in 29 s
BATCH = 512  # a set of 500 in one batch: on the default build, the same replies as batches of 128 or 64, in fewer decode steps


def name_prompts(table: dict[str, Entry], seed: int, limit: int) -> dict[str, list[tuple[str, Entry]]]:
    """{"train": [(question, entry)], "held_out": [...]}: up to limit functions each, a phrasing each."""
    rng = random.Random(f"{seed}:pystdlib-names")
    sets: dict[str, list[tuple[str, Entry]]] = {"train": [], "held_out": []}
    names = sorted(n for n in table if not n.startswith("os.path."))  # one entry per function
    rng.shuffle(names)
    for name in names:
        which = "held_out" if held_out_module(name.split(".")[0]) else "train"
        if len(sets[which]) < limit:
            sets[which].append((rng.choice(QUESTIONS).format(name=name), table[name]))
    return sets


def answer(model, tok, questions: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Greedy replies to questions, as the chat template renders them."""
    stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
    prompts = [tok.encode(render_chat([{"role": "user", "content": q}], True), add_special_tokens=False).ids
               for q in questions]
    replies = []
    for i in range(0, len(prompts), BATCH):
        for ids in generate_batch(model, prompts[i:i + BATCH], max_tokens, stop_ids=stop):
            replies.append(tok.decode([t for t in ids if t not in stop]))
    return replies


def score_names(model, tok, items: list[tuple[str, Entry]], table: dict[str, Entry]) -> dict:
    replies = answer(model, tok, [q for q, _ in items])
    scores = [score(q, r, table) for (q, _), r in zip(items, replies)]
    n = max(1, len(scores))
    return {"n": len(scores),
            "right_name": sum(s["name"] for s in scores) / n,
            "exact_signature": sum(s["signature"] for s in scores) / n,
            "description_f1": round(sum(s["description"] for s in scores) / n, 4),
            "outcomes": {"name": "".join(str(int(s["name"])) for s in scores),
                         "signature": "".join(str(int(s["signature"])) for s in scores)},
            "examples": [{"question": q, "answer": r.split("\n", 1)[0]} for (q, _), r in list(zip(items, replies))[:3]]}


def mcnemar(before: str, after: str) -> dict:
    """McNemar's exact test on paired 0/1 outcomes: items only after got right (b), only before (c), and the
    two-sided p-value of b against c under a fair coin."""
    b = sum(1 for x, y in zip(before, after) if x == "0" and y == "1")
    c = sum(1 for x, y in zip(before, after) if x == "1" and y == "0")
    n = b + c
    if n == 0:
        return {"gained": 0, "lost": 0, "p_value": 1.0}
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2 ** n
    return {"gained": b, "lost": c, "p_value": min(1.0, 2 * tail)}
