"""Device and thread choices shared by extraction and training."""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA kernel driver knows of a GPU here (whether or not torch can use it)."""
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


@functools.lru_cache(maxsize=1)
def cuda_probe() -> tuple[bool, str]:
    """(CUDA usable, why not when this machine has an NVIDIA GPU that torch cannot use; else "").

    Cached: torch decides CUDA's availability once per process and warns about a failed
    initialisation ("CUDA initialization: ...") only on that first call, so the reason is kept here.
    A machine without any NVIDIA GPU, or whose GPUs CUDA_VISIBLE_DEVICES hides on purpose, has no
    reason: the CPU is then the expected device, not a fallback.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return True, ""
    init = [str(w.message) for w in caught if "CUDA initialization" in str(w.message)]
    if init:
        return False, " ".join(init[0].split())
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")
    if hidden or not nvidia_gpu_present():
        return False, ""
    if torch.version.cuda is None:
        return False, f"an NVIDIA GPU is present but this torch {torch.__version__} was built without CUDA"
    return False, f"an NVIDIA GPU is present but CUDA {torch.version.cuda} failed to initialise (driver, container?)"


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a device, failing clearly when CUDA is asked for but absent.

    ``auto`` picks CUDA when usable; when a GPU is present but unusable it says so in one
    FeatcacheWarning (printed by the CLI as one ``featcache: warning:`` line) and picks the CPU.

    Args:
        name: the ``device`` option (``--device`` on the command line).
    Returns:
        The device; raises FeatcacheError for an unknown name, CUDA without a usable GPU, or a
        ``cuda:N`` beyond this machine's GPU count.
    """
    available, reason = cuda_probe()
    if name == "auto":
        if not available and reason:
            warnings.warn(f"--device auto: {reason}; running on the CPU", FeatcacheWarning, stacklevel=2)
        return torch.device("cuda" if available else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FeatcacheError(f"unknown device {name!r} (use auto, cpu or cuda[:N])") from None
    if device.type == "cuda":
        if not available:
            why = f" ({reason})" if reason else ""
            raise FeatcacheError(f"--device {name} requested but no CUDA GPU is available{why} (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FeatcacheError(f"--device {name}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                                 f"(cuda:0 to cuda:{count - 1})")
    elif device.type != "cpu":
        raise FeatcacheError(f"unknown device {name!r} (use auto, cpu or cuda[:N])")
    return device


@contextlib.contextmanager
def cuda_math(*, deterministic: bool, benchmark: bool, tf32: bool) -> Iterator[None]:
    """cuDNN/cuBLAS settings for the duration, restored afterwards (they are process-wide).

    Args:
        deterministic: cuDNN uses only deterministic convolution algorithms.
        benchmark: cuDNN times candidate algorithms per input shape in this process and keeps the
            fastest; the pick can differ between processes, so results are not bit-reproducible.
        tf32: convolutions and float32 matmuls may round their inputs to TF32 (10-bit mantissa)
            on Ampere and later; False keeps float32 really float32.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = deterministic, benchmark, tf32, tf32
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before


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
