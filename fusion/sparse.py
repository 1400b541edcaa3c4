"""Sparse next-token distributions, the currency every stage after `logits` trades in.

Row convention (all stages): a block of text tokenized by a model gives tokens t_0..t_{n-1}.
The model always sees its BOS token (or EOS where it has no BOS) in front, so row j is the
model's distribution over token j given BOS + t_0..t_{j-1}. Rows and tokens have the same
count; no padding is ever stored.

A `SparseRows` holds many rows back to back: row r owns `ids[ptr[r]:ptr[r+1]]` and the
matching `logprobs`; `tail[r]` is the probability mass that the listed entries do not cover
(what lies outside the top-k, plus whatever could not be mapped). A row with no entries means
"no distribution here": training falls back to the one-hot on the real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    counts: np.ndarray  # uint8/int32 [rows]: entries per row (0 = no distribution)
    ids: np.ndarray  # int32 [nnz]: token ids (in the vocabulary of whoever owns the rows)
    logprobs: np.ndarray  # float32 [nnz]: natural-log probabilities, descending within a row
    tail: np.ndarray  # float32 [rows]: probability mass not listed in the row

    def __post_init__(self):
        if int(self.counts.sum()) != len(self.ids) or len(self.ids) != len(self.logprobs):
            raise ValueError(
                f"SparseRows: counts sum to {int(self.counts.sum())} but there are "
                f"{len(self.ids)} ids and {len(self.logprobs)} logprobs"
            )
        if len(self.tail) != len(self.counts):
            raise ValueError(f"SparseRows: {len(self.counts)} rows but {len(self.tail)} tail values")

    @property
    def rows(self) -> int:
        return len(self.counts)

    @property
    def ptr(self) -> np.ndarray:
        ptr = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=ptr[1:])
        return ptr

    @classmethod
    def from_topk(cls, topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail: np.ndarray) -> SparseRows:
        """Dense top-k [rows, k] arrays (a model's own logits) as sparse rows."""
        rows, k = topk_ids.shape
        return cls(
            counts=np.full(rows, k, dtype=np.int32),
            ids=topk_ids.reshape(-1).astype(np.int32),
            logprobs=topk_logprobs.reshape(-1).astype(np.float32),
            tail=tail.astype(np.float32),
        )

    def slice(self, start: int, stop: int) -> SparseRows:
        """Rows start..stop-1 as their own SparseRows (views where possible)."""
        ptr = self.ptr
        a, b = ptr[start], ptr[stop]
        return SparseRows(self.counts[start:stop], self.ids[a:b], self.logprobs[a:b], self.tail[start:stop])

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows as dense [rows, width] arrays: ids padded with -1, logprobs with -inf."""
        width = int(self.counts.max(initial=0)) if width is None else width
        ids = np.full((self.rows, width), -1, dtype=np.int32)
        logprobs = np.full((self.rows, width), -np.inf, dtype=np.float32)
        ptr = self.ptr
        row = np.repeat(np.arange(self.rows), self.counts)
        col = np.arange(len(self.ids)) - ptr[row]
        keep = col < width
        ids[row[keep], col[keep]] = self.ids[keep]
        logprobs[row[keep], col[keep]] = self.logprobs[keep]
        return ids, logprobs


def canonical_order(ids, values):
    """Torch [rows, k] entries in the stored order: by value, descending; ties by ascending id."""
    ids, order = ids.sort(dim=-1)
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), values


def concat(parts: list[SparseRows]) -> SparseRows:
    return SparseRows(
        counts=np.concatenate([p.counts for p in parts]),
        ids=np.concatenate([p.ids for p in parts]),
        logprobs=np.concatenate([p.logprobs for p in parts]),
        tail=np.concatenate([p.tail for p in parts]),
    )
