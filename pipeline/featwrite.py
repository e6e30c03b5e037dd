"""Feature rows into the cache's /features in one pass of whole, row-aligned chunk blocks.

The cache is chunked by rows (cache/store.py). Writing batch by batch would hit most chunks
several times (a 64-row batch of AlexNet's 9216-d features straddles three 28-row chunks), and
HDF5 would read back, patch and rewrite partial chunks. Here every write covers whole chunks,
assembled in memory from the new batches and the rows reused from the previous cache.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from cache.store import CacheWriter, open_checked, rows_per_chunk

BLOCK_BYTES = 8 << 20  # bytes per write: several whole chunks (chunks are ~1 MiB)


def block_rows(feature_dim: int, dtype: str, n_rows: int) -> int:
    """Rows per write: a whole number of the cache's chunks, about BLOCK_BYTES."""
    itemsize = np.dtype(dtype).itemsize
    chunk = rows_per_chunk(feature_dim, itemsize, n_rows)
    return chunk * max(1, BLOCK_BYTES // (chunk * feature_dim * itemsize))


def write_feature_rows(writer: CacheWriter, n_rows: int, feature_dim: int, dtype: str,
                       computed: dict[int, tuple[np.ndarray, int]], reused: dict[int, int],
                       old_cache: str | Path | None) -> None:
    """Fill /features rows 0..n_rows-1.

    Args:
        computed: final row -> (features array (n, D) float32 of a batch, index into it).
        reused: final row -> row of ``old_cache`` (same fingerprint, so same dtype: copied as is).
    """
    if len(computed) + len(reused) != n_rows:
        raise ValueError(f"{len(computed)} computed + {len(reused)} reused rows for {n_rows} cache rows")
    step = block_rows(feature_dim, dtype, n_rows)
    with (open_checked(old_cache) if reused else contextlib.nullcontext()) as f_old:
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            buf = np.empty((r1 - r0, feature_dim), dtype)
            old = [(r - r0, reused[r]) for r in range(r0, r1) if r in reused]
            if old:  # both caches are sorted by path, so the old rows are increasing too
                buf[[b for b, _ in old]] = f_old["features"][[o for _, o in old]]
            for r in range(r0, r1):
                src = computed.get(r)
                if src is not None:
                    buf[r - r0] = src[0][src[1]]  # float32 -> cache dtype, as astype() rounds
            writer.write_features(np.arange(r0, r1), buf)


def write_view_rows(writer: CacheWriter, n_rows: int, views: int, feature_dim: int, dtype: str,
                    computed: dict[int, tuple[np.ndarray, int]], reused: dict[int, int],
                    old_cache: str | Path | None) -> None:
    """Fill /views for the rows that have views, whole chunk blocks at a time; other rows in a
    written block hold NaN, and blocks without any such row are never written (no disk space).

    Args:
        computed: final row -> (views array (n, V, D) float32 of a batch, index into it).
        reused: final row -> row of ``old_cache`` whose views (same augment fingerprint) are copied.
    """
    step = block_rows(views * feature_dim, dtype, n_rows)
    with (open_checked(old_cache) if reused else contextlib.nullcontext()) as f_old:
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            new = [r for r in range(r0, r1) if r in computed]
            old = [(r - r0, reused[r]) for r in range(r0, r1) if r in reused]
            if not new and not old:
                continue
            buf = np.full((r1 - r0, views, feature_dim), np.nan, dtype)
            if old:
                buf[[b for b, _ in old]] = f_old["views"][[o for _, o in old]]
            for r in new:
                src = computed[r]
                buf[r - r0] = src[0][src[1]]
            writer.write_views(r0, buf)
