"""torchrun support: one process per device, ranks from the environment torchrun sets.

Without torchrun every helper here degrades to a single process (rank 0 of 1), so stages call
them unconditionally.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

TIMEOUT_ENV = "LPLD_DIST_TIMEOUT"
# 30 min: one rank may work alone that long between two waits (rank 0's first sha256 of a ~655 GB
# ImageNet-21K label store takes ~10 min), and a hung job still fails within the hour. NCCL's own
# default (10 min) would kill such a run; gloo's is 30 min already.
DEFAULT_TIMEOUT_S = 30 * 60


def timeout() -> timedelta:
    """How long ranks wait for each other: LPLD_DIST_TIMEOUT seconds, else 30 min."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        wait = timedelta(seconds=float(value))
    except (ValueError, OverflowError):
        wait = timedelta(0)
    if wait <= timedelta(0):
        raise UserError(f"{TIMEOUT_ENV}={value!r}: give the seconds ranks may wait for each other "
                        f"(default {DEFAULT_TIMEOUT_S})")
    return wait


def init() -> tuple[int, int]:
    """Join the process group when launched by torchrun; return (rank, world_size).

    The group's timeout, ``timeout()``, bounds its collectives (the NCCL watchdog) and the c10d
    store; set LPLD_DIST_TIMEOUT (seconds) to change it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        wait = timeout()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # gloo serves CPU tensors (--device cpu, CPU-side reductions) even when CUDA is present.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=wait)
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
