"""Token ids to streamed text: incremental detokenizing, stop strings, and holding back what may be one.

Text is decoded incrementally: a window of ids is re-decoded at each token, so
that a multi-byte character split across tokens is never emitted half-way (a
window whose decoding ends in U+FFFD waits for the next token). Stop strings
are matched on the text, not on tokens, so a stop that spans tokens is found
and cut from the output; and any text at the end that could still be the start
of a stop string is held back until it is known not to be one: nothing of a
stop ever leaks into a stream.
"""

from __future__ import annotations

from tokenizers import Tokenizer


def find_stop(text: str, new_from: int, stops: list[str]) -> int | None:
    """Earliest index where a stop string occurs, looking only where new text could complete one."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, new_from - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could begin a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class OutputText:
    """One sequence's output text: decoded as its tokens arrive, cut at a stop string, released when safe."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.text = ""  # decoded output so far (cut at a stop string once one is found)
        self.sent = 0  # characters of text already released
        self.prefix_offset = 0  # the re-decoded window: ids[prefix_offset:] ...
        self.read_offset = 0  # ... of which ids[prefix_offset:read_offset] are already in text

    def add(self, ids: list[int]) -> bool:
        """Take in the text the newest id (ids[-1]) completes; True when a stop string now ends the text."""
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # half a character: wait for the rest
            return False
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        before = len(self.text)
        self.text += full[len(prefix):]
        cut = find_stop(self.text, before, self.stops) if self.stops else None
        if cut is not None:
            self.text = self.text[:cut]
            return True
        return False

    def flush(self, ids: list[int]) -> None:
        """Take in whatever the window still holds undecoded (the sequence ends: no more bytes will come)."""
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(full) > len(prefix):
            self.text += full[len(prefix):]

    def releasable(self) -> str:
        """The text not yet released that cannot be the start of a stop string; it counts as released."""
        upto = len(self.text) - holdback(self.text, self.stops) if self.stops else len(self.text)
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out

    def rest(self) -> str:
        """Everything not yet released (the sequence has finished)."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
