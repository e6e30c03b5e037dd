"""Streaming (out-of-core) features: fit-head and evaluate on caches larger than memory.

``H5Rows`` is a heads.source.RowSource over rows of a cache's /features read from the file on every
pass: a background thread reads the next chunk into a ring of reused buffers while the solver
computes on the current one (standardised in place, on the solver's threads), so the process
holds a few chunks, never the matrix. Reads go by *pieces*: aligned windows of whole HDF5 chunks
(~1 MiB each, fletcher32 verified by HDF5 on every read), so a pass reads each stored chunk once.

- ``chunks()``: the rows in file order (the exact probe's passes, statistics, evaluation);
- ``epoch_batches()``: every row once per epoch for the epoch trainer, in a random order of
  pieces, shuffled uniformly inside a window of ``window_rows`` rows (see ``epoch_batches``).

Every pass opens the file anew and checks that it is still the file first opened (same inode,
size and modification time): an extract that replaces the cache during a run is an error, not a
silent mix of two caches.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from featcache.cache.store import checked_reads, open_checked
from featcache.pipeline.errors import FeatcacheError

CHUNK_BYTES = 64 << 20  # most rows handed to the solver at once (bytes of one ring buffer)
PIECE_BYTES = 4 << 20  # the unit read and shuffled (whole HDF5 chunks): 512 rows of 2,048 float32
RING = 3  # buffers: one the solver holds, one ready, one being read


@dataclass(frozen=True)
class StreamSettings:
    """How a streamed run reads: rows per chunk and the epoch trainer's shuffle window (rows)."""

    chunk_rows: int
    window_rows: int
    in_memory: bool = False  # a float16 cache held at float16 in memory, read from there (not the file)

    def buffer_bytes(self, n_cols: int, full_cols: int, epochs: bool) -> int:
        """Bytes the reader and the shuffle window hold (float32): the ring, one piece of the file's
        full width for gathers, and with ``epochs`` the window and one batch of it."""
        ring = (RING + 2) * self.chunk_rows * n_cols * 4 + self.chunk_rows * full_cols * 4  # + statistics' temporaries
        return ring + (self.window_rows * n_cols * 4 * 2 if epochs else 0)


@dataclass
class StreamStats:
    """What the passes over one streamed cache cost: metrics.json carries it (bench/scale.py reads it).

    ``wait`` is the time the solver spent waiting for a chunk: near 0 means the reader keeps ahead
    (the solver is the bottleneck); near ``seconds`` means the solver waits on the disk."""

    passes: int = 0
    stored_bytes: int = 0  # bytes of /features read, at the cache's dtype
    seconds: float = 0.0  # wall time inside passes
    wait: float = 0.0

    def record(self) -> dict:
        gbps = self.stored_bytes / self.seconds / 1e9 if self.seconds else None
        return {"passes": self.passes, "stored_bytes": self.stored_bytes, "seconds": round(self.seconds, 3),
                "wait_seconds": round(self.wait, 3), "gb_per_s": None if gbps is None else round(gbps, 3)}


