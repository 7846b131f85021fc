"""Conversations for chat fine-tuning: the embedded `pystdlib-qa` set and OpenAI-messages JSONL.

`pystdlib-qa` asks about the run's own standard-library documents: what a
function does, what a class is, what a module is for, or a function's
signature, in several phrasings, and answers from the signature and the first
paragraph of the docstring, so every answer is grounded in a training document
whose id and sha256 it records. Answers look like IPython's `name?`
("Signature: os.path.join(a, *p)" then the docstring). The name follows a
space, as it does in the question: byte-level BPE gives " os" and "os"
different ids, so a backtick before the name (the first format) made the
model recall the name instead of copying it, and a small model recalled the
commonest module (`turtle`) whatever was asked. `posixpath` names are also asked as
`os.path`, the name people use.

Whole modules are held out for validation (chosen by the hash of the module's
name), so validation questions are about code whose answers the fine-tuning
never showed. Documents in the data stage's validation split are not used at
all: they stay unseen for evaluation.

JSONL files hold one `{"messages": [{"role", "content"}, ...]}` per line; a
malformed line (not JSON, unknown role, missing content) is reported with its
line number, skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from glassforge.core.errors import UserError
from glassforge.data.pystdlib import first_paragraph, parse_doc
from glassforge.tokenizer.bpe import ROLES

SYSTEM_PROMPT = "You are a helpful assistant that answers questions about the Python standard library."

FUNCTION_QUESTIONS = [
    "What does {name} do?",
    "What does the function {name} do?",
    "Explain {name}.",
    "How do I use {name}?",
    "Can you tell me what {name} is for?",
]
SIGNATURE_QUESTIONS = ["What is the signature of {name}?", "What arguments does {name} take?"]
CLASS_QUESTIONS = ["What is {name}?", "Describe the class {name}.", "What is the {name} class for?"]
MODULE_QUESTIONS = ["What is the {name} module for?", "What does the {name} module do?", "Tell me about the {name} module."]


@dataclass
class Conversation:
    messages: list[dict]
    provenance: dict = field(default_factory=dict)


def held_out_module(module: str, fraction: float = 0.1) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def pystdlib_qa(documents, seed: int, phrasings: int = 2) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations from the run's pystdlib documents.

    documents: dicts with id, split and text (the data stage's documents.jsonl rows).
    """
    rng = random.Random(seed)
    train, val = [], []
    for doc in documents:
        if doc["split"] != "train" or not doc["id"].split(":", 1)[0]:
            continue
        parsed = parse_doc(doc["text"])
        if not parsed:
            continue
        kind, name, signature, rest = parsed
        if any(part.startswith("_") for part in name.split(".")[1:]) or not rest.strip():
            continue
        answer_text = first_paragraph(rest)
        if len(answer_text) < 12 or answer_text.startswith(("#", "XXX", "TODO")):
            continue
        names = [name]
        if name.startswith("posixpath."):
            names.append("os.path." + name[len("posixpath."):])
        module = name.split(".")[0]
        provenance = {"document": doc["id"], "sha256": hashlib.sha256(doc["text"].encode()).hexdigest()}
        target = val if held_out_module(module) else train
        for asked in names:
            if kind == "function":
                questions = rng.sample(FUNCTION_QUESTIONS, phrasings)
                answer = f"Signature: {asked}{signature}\n\n{answer_text}"
                if rng.random() < 0.3:
                    q = rng.choice(SIGNATURE_QUESTIONS).format(name=asked)
                    target.append(_conv(q, f"The signature is {asked}{signature}.\n\n{answer_text}", provenance, rng))
            elif kind == "class":
                questions = rng.sample(CLASS_QUESTIONS, phrasings)
                answer = f"Class: {asked}\n\n{answer_text}"
            else:
                questions = rng.sample(MODULE_QUESTIONS, phrasings)
                answer = f"Module: {asked}\n\n{answer_text}"
            for q in questions:
                target.append(_conv(q.format(name=asked), answer, provenance, rng))
    return train, val


def _conv(question: str, answer: str, provenance: dict, rng: random.Random) -> Conversation:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return Conversation(messages, provenance)


@dataclass
class JsonlReport:
    path: str
    read: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def read_messages_jsonl(path: Path | str) -> tuple[list[Conversation], JsonlReport]:
    """Conversations from an OpenAI-messages JSONL file; bad lines are reported and skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sft.conversations: {path}: no such file")
    report = JsonlReport(str(path))
    convs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            problem = None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"not JSON ({e.msg})"
            else:
                msgs = obj.get("messages") if isinstance(obj, dict) else None
                if not isinstance(msgs, list) or not msgs:
                    problem = "no 'messages' list"
                else:
                    for i, m in enumerate(msgs):
                        if not isinstance(m, dict) or m.get("role") not in ROLES:
                            problem = f"messages[{i}]: unknown role {m.get('role') if isinstance(m, dict) else m!r}"
                            break
                        if not isinstance(m.get("content"), str):
                            problem = f"messages[{i}]: missing content"
                            break
                    else:
                        if not any(m["role"] == "assistant" for m in msgs):
                            problem = "no assistant message"
            if problem:
                report.skipped += 1
                report.problems.append(f"{path}:{lineno}: {problem}")
                continue
            report.read += 1
            convs.append(Conversation([{"role": m["role"], "content": m["content"]} for m in msgs],
                                      {"file": str(path), "line": lineno}))
    return convs, report
