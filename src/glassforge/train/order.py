"""What each step trains on: a function of (seed, global step) alone.

Step s trains on the examples at positions [s*B, (s+1)*B) of a sequence of
per-epoch permutations seeded by (seed, epoch). Each process takes its
contiguous slice of that global batch and splits it into micro-batches, so
world size and accumulation change how the work is divided, never which
examples a step sees. `Windows` are pretraining's examples: non-overlapping
windows over the memory-mapped token stream.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from glassforge.core.errors import UserError


class Examples(Protocol):
    """A training set the trainer can index: rows of inputs and targets (-100 = no loss), and optionally a
    dict of per-token extras: "segments" (packed rows, model/llama.py) or "weights" (RL's advantages)."""

    bytes_per_token: float

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
        ...


class Windows:
    """Non-overlapping windows of seq_len + 1 tokens over a memory-mapped token stream."""

    def __init__(self, stream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self.bytes_per_token = stream.bytes_per_token
        self.n = (len(stream.tokens) - 1) // seq_len
        if self.n < 1:
            raise UserError(f"token stream of {len(stream.tokens)} tokens is shorter than seq_len={seq_len}")

    def __len__(self) -> int:
        return self.n

    def batch(self, indices):
        # One gather from the memory map for the whole batch: no Python loop over rows or tokens.
        T = self.seq_len
        positions = np.asarray(indices, dtype=np.int64)[:, None] * T + np.arange(T + 1)
        rows = torch.from_numpy(self.stream.tokens[positions].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class DataOrder:
    """Which examples global step s uses: a function of (seed, step) alone."""

    def __init__(self, n_examples: int, global_batch: int, seed: int):
        self.n, self.B, self.seed = n_examples, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.B, (step + 1) * self.B)
        out = np.empty(len(positions), dtype=np.int64)
        epochs = positions // self.n
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[positions[sel] % self.n]
        return out

