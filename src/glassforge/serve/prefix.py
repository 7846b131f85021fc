"""Automatic prefix caching: a prompt that begins as an earlier one did reuses that beginning's keys and values.

The engine's cache has one slot per running sequence (engine.py). A slot
keeps, after its sequence ends, the keys and values of the prompt it
prefilled; `PrefixCache` records which tokens those are. A new prompt is
placed where the longest run of its first tokens is already cached:

- in a free slot that holds it (the same conversation's earlier turn, a
  shared system prompt): the prompt is prefilled from there on, in place;
- else in a running sequence's slot (another request with the same system
  prompt, running now): those positions are copied into the new slot first.

Only a prompt's positions are reused, never a reply's: a reply's keys and
values come from the decode steps, whose weights may be int8 or bf16
(fastpath.py), and a prefill from f32 weights would not give the same
numbers. A multi-turn chat thus reuses everything but the last reply and
the new message. Reuse starts at `MIN_REUSE` tokens (shorter runs, such as
the chat template's opening tokens, which every prompt shares, would cost a
slot's content for nothing) and always leaves the prompt's last token to
compute, whose logits the first sample needs. A prompt that asks for its
own log-probabilities (completions `echo`) is prefilled whole.

Memory is bounded by construction: what is cached lives in the slots the
engine allocated at start (`--max-batch` x `--max-context` positions), and a
free slot's prefix is evicted when the slot is given to a prompt it does not
serve (the lowest free slot, as without the cache: the decode step's batch
is as wide as the highest slot in use).
"""

from __future__ import annotations

MIN_REUSE = 16  # tokens: reuse below this is not worth evicting a slot's prefix


def shared_length(a: list[int], b: list[int]) -> int:
    """How many first tokens a and b have in common."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on list equality, which runs in C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Which prompt tokens each cache slot holds keys and values for, and where a new prompt should go."""

    def __init__(self, slots: int, enabled: bool = True):
        self.enabled = enabled
        self.tokens: list[list[int]] = [[] for _ in range(slots)]

    def place(self, prompt: list[int], free: list[int], running: list[int]) -> tuple[int, int | None, int]:
        """(slot, source, reused): the free slot for prompt, the running slot to copy reused positions from
        (None: reuse in place, or none), and how many of the prompt's first positions are reused."""
        lowest = min(free)
        if not self.enabled:
            return lowest, None, 0
        cap = len(prompt) - 1  # the last token is always computed: its logits are the first sample's
        best_free, in_free = max(((min(shared_length(self.tokens[s], prompt), cap), -s) for s in free),
                                 default=(0, 0))
        best_running, source = max(((min(shared_length(self.tokens[s], prompt), cap), s) for s in running),
                                   default=(0, None))
        if best_free >= MIN_REUSE and best_free >= best_running:
            return -in_free, None, best_free
        if best_running >= MIN_REUSE:
            return lowest, source, best_running
        return lowest, None, 0

    def forget(self, slot: int) -> None:
        """The slot's content is being rewritten (a prefill into it; it holds nothing reusable until done)."""
        self.tokens[slot] = []

    def hold(self, slot: int, prompt: list[int]) -> None:
        """The slot now holds prompt's keys and values, computed by a prefill."""
        if self.enabled:
            self.tokens[slot] = list(prompt)

    def held(self, slots) -> list[int]:
        """Those of slots that hold a prefix."""
        return [s for s in slots if self.tokens[s]]
