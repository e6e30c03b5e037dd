"""Device and thread choices shared by extraction and training."""
from __future__ import annotations

import os

import torch

from pipeline.errors import FeatcacheError


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
