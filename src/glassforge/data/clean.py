"""Cleaning and filtering one document: pure functions of its text and the recipe's `[data]` section.

Cleaning (`normalize`): Unicode NFC, line ends to `\\n`, control characters
removed, exotic spaces to spaces, tabs to four spaces, no trailing spaces, at
most one blank line in a row, no leading or trailing blank space. ASCII text
takes byte-level shortcuts (`bytes.translate`), several times faster than the
regular expressions and with the same result.

Filters (`filter_reason`), thresholds from `[data]`: `too_short`, `too_long`,
`non_text` (share of characters that are neither letters, whitespace nor
prose punctuation), `repeated_lines` (share of non-blank lines that repeat an
earlier line; a one-line document is never dropped by it).

The split (`split_of`) and the sampling weight's repeats (`train_repeats`) are
functions of the document's hash and id, never of its position, so the same
document lands the same way in any run.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata

from glassforge.core.recipe import DataConfig

FILTER_REASONS = {
    "too_short": "fewer characters than data.min_chars after cleaning",
    "too_long": "more characters than data.max_chars after cleaning",
    "non_text": "share of non-text characters above data.max_non_text_fraction",
    "repeated_lines": "share of repeated lines above data.max_repeated_line_fraction",
    "exact_duplicate": "the same cleaned text as an earlier document (duplicate_of)",
    "contaminated": "shares an n-gram with an evaluation set in data.decontaminate (contaminated_by)",
    "near_duplicate": "estimated Jaccard similarity to an earlier document at or above the threshold (duplicate_of)",
}


_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


_CTRL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")


_LINESEP = re.compile(r"[\u2028\u2029\x85]")


_TRAILING_WS = re.compile(r"[ \t]+\n")


_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, no control characters, unix newlines, no trailing spaces, at most one blank line."""
    if not text.isascii():
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        text = _LINESEP.sub("\n", text.replace("\ufeff", ""))
        text = _SPACES.sub(" ", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # bytes.translate is several times faster than the regex on ASCII
        b = text.encode("ascii")
        stripped = b.translate(None, _CTRL_BYTES)
        if len(stripped) != len(b):
            text = stripped.decode("ascii")
    else:
        text = _CTRL.sub("", text)
    if "\t" in text:
        text = text.replace("\t", "    ")
    if " \n" in text:
        text = _TRAILING_WS.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def json_string_of_normalized(text: str) -> str:
    """`json.dumps(text, ensure_ascii=False)` for a `normalize`d text, about ten times faster.

    json escapes `"`, `\\` and every character below U+0020; after `normalize`
    the only one of those left is the newline, so three `str.replace` passes
    (memchr-fast when there is nothing to replace) give the same string as
    json's per-character encoder.
    """
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_TEXT_BYTES = bytes(sorted(set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n.,;:!?'\"()-")))


_NONTEXT_RE = re.compile(r"(?:[^\w\s.,;:!?'\"()\-]|[\d_])+")


def non_text_fraction(text: str, encoded: bytes | None = None) -> float:
    """Share of characters that are not letters, whitespace or prose punctuation."""
    if not text:
        return 0.0
    if text.isascii():
        b = encoded if encoded is not None else text.encode("ascii")
        return len(b.translate(None, _TEXT_BYTES)) / len(b)
    return sum(len(m) for m in _NONTEXT_RE.findall(text)) / len(text)


def repeated_line_fraction(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line of the same document."""
    lines = [line for line in text.split("\n") if line]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def filter_reason(text: str, cfg: DataConfig, encoded: bytes | None = None) -> str | None:
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    if non_text_fraction(text, encoded) > cfg.max_non_text_fraction:
        return "non_text"
    if repeated_line_fraction(text) > cfg.max_repeated_line_fraction:
        return "repeated_lines"
    return None


def split_of(sha256: str, val_fraction: float) -> str:
    """Deterministic split from the document's own hash."""
    return "val" if int(sha256[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def train_repeats(weight: float, seed: int, doc_id: str) -> int:
    """How many times a training document appears in the order under its source's weight."""
    whole = math.floor(weight)
    frac = weight - whole
    if frac <= 0:
        return whole
    coin = int.from_bytes(hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    return whole + (1 if coin < frac else 0)