def default_chunk_rows(n_cols: int) -> int:
    """Rows of a CHUNK_BYTES chunk of float32 rows n_cols wide (a source's default, the plan's start)."""
    return max(1, CHUNK_BYTES // (4 * n_cols))


def _piece_rows(hdf5_rows: int, full_cols: int, chunk_rows: int) -> int:
    """About PIECE_BYTES of rows and at most a chunk, a whole number of HDF5 chunks when that is at
    least one: each stored chunk is then decoded (and its checksum verified) once per pass (a
    smaller piece reads part of one, which HDF5's 1 MiB chunk cache keeps for the next piece)."""
    rows = max(1, min(PIECE_BYTES // (full_cols * 4), chunk_rows))
    return rows // hdf5_rows * hdf5_rows if rows >= hdf5_rows else rows


def file_identity(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class H5Rows:
    """Rows ``rows`` (sorted, unique) of /features as a RowSource: float32 (n, D'), standardised with
    ``mean``/``scale`` when given, columns ``columns`` only when given, on ``device``."""

    def __init__(self, path: str | Path, rows: np.ndarray, *, chunk_rows: int | None = None, device: torch.device | str = "cpu",
                 columns: np.ndarray | None = None, mean: np.ndarray | None = None,
                 scale: np.ndarray | None = None, identity: tuple | None = None, piece_rows: int | None = None,
                 stats: StreamStats | None = None, window_rows: int = 0, array: np.ndarray | None = None):
        """Args:
            path: the cache file; rows: (n,) sorted row indices into /features.
            chunk_rows: most rows per chunk (at least one piece); None = ``default_chunk_rows``.
            columns: (D',) column indices, or None = every column.
            mean, scale: (D',) float32 standardisation, or None.
            identity: what ``file_identity(path)`` was when the run read the cache's metadata (None = now).
            piece_rows: rows per piece (None = about PIECE_BYTES of whole HDF5 chunks).
            stats: where passes add their cost (shared with ``subset``s); None = a new one.
            window_rows: the epoch trainer's shuffle window (``epoch_batches``), rows.
            array: the whole /features already in memory at the cache's dtype (a float16 cache kept
                at float16): chunks are read (and upcast) from it instead of the file.
        """
        self.path, self.rows = Path(path), np.asarray(rows, dtype=np.int64)
        self.columns, self.mean, self.scale = columns, mean, scale
        self._stats_on: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, scale as tensors on the device
        self.identity = identity or file_identity(self.path)
        self.stats = stats if stats is not None else StreamStats()
        self.window_rows, self.array = window_rows, array
        if array is not None:
            (n_file, self.full_cols), self.itemsize, hdf5_rows = array.shape, array.itemsize, 1
        else:
            with open_checked(self.path) as f:
                ds = f["features"]
                n_file, self.full_cols = ds.shape
                self.itemsize = ds.dtype.itemsize
                hdf5_rows = ds.chunks[0] if ds.chunks else 1
        if len(self.rows) and (self.rows[0] < 0 or self.rows[-1] >= n_file or np.any(np.diff(self.rows) <= 0)):
            raise ValueError("H5Rows: rows must be sorted, unique row indices of /features")
        self.n_rows = len(self.rows)
        self.n_cols = self.full_cols if columns is None else len(columns)
        chunk_rows = max(int(chunk_rows or default_chunk_rows(self.n_cols)), 1)
        self.piece_rows = piece_rows or _piece_rows(hdf5_rows, self.full_cols, chunk_rows)
        self.chunk_rows = max(int(chunk_rows), self.piece_rows)  # a chunk holds one piece at least
        self.dtype, self.device = torch.float32, torch.device(device)
        # the pieces that hold some of the rows: (window start, first position, end position)
        starts = np.unique(self.rows // self.piece_rows) * self.piece_rows
        self._pieces = np.stack([starts, np.searchsorted(self.rows, starts),
                                 np.searchsorted(self.rows, starts + self.piece_rows)], 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    def __len__(self) -> int:
        return self.n_rows

    def subset(self, positions: np.ndarray) -> "H5Rows":
        """The rows at ``positions`` (sorted indices into this source's rows), read alike."""
        return H5Rows(self.path, self.rows[positions], chunk_rows=self.chunk_rows, device=self.device,
                      columns=self.columns, mean=self.mean, scale=self.scale, identity=self.identity,
                      piece_rows=self.piece_rows, stats=self.stats, window_rows=self.window_rows, array=self.array)

    # ------------------------------------------------------------------ passes
    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, X[positions]) in file order; each tensor is valid until the next is asked for."""
        for pieces, x in self._read(self._groups(np.arange(len(self._pieces)))):
            yield slice(int(self._pieces[pieces[0], 1]), int(self._pieces[pieces[-1], 2])), x

    def epoch_batches(self, batch_size: int, generator: torch.Generator, window_rows: int,
                      min_rows: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: (positions (b,) long, rows (b, D')) batches covering every row exactly once.

        In memory an epoch is one uniform permutation of all rows. Streamed, the pieces (runs of
        ~PIECE_BYTES consecutive rows of the file) are read in a uniformly random order, and rows
        are drawn uniformly without replacement from a window of up to ``window_rows`` rows that
        is refilled as it empties. Rows of one piece (neighbours in the file: with a folder
        tree's cache, often one class) are therefore more likely to share a batch than in memory:
        the window holds window_rows / piece_rows pieces from all over the file. A last batch
        smaller than ``min_rows`` is dropped, as in memory (batch norm cannot normalise 1 row).
        """
        order = torch.randperm(len(self._pieces), generator=generator).numpy()
        window_rows = max(window_rows, 2 * batch_size)  # a drain leaves < window/2 + batch rows: room for a chunk
        window = torch.empty(window_rows + self.chunk_rows, self.n_cols, dtype=torch.float32, device=self.device)
        pos = torch.empty(window_rows + self.chunk_rows, dtype=torch.long)
        held = 0
        for pieces, x in self._read(self._groups(order)):
            window[held: held + len(x)] = x
            pos[held: held + len(x)] = torch.from_numpy(np.concatenate([np.arange(*self._pieces[p, 1:]) for p in pieces]))
            held += len(x)
            if held >= window_rows:
                held = yield from self._drain(window, pos, held, batch_size, generator, keep=window_rows // 2)
        perm = torch.randperm(held, generator=generator)
        for s in range(0, held, batch_size):
            idx = perm[s: s + batch_size]
            if len(idx) >= min_rows:
                yield pos[idx].to(self.device), window.index_select(0, idx.to(self.device))

    def _drain(self, window: torch.Tensor, pos: torch.Tensor, held: int, batch_size: int,
               generator: torch.Generator, keep: int):
        """Yield batches drawn uniformly from the window until ``keep`` rows or fewer are left; the
        rows left are moved to its front. Returns the count left."""
        perm = torch.randperm(held, generator=generator)
        n_out = (held - keep) // batch_size * batch_size
        for s in range(0, n_out, batch_size):
            idx = perm[s: s + batch_size]
            yield pos[idx].to(self.device), window.index_select(0, idx.to(self.device))
        rest = perm[n_out:].sort().values
        window[: len(rest)] = window.index_select(0, rest.to(self.device))
        pos[: len(rest)] = pos[rest]
        return len(rest)

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        """x standardised in place, by torch on the solver's threads (and device): the reader's one
        core then only reads. (x - mean) / scale, rounded as data.py's in-memory path rounds it."""
        if self.mean is None:
            return x
        if self._stats_on is None or self._stats_on[0].device != x.device:
            self._stats_on = (torch.from_numpy(self.mean).to(x.device), torch.from_numpy(self.scale).to(x.device))
        return x.sub_(self._stats_on[0]).div_(self._stats_on[1])

    def _groups(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive pieces of ``order`` grouped into chunks of at most chunk_rows rows (at least one piece)."""
        sizes = self._pieces[order, 2] - self._pieces[order, 1]
        groups, start, rows = [], 0, 0
        for i, n in enumerate(sizes):
            if i > start and rows + n > self.chunk_rows:
                groups.append(order[start:i])
                start, rows = i, 0
            rows += n
        if len(order):
            groups.append(order[start:])
        return groups

    def _read(self, groups: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(pieces, their rows (n, D')) per group, read by a background thread into RING buffers.

        A buffer goes back to the reader when the next chunk is asked for (the solver keeps
        nothing of a chunk), so at most RING chunks exist; a read error (fletcher32 mismatch, a
        replaced file) is raised here, in the caller's thread."""
        cap = max(int((self._pieces[g, 2] - self._pieces[g, 1]).sum()) for g in groups) if groups else 0
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for _ in range(RING):
            free.put(np.empty((cap, self.n_cols), np.float32))
        worker = threading.Thread(target=self._reader, args=(groups, free, ready), daemon=True,
                                  name="featcache-reader")
        t_start = time.perf_counter()
        worker.start()
        held = None
        try:
            for _ in groups:
                if held is not None:
                    free.put(held)
                t0 = time.perf_counter()
                item = ready.get()
                self.stats.wait += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                pieces, held, n = item
                yield pieces, self._standardised(torch.from_numpy(held[:n]).to(self.device))
        finally:
            free.put(None)  # a reader waiting for a buffer stops; one mid-read finishes that read
            worker.join()
            self.stats.passes += 1
            self.stats.seconds += time.perf_counter() - t_start

    def _reader(self, groups: list[np.ndarray], free: queue.Queue, ready: queue.Queue) -> None:
        try:
            if self.array is not None:
                self._fill(_InMemory(self.array), groups, free, ready)
                return
            with open_checked(self.path) as f, checked_reads(self.path):
                if file_identity(self.path) != self.identity:
                    raise FeatcacheError(f"{self.path} changed while featcache was reading it (another extract "
                                         "replaced it); run again once the extract has finished")
                self._fill(f["features"], groups, free, ready)
        except BaseException as e:  # handed to the consumer, raised there
            ready.put(e)

    def _fill(self, ds, groups: list[np.ndarray], free: queue.Queue, ready: queue.Queue) -> None:
        """Read each group into a free buffer and hand it over, until done or told to stop (None)."""
        scratch: list[np.ndarray] = []  # one piece of whole rows, for gathers
        for pieces in groups:
            buf = free.get()
            if buf is None:
                return
            n = self._read_group(ds, pieces, buf, scratch)
            ready.put((pieces, buf, n))

    def _read_group(self, ds, pieces: np.ndarray, buf: np.ndarray, scratch: list[np.ndarray]) -> int:
        """Read the wanted rows of ``pieces`` into buf, in order; returns how many. Consecutive
        pieces whose rows are whole runs go in one read_direct straight into buf (a pass in file
        order reads a chunk in one call: 2.0 GB/s against 1.1 GB/s piece by piece, measured);
        other pieces are read whole and gathered."""
        n, run = 0, None  # run: [first row, end row, offset in buf] of whole rows not read yet
        for p in pieces:
            start, p0, p1 = (int(v) for v in self._pieces[p])
            rows = self.rows[p0:p1]
            whole = self.columns is None and rows[-1] - rows[0] == p1 - p0 - 1
            if whole and run is not None and run[1] == rows[0]:
                run[1] = int(rows[-1]) + 1
            else:
                self._read_run(ds, run, buf)
                run = [int(rows[0]), int(rows[-1]) + 1, n] if whole else None
                if not whole:
                    self._gather(ds, start, rows, buf[n: n + p1 - p0], scratch)
            n += p1 - p0
        self._read_run(ds, run, buf)
        return n

    def _read_run(self, ds, run: list[int] | None, buf: np.ndarray) -> None:
        if run is not None:
            first, end, at = run
            ds.read_direct(buf, np.s_[first:end], np.s_[at: at + end - first])
            self.stats.stored_bytes += (end - first) * self.full_cols * self.itemsize

    def _gather(self, ds, start: int, rows: np.ndarray, out: np.ndarray, scratch: list[np.ndarray]) -> None:
        """The piece at ``start`` read whole (whole rows), then ``rows`` (and the columns) copied out."""
        stop = min(start + self.piece_rows, ds.shape[0])
        if not scratch:  # made the first time a gather needs it
            scratch.append(np.empty((self.piece_rows, self.full_cols), np.float32))
        ds.read_direct(scratch[0], np.s_[start:stop], np.s_[: stop - start])
        self.stats.stored_bytes += (stop - start) * self.full_cols * self.itemsize
        sel = scratch[0][rows - start]
        out[...] = sel if self.columns is None else sel[:, self.columns]


class _InMemory:
    """/features held in memory, read as h5py reads the file: ``read_direct`` upcasts into float32."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def read_direct(self, dest: np.ndarray, source_sel, dest_sel) -> None:
        dest[dest_sel] = self.array[source_sel]


STAT_ROWS = 4096  # rows per statistics update: bounds its float64 temporaries


def _merge(count: int, mean: np.ndarray, m2: np.ndarray, x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) of the rows so far merged with rows x (b, D) float32 (Chan et al.)."""
    n_b = len(x)
    mean_b = x.mean(0, dtype=np.float64)
    centre = mean_b.astype(np.float32)  # deviations in float32, squared and summed in float64
    m2_b = np.square(x - centre, dtype=np.float64).sum(0) - n_b * (mean_b - centre) ** 2
    delta = mean_b - mean
    total = count + n_b
    return total, mean + delta * (n_b / total), m2 + m2_b + delta ** 2 * (count * n_b / total)


def streamed_moments(src: H5Rows, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over ``src`` (raw rows): the z-score statistics of its rows at positions ``train``
    and which rows are not finite.

    Returns (mean (D,) float32, scale (D,) float32, bad (n,) bool). The statistics are merged chunk
    by chunk in float64 (Chan et al.'s pairwise update of count, mean and sum of squared
    deviations), as numerically sound as data.zscore_stats' two passes over memory. Constant
    columns get scale 1, as there. Non-finite training rows are left out of the statistics.
    """
    is_train = np.zeros(len(src), bool)
    is_train[train] = True
    bad = np.zeros(len(src), bool)
    count, mean, m2 = 0, np.zeros(src.n_cols), np.zeros(src.n_cols)
    for rows, x in src.chunks():
        xn = x.numpy() if x.device.type == "cpu" else x.cpu().numpy()
        finite = np.isfinite(xn).all(axis=1)
        bad[rows] = ~finite
        take = is_train[rows] & finite
        if not take.any():
            continue
        xt = xn[take] if not take.all() else xn
        for s in range(0, len(xt), STAT_ROWS):
            count, mean, m2 = _merge(count, mean, m2, xt[s: s + STAT_ROWS])
    scale = np.sqrt(m2 / max(count, 1)).astype(np.float32)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale, bad
