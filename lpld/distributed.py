"""torchrun support: one process per device, ranks from the environment torchrun sets.

Without torchrun every helper here degrades to a single process (rank 0 of 1), so stages call
them unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Join the process group when launched by torchrun; return (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # gloo serves CPU tensors (--device cpu, CPU-side reductions) even when CUDA is present.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics drift apart under DDP after the last
    step), so that a sharded evaluation scores one model: the one rank 0 saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def device(requested: str | None = None) -> torch.device:
    """The device this process computes on: ``requested``, else this rank's GPU, else the CPU."""
    if requested and requested != "cuda":
        return torch.device(requested)
    if requested == "cuda" or torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
