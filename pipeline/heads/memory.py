"""fit-head's memory plan: the bytes a run needs, known before it starts, against what the machine has.

Estimated per part (bytes, float32 throughout):
- features: the (N, D) matrix, held once (heads/data.py reads it block by block into its final array,
  standardises it in place and hands out contiguous splits as views);
- views: the augmented views of the training rows, (M, V, D);
- gathers: the train/val rows copied out when a split is not one contiguous range (a hold-out of
  the train split interleaves them);
- solver: what the head kind needs beyond the data (HeadKind.solver_bytes): a stack's parameters,
  gradients and optimizer state, the exact probe's logits over every row and its history, a k-NN
  bank, a scikit-learn copy;
- stream: streaming mode only (features 0 then): the reader's ring of chunks and the epoch
  trainer's shuffle window (heads/stream.py ``StreamSettings.buffer_bytes``);
- runtime: the interpreter, torch and its allocator (RUNTIME_BYTES, measured as the peak RSS of
  fit-head on a tiny cache on the development machine).

The plan is compared with the memory this process may use: the smaller of the kernel's
MemAvailable and the cgroup's limit less its usage, or ``max_memory`` when given. Both bound the
run's own allocations (``work``: every part but the runtime, which is resident before the plan is
made), so a process's peak RSS is about ``work`` + the runtime. fit-head plans in memory first; when that does
not fit it plans streaming (``stream_plan``: chunks sized to the room left) and says so in one
line; a plan that does not fit either way is refused before any work with one line that names the
numbers, instead of meeting the OOM killer.
"""
from __future__ import annotations

import os
import re
import resource
from dataclasses import asdict, dataclass

from featcache.pipeline.errors import FeatcacheError, opt

# python, torch, numpy, h5py, sklearn: 1.0 GB peak RSS of fit-head on a 0.8 MB cache (AMD EPYC dev machine;
# ``import torch`` alone is 0.79 GB resident). Already resident when the plan is made, so it is reported
# with the plan but not held against the limit: max_memory bounds what fit-head allocates beyond it.
RUNTIME_BYTES = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int | None, name: str = "max_memory") -> int | None:
    """``4G``, ``512M``, ``1.5G`` or a number of bytes -> bytes (powers of 1,024); None stays None."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(value), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise FeatcacheError(f"{name} takes a size such as 4G, 512M or a number of bytes, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2) still lets this process use, or None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_bytes() -> int:
    """Memory a new allocation can get: MemAvailable, or less under a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:  # not Linux: physical memory as the bound
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (the kernel's ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryPlan:
    features: int
    views: int
    gathers: int
    solver: int
    runtime: int
    available: int
    budget: int | None = None  # max_memory, when given
    stream: int = 0  # streaming buffers (features 0 then)
    mode: str = "memory"  # memory | memory16 (a float16 cache kept at float16, upcast per chunk) | stream
    chunk_rows: int | None = None  # streaming: rows per chunk
    window_rows: int | None = None  # streaming, epoch-trained heads: rows of the shuffle window

    @property
    def total(self) -> int:
        return self.features + self.views + self.gathers + self.solver + self.stream + self.runtime

    @property
    def work(self) -> int:
        """What the run allocates beyond the resident runtime: what the limit bounds."""
        return self.total - self.runtime

    @property
    def limit(self) -> int:
        return min(self.available, self.budget) if self.budget else self.available

    def record(self) -> dict:
        """What metrics.json and --json carry (bytes)."""
        return {**asdict(self), "total": self.total, "work": self.work, "limit": self.limit}

    @property
    def limit_text(self) -> str:
        """What bounds the run, for messages: ``--max-memory 4.0 GB`` or ``21.6 GB available``."""
        if self.budget and self.budget < self.available:
            return f"{opt('max_memory')} {_gb(self.budget)}"
        return f"{_gb(self.available)} available"

    @property
    def fits(self) -> bool:
        return self.work <= self.limit

    def check(self, no_stream: str | None = None) -> None:
        """One line, before any work, when the run would not fit.

        Args:
            no_stream: in memory, why streaming is no way out (an option it does not support).
        """
        if self.fits:
            return
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in asdict(self).items()
                          if k in ("features", "views", "gathers", "solver", "stream") and v >= self.work // 20)
        which = self.limit_text
        if self.mode == "stream":
            raise FeatcacheError(f"fit-head needs about {_gb(self.work)} even when streaming the cache ({parts}), "
                                 f"{which}; train fewer configurations or columns ({opt('layers')}), or on a "
                                 "machine with more memory")
        raise FeatcacheError(f"fit-head needs about {_gb(self.work)} in memory ({parts}), {which}; "
                             f"streaming the cache instead is not built for {no_stream}")


def size_text(n: int) -> str:
    """Bytes as GB (powers of 1,024, one decimal), or MB below 1 GB."""
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MB"


_gb = size_text


def plan(*, n_rows: int, dim: int, contiguous: bool, view_rows: int, n_views: int, solver: int,
         budget: int | None = None) -> MemoryPlan:
    """The plan of one fit-head run (see the module docstring for each part).

    Args:
        n_rows, dim: the feature matrix held (every row of the cache, the columns trained on).
        contiguous: whether train, val and test are each one range of rows (else they are gathered).
        view_rows, n_views: rows with augmented views and views per row (0, 0 without).
        solver: the head kind's own bytes (HeadKind.solver_bytes).
        budget: max_memory in bytes, or None.
    """
    row = dim * 4
    return MemoryPlan(features=n_rows * row, views=view_rows * n_views * row,
                      gathers=0 if contiguous else n_rows * row, solver=solver, runtime=RUNTIME_BYTES,
                      available=available_bytes(), budget=budget)


def stream_plan(*, n_rows: int, dim: int, full_dim: int, epochs: bool, n_train: int, batch_size: int,
                solver_of, budget: int | None = None) -> MemoryPlan:
    """The plan of a streamed run: the largest chunks (up to stream.CHUNK_BYTES) whose plan fits,
    and for epoch-trained heads a shuffle window of half the room then left (up to every train row).

    Args:
        n_rows: rows of the cache (labels and row indices stay in memory: 32 bytes a row);
        dim, full_dim: columns trained on and stored (a gather reads whole rows);
        epochs: an epoch-trained kind (it needs the shuffle window);
        solver_of: pass_rows -> the kind's own bytes when a pass holds that many rows.
    Returns:
        The fitting plan, or the smallest one (``check`` then refuses it with its numbers).
    """
    from featcache.pipeline.heads.stream import StreamSettings, default_chunk_rows

    avail = available_bytes()
    limit = min(avail, budget) if budget else avail
    row = dim * 4
    chunk = min(default_chunk_rows(dim), max(n_rows, 1))
    while True:
        solver = solver_of(chunk) + n_rows * 32
        ring = StreamSettings(chunk, 0).buffer_bytes(dim, full_dim, epochs=False)
        room = limit - solver - ring
        window = min(n_train, max(room // 2 // (2 * row), 0)) if epochs else 0
        settings = StreamSettings(chunk, window)
        enough = not epochs or window >= min(n_train, max(4 * batch_size, 4096))
        if (room > 0 and enough) or chunk <= 256:
            return MemoryPlan(features=0, views=0, gathers=0, solver=solver, runtime=RUNTIME_BYTES, available=avail,
                              budget=budget, stream=settings.buffer_bytes(dim, full_dim, epochs), mode="stream",
                              chunk_rows=chunk, window_rows=window or None)
        chunk //= 2
