"""Constrained decoding for `response_format` JSON and tool calls (tools.py), through llguidance.

llguidance is a small Rust library that builds its token tables offline from
our tokenizer.json. A JSON schema becomes a grammar (validated against the
tokenizer before any request runs); each sequence with one gets a matcher, and
at each step the tokens that cannot continue a valid prefix are masked out of
its logits before sampling; the sequence stops when the grammar is complete.

Compiling a grammar and building its matcher can take a second each for a large schema (10,000 required
properties: 0.8 s and 0.9 s); the server does both on its work threads (limits.py), never on the event
loop or the engine thread, and the `n` choices of a request share one build (`matchers`: copies of one
matcher). The engine thread only computes masks, a fraction of a millisecond a step: from llguidance's
bitmask with numpy, not llguidance.torch, whose import and torch.compile'd kernel cost the engine
thread 5 s on the first grammar.

llguidance and transformers (for its tokenizer adapter) are imported only when
a request asks for a grammar: a server that never sees one needs neither, and
without them such a request is a clear error naming what to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glassforge.core.errors import UserError
from glassforge.tokenizer.bpe import END


class Grammars:
    """llguidance over one tokenizer: JSON-schema grammars, a matcher per sequence, the token masks."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, end_id: int):
        self.tokenizer_json, self.vocab_size, self.end_id = tokenizer_json, vocab_size, end_id
        self._tokenizer = None

    def tokenizer(self):
        """llguidance's view of our tokenizer (built once, offline, from tokenizer.json)."""
        if self._tokenizer is None:
            try:
                import llguidance.hf
                from transformers import PreTrainedTokenizerFast
            except ImportError as e:
                raise UserError(f"constrained decoding needs llguidance and transformers ({e.name} is not "
                                f"installed): pip install llguidance transformers") from None

            hf = PreTrainedTokenizerFast(tokenizer_file=str(self.tokenizer_json), eos_token=END)
            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.end_id)
        return self._tokenizer

    def json_grammar(self, schema: dict | None) -> str:
        """An llguidance grammar for JSON matching schema (None: any JSON object); UserError if invalid."""
        tokenizer = self.tokenizer()
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema if schema is not None else {"type": "object"}, defaults={"whitespace_flexible": False})
        except Exception as e:  # noqa: BLE001 - the library reports schema errors as various types
            raise UserError(f"invalid JSON schema: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise UserError(f"invalid JSON schema: {error}")
        return grammar

    def lark_grammar(self, lark: str) -> str:
        """A grammar in llguidance's Lark dialect (tool calls: tools.py), checked against the tokenizer."""
        tokenizer = self.tokenizer()
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except Exception as e:  # noqa: BLE001 - as above
            raise UserError(f"invalid JSON schema: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise UserError(f"invalid JSON schema: {error.strip().splitlines()[0]}")
        return grammar

    def matchers(self, grammar: str, n: int = 1) -> list:
        """n fresh matchers for grammar, one per sequence (a matcher's state advances with every token it
        consumes); the copies share the first one's build. UserError when the grammar cannot be used."""
        import llguidance

        first = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if first.is_error():
            raise UserError(f"invalid JSON schema: {first.get_error()}")
        return [first] + [first.deep_copy() for _ in range(n - 1)]

    def allowed(self, matcher) -> torch.Tensor:
        """[V] booleans: the tokens matcher allows next (its bitmask holds one bit per token, lowest first)."""
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool))


def consume(matcher, token: int) -> bool:
    """Advance a matcher by the sampled token; True when the grammar allows nothing more (done or broken)."""
    matcher.consume_token(token)
    return matcher.is_stopped() or matcher.is_error()
