"""Constrained decoding for `response_format` JSON, through llguidance.

llguidance is a small Rust library that builds its token tables offline from
our tokenizer.json. A JSON schema becomes a grammar (validated against the
tokenizer before any request runs); each sequence with one gets a matcher, and
at each step the tokens that cannot continue a valid prefix are masked out of
its logits before sampling; the sequence stops when the grammar is complete.

llguidance and transformers (for its tokenizer adapter) are imported only when
a request asks for a grammar: a server that never sees one needs neither, and
without them such a request is a clear error naming what to install.
"""

from __future__ import annotations

from pathlib import Path

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

    def matcher(self, grammar: str):
        """A fresh matcher for one sequence (its state advances with every token it consumes)."""
        import llguidance

        return llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)

    def mask(self, logits: torch.Tensor, matchers: list) -> torch.Tensor:
        """logits [B, V] with each row's disallowed tokens at -inf (rows whose matcher is None are unchanged)."""
        import llguidance.torch as lt

        logits = logits.float().clone()
        for i, matcher in enumerate(matchers):
            if matcher is not None:
                bits = lt.allocate_token_bitmask(1, self.vocab_size)
                lt.fill_next_token_bitmask(matcher, bits, 0)
                lt.apply_token_bitmask_inplace(logits[i:i + 1], bits)
        return logits


def consume(matcher, token: int) -> bool:
    """Advance a matcher by the sampled token; True when the grammar allows nothing more (done or broken)."""
    matcher.consume_token(token)
    return matcher.is_stopped() or matcher.is_error()
