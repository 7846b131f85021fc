"""One choice being generated, as the engine's thread keeps it: its tokens, text, cache slot, times.

The engine (engine.py) makes one `Sequence` per choice of a request, and only
its thread changes one after `submit`; the server holds them only to cancel.
"""

from __future__ import annotations

import time

import torch

from glassforge.model.sampling import generator_for
from glassforge.serve.text import OutputText
from glassforge.serve.types import SamplingParams, Sink, Timing, TokenLogprob


class Sequence:
    """One choice being generated: its tokens, text state and cache slot."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, sink: Sink, group: int,
                 text: OutputText, matcher=None, tag: str = ""):
        self.index = index
        self.tag = tag  # the request's id, in its error event and in the log
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.group = group  # sequences of one prompt of one request share a prefill
        self.slot = -1
        self.cached = 0  # the prompt's first positions taken from the prefix cache
        self.copy_from: int | None = None  # the running slot they are copied from (None: in place)
        self.out_ids: list[int] = []
        self.pending: list[TokenLogprob] = []  # log-probs not yet sent
        self.out = text
        self.done = False
        self.cancelled = False
        self.first_event = True
        self.counts: torch.Tensor | None = None  # how often each token was generated, for the penalties
        self.matcher = matcher  # llguidance matcher when params.grammar is set
        self.generator = generator_for(params.seed, index)
        self.timing = Timing(time.perf_counter())

    @property
    def position(self) -> int:
        """Position of the next token to feed (the last generated one)."""
        return len(self.prompt_ids) + len(self.out_ids) - 1


def seqs_of(batch: list[list[Sequence]]) -> list[Sequence]:
    return [s for group in batch for s in group]
