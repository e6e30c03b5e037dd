"""torchrun support: who am I, which batches are mine, and the few collectives extraction needs.

Under ``torchrun`` every rank runs the same ``extract``; batch b of the plan belongs to rank
``b % world_size`` (disjoint, deterministic, balanced), each rank commits its batches as journal
parts beside the target, and rank 0 assembles the one final cache after a barrier.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks wait at the barrier while the slowest rank finishes its shard: allow a long extraction.
BARRIER_TIMEOUT = timedelta(hours=int(os.environ.get("FEATCACHE_DIST_TIMEOUT_H", "12")))


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world_size == self.rank


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device_kind: str) -> DistContext:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); single process otherwise."""
    if not launched_by_torchrun():
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    return ctx


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def gather(ctx: DistContext, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; [obj] in a single process."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (used to share rank 0's error so all ranks stop together)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
