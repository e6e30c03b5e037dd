"""Row sources: the exact linear probe's view of X as row chunks, for caches larger than memory.

The solver (heads/exact.py) touches X only through passes over all its rows: the logits and
gradient of every L-BFGS iteration, the class curvature at each block's start, Sigma for the
preconditioner and the column statistics. Each pass is a loop over ``chunks()``; the sums over
rows (data term, curvature, statistics, Sigma) are accumulated in float64, as the one-tensor
path sums them, and the gradient's GEMM is accumulated chunk by chunk in X's dtype.

Protocol (what a source must offer; ``TensorSource`` is the in-memory one)::

    n_rows: int; n_cols: int          # X is (n_rows, n_cols)
    dtype: torch.dtype                # of every chunk (float32 or float64)
    device: torch.device              # where chunks live: the solver computes there
    chunks() -> Iterator[(slice, Tensor)]

``chunks()`` yields ``(rows, X[rows])`` for consecutive slices ``rows`` (step 1) that cover
``range(n_rows)`` once, in order, every time it is called (the solver calls it once per pass,
tens to hundreds of times): each tensor is (rows.stop - rows.start, n_cols), of ``dtype``, on
``device``, already standardised (the solver does no scaling of its own unless asked per fold).
A chunk may be a view of a buffer that the next chunk overwrites: the solver keeps nothing of
it. Labels and row weights stay in memory ((N,) each), only X streams. Rotation into Sigma's
eigenbasis (exact.ROTATE_ROWS) needs X in memory and applies to plain tensors only.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RowSource(Protocol):
    """X (n_rows, n_cols) as consecutive row chunks; see the module doc for the contract."""

    n_rows: int
    n_cols: int
    dtype: torch.dtype
    device: torch.device

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        ...


class TensorSource:
    """An in-memory (N, D) tensor as a RowSource: one chunk (views, no copy), or chunks of a fixed
    number of rows, or of the given uneven sizes (tests use those to check the chunked passes)."""

    def __init__(self, X: torch.Tensor, chunk_rows: int | Sequence[int] | None = None):
        """Args:
            X: (N, D) rows, on the solver's device.
            chunk_rows: None = one chunk; an int = chunks of that many rows (the last may be
                shorter); a sequence = the sizes of the chunks in order, summing to N.
        """
        if X.dim() != 2:
            raise ValueError(f"TensorSource: X must be (rows, columns), got shape {tuple(X.shape)}")
        n = X.shape[0]
        if chunk_rows is None:
            sizes = [n]
        elif isinstance(chunk_rows, int):
            if chunk_rows < 1:
                raise ValueError(f"TensorSource: chunk_rows must be >= 1, got {chunk_rows}")
            sizes = [min(chunk_rows, n - s) for s in range(0, n, chunk_rows)]
        else:
            sizes = [int(s) for s in chunk_rows]
            if min(sizes, default=0) < 1 or sum(sizes) != n:
                raise ValueError(f"TensorSource: chunk_rows must be positive sizes summing to {n} rows")
        self.X, self.sizes = X, sizes
        self.n_rows, self.n_cols, self.dtype, self.device = n, X.shape[1], X.dtype, X.device

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        start = 0
        for size in self.sizes:
            yield slice(start, start + size), self.X[start: start + size]
            start += size


class ColumnSubset:
    """The columns ``keep`` (sorted indices) of another source, selected chunk by chunk (a copy of
    one chunk at a time, never of X): how the solver leaves out constant columns of a stream."""

    def __init__(self, source: RowSource, keep: torch.Tensor):
        self.source, self.keep = source, keep.to(source.device)
        self.n_rows, self.n_cols = source.n_rows, len(keep)
        self.dtype, self.device = source.dtype, source.device

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for rows, Xc in self.source.chunks():
            yield rows, Xc.index_select(1, self.keep)
