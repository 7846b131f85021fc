"""What goes into the engine and what comes out of it: the request and result types, and its two refusals.

A request is a prompt's token ids, a choice index and `SamplingParams`: how to
sample (the one sampler's `Sampling`: temperature, top-p, penalties, ...), how
long, when to stop and which log-probabilities to report. Results leave the
engine as `Event`s, one per sequence and step that produced something, through
a callback (`Sink`) the caller supplies; the server folds several of one
choice into one stream chunk with `Event.absorb`.

Log-probabilities (`TokenLogprob`) are those of the model (raw logits), as
OpenAI and vLLM report them: penalties, bias, temperature, top-k and top-p
change only what is sampled, never what is reported.

The types are plain dataclasses with no torch in them, so the HTTP side
(protocol, serving) depends on them without depending on the engine's
internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from glassforge.core.errors import UserError
from glassforge.model.sampling import Sampling


def internal_error_message(request_id: str) -> str:
    """What a client is told of a failure on the server's side: its request's id, never the exception (which
    goes to the server's log under that id)."""
    return f"internal server error (request id {request_id or '-'}); the server's log has the details"


class QueueFull(Exception):
    """The waiting queue has no room: the caller should retry later."""


class ContextTooLong(UserError):
    """Prompt plus max_tokens exceed the engine's maximum context."""


@dataclass
class SamplingParams(Sampling):
    """What one request asks of the engine: how to sample (`Sampling`), how long, when to stop, what to report."""

    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    prompt_logprobs: int | None = None  # the same over the prompt (completions `echo`)
    grammar: str | None = None  # an llguidance grammar (from `Grammars.json_grammar`): constrained decoding


@dataclass
class Timing:
    """When a sequence was submitted, given a cache slot, made each token and finished: what /metrics reports."""

    submitted: float
    admitted: float | None = None  # given a cache slot: its queue time ends
    first_token: float | None = None
    last_token: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # seconds between successive tokens
    finished: float | None = None
    finish_reason: str | None = None

    def token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        else:
            self.token_gaps.append(now - self.last_token)
        self.last_token = now


@dataclass
class TokenLogprob:
    """One token with its log-probability and, when asked for, the k most likely tokens at its position."""

    id: int
    token: str
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: list[tuple[int, str, float]] | None
    offset: int  # characters of output text before this token


@dataclass
class Event:
    """What one sequence produced since its last event."""

    index: int
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's tokens, how many were the prefix cache's (prefix.py)
    error: str | None = None

    def absorb(self, ev: "Event") -> bool:
        """Fold a later event of the same choice into this one; True when it finished the choice."""
        self.text += ev.text
        self.tokens += ev.tokens
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
            self.cached_tokens = ev.cached_tokens
            return True
        return False


#: Where a sequence's events go; called on the engine thread, so it must be quick and must not block.
Sink = Callable[[Event], None]
