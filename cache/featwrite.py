"""Feature rows (and augmented views) into /features (/views) in one pass of whole, row-aligned chunk blocks.

The cache is chunked by rows (cache/store.py). Writing batch by batch would hit most chunks
several times (a 64-row batch of AlexNet's 9216-d features straddles three 28-row chunks), and
HDF5 would read back, patch and rewrite partial chunks. Here every write covers whole chunks,
assembled in memory from the new batches and the rows reused from the previous cache.

New rows come from arrays in memory or, with ``load``, from batches fetched one at a time (extraction
reads them back from its journal, cache/journal.py): a batch is loaded when its first row is written and
released after its last, so memory is one block plus about one batch, whatever the number of rows.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Hashable, Iterator

import numpy as np

from featcache.cache.store import CacheWriter, checked_reads, open_checked, rows_per_chunk

BLOCK_BYTES = 8 << 20  # bytes per write: several whole chunks (chunks are ~1 MiB)


def block_rows(feature_dim: int, dtype: str, n_rows: int) -> int:
    """Rows per write: a whole number of the cache's chunks, about BLOCK_BYTES."""
    itemsize = np.dtype(dtype).itemsize
    chunk = rows_per_chunk(feature_dim, itemsize, n_rows)
    return chunk * max(1, BLOCK_BYTES // (chunk * feature_dim * itemsize))


class _Rows:
    """Source rows of new cache rows: ``computed[row] = (source, index)``, where ``source`` is an array
    (load=None) or a key that ``load`` turns into one. A loaded array is kept until its last row has
    been taken, so each is loaded once and, when sources cover increasing rows (batches in path
    order), at most one or two are held at a time."""

    def __init__(self, computed: dict, load: Callable[[Hashable], np.ndarray] | None):
        self.computed, self.load = computed, load
        self.last: dict = {}  # source key -> its last row
        self.held: dict = {}  # source key -> loaded array
        if load is not None:
            for r, (key, _) in computed.items():
                if self.last.get(key, -1) < r:
                    self.last[key] = r

    def __call__(self, r: int) -> np.ndarray:
        src, j = self.computed[r]
        if self.load is None:
            return src[j]
        arr = self.held.get(src)
        if arr is None:
            arr = self.held[src] = self.load(src)
        if self.last[src] == r:
            del self.held[src]
        return arr[j]


def _blocks(n_rows: int, row_shape: tuple[int, ...], dtype: str, computed: dict, reused: dict[int, int], old,
            fill: float | None, load: Callable[[Hashable], np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) for whole chunk blocks of rows, assembled from new batches and ``old``
    (the previous cache's dataset). ``fill=None``: every row is covered, every block yielded;
    otherwise uncovered rows hold ``fill`` and blocks with no covered row are not yielded."""
    step = block_rows(int(np.prod(row_shape)), dtype, n_rows)
    source = _Rows(computed, load)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        new = [r for r in range(r0, r1) if r in computed]
        prev = [(r - r0, reused[r]) for r in range(r0, r1) if r in reused]
        if fill is not None and not new and not prev:
            continue
        buf = np.empty((r1 - r0, *row_shape), dtype) if fill is None else np.full((r1 - r0, *row_shape), fill, dtype)
        if prev:  # both caches are sorted by path, so the old rows are increasing too
            buf[[b for b, _ in prev]] = old[[o for _, o in prev]]
        for r in new:
            buf[r - r0] = source(r)  # float32 -> cache dtype, as astype() rounds
        yield r0, buf
        del buf  # here and in the caller: the next block is made once this one is gone


def write_feature_rows(writer: CacheWriter, n_rows: int, feature_dim: int, dtype: str,
                       computed: dict[int, tuple], reused: dict[int, int], old_cache: str | Path | None,
                       load: Callable[[Hashable], np.ndarray] | None = None) -> None:
    """Fill /features rows 0..n_rows-1.

    Args:
        computed: final row -> (features array (n, D) float32 of a batch, index into it); with ``load``,
            final row -> (batch key, index into ``load(key)``).
        reused: final row -> row of ``old_cache`` (same fingerprint, so same dtype: copied as is).
        load: batch key -> its features array, called once per batch when its first row is written.
    """
    if len(computed) + len(reused) != n_rows:
        raise ValueError(f"{len(computed)} computed + {len(reused)} reused rows for {n_rows} cache rows")
    with (open_checked(old_cache) if reused else contextlib.nullcontext()) as f_old, checked_reads(old_cache):
        old = f_old["features"] if reused else None
        for r0, buf in _blocks(n_rows, (feature_dim,), dtype, computed, reused, old, fill=None, load=load):
            writer.write_features(np.arange(r0, r0 + len(buf)), buf)
            del buf  # before the next block is made (_blocks lets go too): one block at a time, not two


def write_view_rows(writer: CacheWriter, n_rows: int, views: int, feature_dim: int, dtype: str,
                    computed: dict[int, tuple], reused: dict[int, int], old_cache: str | Path | None,
                    load: Callable[[Hashable], np.ndarray] | None = None) -> None:
    """Fill /views for the rows that have views, whole chunk blocks at a time; other rows in a
    written block hold NaN, and blocks without any such row are never written (no disk space).

    Args:
        computed: final row -> (views array (n, V, D) float32 of a batch, index into it); with ``load``,
            final row -> (batch key, index into ``load(key)``).
        reused: final row -> row of ``old_cache`` whose views (same augment fingerprint) are copied.
        load: batch key -> its views array, called once per batch when its first row is written.
    """
    with (open_checked(old_cache) if reused else contextlib.nullcontext()) as f_old, checked_reads(old_cache):
        old = f_old["views"] if reused else None
        for r0, buf in _blocks(n_rows, (views, feature_dim), dtype, computed, reused, old, fill=np.nan, load=load):
            writer.write_views(r0, buf)
            del buf
