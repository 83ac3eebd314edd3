"""Pack tokenized documents into fixed-length training rows (nanoGPT-style overlapping windows)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxscale.data.tokenizer import Tokenizer, document_ids
from jaxscale.errors import UserError


@dataclass(frozen=True, eq=False)
class PackedTokens:
    """All documents as one token stream, each followed by eos, and each token's document index.

    Row `r` is the window `tokens[r * seq_len : (r + 1) * seq_len + 1]`; the ragged tail is dropped.
    """

    tokens: np.ndarray  # int32 [n]
    segments: np.ndarray  # int32 [n], document index of each token
    seq_len: int

    @property
    def num_rows(self) -> int:
        """Number of complete rows."""
        return (len(self.tokens) - 1) // self.seq_len

    def max_documents_per_row(self) -> int:
        """The most documents (or parts of one) that any complete row holds."""
        n = self.num_rows * self.seq_len
        starts = np.flatnonzero(self.segments[1:n] != self.segments[:n - 1]) + 1
        inside = starts[starts % self.seq_len != 0] // self.seq_len  # a row's first one is free
        return 1 + int(np.bincount(inside, minlength=1).max())

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Return the batch of rows `indices`: int32 `inputs`, `targets`, `segment_ids`, `positions`
        and float32 `loss_mask`, each of shape `[len(indices), seq_len]`.

        `segment_ids` number the documents in each row from 1; `positions` count from 0 at the start
        of each document and at the start of the row.
        """
        window = np.asarray(indices)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        tokens, segments = self.tokens[window], self.segments[window[:, :-1]]
        starts = np.ones(segments.shape, dtype=bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        col = np.arange(self.seq_len, dtype=np.int32)
        start_col = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
            "positions": col - start_col,
            "loss_mask": np.ones(segments.shape, dtype=np.float32),
        }


def pack_documents(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> PackedTokens:
    """Tokenize `docs` (`document_ids`: special tokens, eos last) and concatenate them into rows
    of `seq_len` tokens."""
    if seq_len < 1:
        raise UserError(f"data.seq_len must be at least 1, got {seq_len}")
    encoded = [document_ids(tokenizer, d) for d in docs]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum()))
    segments = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
    packed = PackedTokens(tokens, segments, seq_len)
    if packed.num_rows == 0:
        raise UserError(f"the corpus has {len(tokens)} tokens, too few for one row of "
                        f"data.seq_len={seq_len} (+1 target); lower data.seq_len or add text")
    return packed
