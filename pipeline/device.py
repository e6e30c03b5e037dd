"""Device and thread choices shared by extraction and training."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from featcache.pipeline.errors import FeatcacheError


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a device, failing clearly when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {name} requested but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise FeatcacheError(f"unknown device {name!r} (use auto, cpu or cuda)") from e


def usable_cores() -> int:
    """Cores this process may run on (respects affinity masks and cgroup-pinned CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class DecodeLayout:
    """Where JPEG decoding runs relative to the backbone."""

    processes: int  # DataLoader worker processes, prefetching while the backbone computes; 0 = none
    threads: int  # decoding threads in this process (when processes == 0); 0 = decode inline
    prefetch: int = 2  # in-process: batches decoded ahead of the backbone; 0 = on demand (alternating)

    def describe(self) -> str:
        if self.processes:
            return f"{self.processes} worker process{'es' if self.processes > 1 else ''}, prefetching"
        if not self.threads:
            return "inline"
        how = "prefetching" if self.prefetch else "alternating with compute"
        return f"{self.threads} thread{'s' if self.threads > 1 else ''} in-process, {how}"


def cores_per_process() -> int:
    """Usable cores divided among the processes torchrun started on this node (LOCAL_WORLD_SIZE)."""
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def compute_threads(device: torch.device) -> int | None:
    """Intra-op threads for the backbone: this process's share of the cores on the CPU
    (None: leave as is).

    A function of the machine only, never of ``--workers``: some CPU kernels (e.g. in
    EfficientNet-Lite0) give bitwise different results with a different thread count, and a
    resumed run must store exactly what an uninterrupted one would have.
    """
    return cores_per_process() if device.type == "cpu" else None


def decode_layout(device: torch.device, workers: int | None) -> DecodeLayout:
    """Place decoding for ``--workers`` (N > 0 processes, 0 in-process, None = chosen here).

    CPU: the backbone's OpenMP threads already occupy every core, so by default decoding takes
    turns with compute in a pool of one thread per core: all cores decode a batch, then all cores
    run the backbone on it, never more busy threads than cores. Overlapping instead (decoding
    processes prefetching, ``--workers N``) puts extra busy threads on those cores, and a
    preempted OpenMP thread holds up its whole operator. On the 2-core machine
    ``bench/extract.py --decode-check`` measured the two within ~5% of each other (the
    prefetching process slightly ahead while other jobs loaded the machine): overlap is
    available with ``--workers N``, but is not worth oversubscribing the cores by default.
    CUDA: the CPU is idle while the GPU computes, so decoding prefetches alongside it: one
    process per core but one (the main process feeds the GPU), or threads on small machines.
    """
    if workers is not None and workers > 0:
        return DecodeLayout(workers, 0)
    cores = cores_per_process()
    if device.type == "cpu":
        return DecodeLayout(0, cores, prefetch=0)
    if workers is None and cores >= 3:
        return DecodeLayout(min(cores - 1, 32), 0)
    return DecodeLayout(0, cores, prefetch=2)
