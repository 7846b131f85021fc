"""The verifiable reward for RL, and the checks the names task scores: pure functions of prompt, completion, table.

The standard library is its own answer key: every function's real name,
signature and docstring are in the run's training documents. The reward table
is built from those documents alone (never from imports, so it is the same on
any Python and can be rebuilt from a release's data pack): for each function,
its dotted name, its signature and the first paragraph of its docstring, with
`posixpath` functions also under `os.path`, the name people ask by.

An answer is judged by its first line, the line the assistant's format puts
the name and signature on ("Signature: os.path.join(a, *p)"):

- name: the asked function is named there, as a whole dotted name;
- signature: the line holds the name followed by its exact signature;
- description: content-word overlap (F1 of the sets of lower-cased words of
  three letters or more, English function words left out) between the rest of
  the answer and the docstring's first paragraph. Function words are left out
  because with them RL learned to pad answers with "a list of the string of
  a ...", which overlaps every docstring a little.

The reward is name + signature + half the description's overlap (at most
2.5): the name and signature are what the answer is asked for. A prompt that asks about no name in the
table scores zero: the reward cannot be earned on what the table does not
know. (RL's prompts never ask about the modules fine-tuning holds out, so the
names task can measure on those whether RL made anything worse.)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable

from glassforge.data.pystdlib import first_paragraph, parse_doc

_WORD = re.compile(r"[a-z0-9_]{3,}")
_FUNCTION_WORDS = frozenset("""the and for that this with from are was were been has have had not but its
into than then them they their there these those which while when where what who whom whose will would
can could may might must shall should does did doing done also any all each every some such only other
more most less same very just about over under between after before above below again once here how why
both either neither nor own off out upon via per""".split())
DESCRIPTION_WEIGHT = 0.5
_NAME_CHARS = r"[\w.]"


@dataclass(frozen=True)
class Entry:
    name: str  # as asked (os.path.join for posixpath.join)
    signature: str  # "(a, *p)"
    description: str  # the docstring's first paragraph
    document: str  # the training document's id


def reward_table(documents: Iterable[dict]) -> dict[str, Entry]:
    """Every public function of the training documents, by the names it is asked by."""
    table: dict[str, Entry] = {}
    for doc in documents:
        if doc["split"] != "train":
            continue
        parsed = parse_doc(doc["text"])
        if not parsed or parsed[0] != "function":
            continue
        _, name, signature, rest = parsed
        if any(part.startswith("_") for part in name.split(".")[1:]) or not rest.strip():
            continue
        description = first_paragraph(rest)
        if len(description) < 12:
            continue
        for asked in [name] + (["os.path." + name[len("posixpath."):]] if name.startswith("posixpath.") else []):
            table.setdefault(asked, Entry(asked, signature, description, doc["id"]))
    return table


def asked_name(prompt: str, table: dict[str, Entry]) -> str | None:
    """The longest table name the prompt mentions as a whole dotted name (None: it asks about none)."""
    best = None
    for m in re.finditer(rf"(?<!{_NAME_CHARS})[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+", prompt):
        candidate = m.group(0)
        while candidate and candidate not in table:  # "json.dumps." or a trailing word: shorten
            candidate = candidate.rpartition(".")[0] if "." in candidate else ""
        if candidate and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


def first_line(completion: str) -> str:
    return completion.strip().split("\n", 1)[0].strip()


def names(line: str, name: str) -> bool:
    """Whether a line names this dotted name as a whole (json.dumps, not json.dumps_all or myjson.dumps)."""
    return _pattern(rf"(?<!{_NAME_CHARS}){re.escape(name)}(?![\w])(?!\.\w)").search(line) is not None


def has_signature(line: str, entry: Entry) -> bool:
    """Whether a line holds the name followed by its exact signature (and nothing glued after it)."""
    return _pattern(rf"(?<!{_NAME_CHARS}){re.escape(entry.name + entry.signature)}(?![\w(])").search(line) is not None


@functools.lru_cache(maxsize=None)
def _pattern(regex: str) -> re.Pattern:
    # One pattern per name in the table: more than re's own cache of 512 holds, which then compiled each again.
    return re.compile(regex)


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _FUNCTION_WORDS}


def word_f1(text: str, reference: str) -> float:
    got, want = content_words(text), content_words(reference)
    common = len(got & want)
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score(prompt: str, completion: str, table: dict[str, Entry]) -> dict[str, float]:
    """{"name", "signature", "description", "reward"} of one completion to one prompt."""
    asked = asked_name(prompt, table)
    if asked is None:
        return {"name": 0.0, "signature": 0.0, "description": 0.0, "reward": 0.0}
    entry = table[asked]
    line = first_line(completion)
    body = completion.strip().partition("\n")[2]
    got = {"name": float(names(line, asked)), "signature": float(has_signature(line, entry)),
           "description": round(word_f1(body, entry.description), 6)}
    return {**got, "reward": round(got["name"] + got["signature"] + DESCRIPTION_WEIGHT * got["description"], 6)}
