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

from featcache.pipeline.errors import FeatcacheError

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
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); single process otherwise.

    Args:
        device_kind: the resolved device's type, "cuda" or "cpu".
    Returns:
        This process's place in the job; FeatcacheError (one line) when this node runs more CUDA
        ranks than it has GPUs.
    """
    if not launched_by_torchrun():
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        options: dict = {}
        if backend == "nccl":
            gpus = torch.cuda.device_count()
            if ctx.local_rank >= gpus:
                per_node = os.environ.get("LOCAL_WORLD_SIZE", str(ctx.local_rank + 1))
                raise FeatcacheError(
                    f"torchrun started {per_node} processes on this node but it has {gpus} CUDA GPU"
                    f"{'s' if gpus != 1 else ''} (local rank {ctx.local_rank} has none): use --nproc-per-node "
                    f"{gpus} or fewer, or --device cpu")
            torch.cuda.set_device(ctx.local_rank)
            # Binding the rank's GPU to the group lets NCCL collectives (barrier) know their device
            # instead of guessing it, and warning that they guess.
            options["device_id"] = torch.device("cuda", ctx.local_rank)
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT, **options)
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
