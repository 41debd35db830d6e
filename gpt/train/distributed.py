"""Data-parallel plumbing: torchrun environment → process group, rank info, reductions.

`torchrun --nproc_per_node=N -m stages.train` sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python -m stages.train` is a
world of one and never touches torch.distributed. Backend: NCCL on CUDA, gloo on CPU. Each rank reads its own rows of
the global batch (the shard reader slices by rank), gradients are averaged by DDP, and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1); else a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """On CUDA each local rank gets its own GPU; other devices are shared."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value, info: DistInfo):
    """Rank 0's `value` on every rank (a small picklable object: a path, a decision)."""
    if not info.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
