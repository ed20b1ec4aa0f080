"""torchrun support: one process per device, ranks from the environment torchrun sets.

Without torchrun every helper here degrades to a single process (rank 0 of 1), so stages call
them unconditionally.

Ranks wait for each other by polling the c10d store, never inside a collective: a rank that stops
with a ``UserError`` publishes its message there (``cli.main`` calls ``publish_error``), and every
rank waiting in ``barrier`` (which also opens ``all_reduce_sum`` and ``broadcast_buffers``) raises
it within a poll instead of sitting in a collective until the timeout. No device collective takes
part in the waiting, so gloo and NCCL behave alike.
"""
from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

from . import atomic
from .errors import UserError

TIMEOUT_ENV = "LPLD_DIST_TIMEOUT"
# 30 min: one rank may work alone that long between two waits (rank 0's first sha256 of a ~655 GB
# ImageNet-21K label store takes ~10 min), and a hung job still fails within the hour. NCCL's own
# default (10 min) would kill such a run; gloo's is 30 min already.
DEFAULT_TIMEOUT_S = 30 * 60
ERROR_KEY = "lpld/error"
MAX_POLL_S = 0.1


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


def init(requested: str | torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun; return (rank, world_size).

    ``requested`` is the device the stage will compute on (``device(requested)``): only a CUDA one
    makes this rank's GPU current and adds NCCL, so ``--device cpu`` ranks run on gloo alone even on
    a host with fewer GPUs than ranks. The group's timeout, ``timeout()``, bounds its collectives
    (the NCCL watchdog), the c10d store and ``barrier``; set LPLD_DIST_TIMEOUT (seconds) to change it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        wait = timeout()
        target = device(requested)
        backend = "gloo"
        if target.type == "cuda":
            count = torch.cuda.device_count()
            if target.index >= count:
                raise UserError(f"this rank computes on {target}, but the host has {count} CUDA device(s): start "
                                f"torchrun with --nproc-per-node {count} or fewer, or pass --device cpu")
            torch.cuda.set_device(target)
            backend = "cpu:gloo,cuda:nccl"  # gloo still serves CPU tensors (CPU-side reductions)
        dist.init_process_group(backend, timeout=wait)
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def publish_error(message: str) -> None:
    """Make the other ranks' waits end with this rank's ``UserError`` (the first one published wins)."""
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # the store may be gone with the rank that hosted it
            _get_default_store().compare_set(ERROR_KEY, "", f"rank {rank()}: {message}")


def barrier() -> None:
    """Wait until every rank gets here; raise the ``UserError`` another rank publishes meanwhile.

    Rank 0's solo work (say, a first sha256 of a large label store) is waited out here, up to the
    group's timeout, in a store poll that ends as soon as any rank publishes an error.
    """
    if not dist.is_initialized():
        return
    store = _get_default_store()
    count = store.add(f"lpld/barriers/rank{rank()}", 1)  # this rank's n-th barrier: the same n on every rank
    key = f"lpld/barrier/{count}"
    if store.add(key, 1) == world_size():
        store.set(f"{key}/all", "1")
        for old in (f"lpld/barrier/{count - 1}", f"lpld/barrier/{count - 1}/all"):  # every rank has left it
            store.delete_key(old)
    seconds, pause = store.timeout.total_seconds(), 0.001
    deadline = time.monotonic() + seconds
    while not store.check([f"{key}/all"]):
        if store.check([ERROR_KEY]):
            raise UserError(store.get(ERROR_KEY).decode())
        if time.monotonic() > deadline:
            raise UserError(f"waited {seconds:g} s for the other ranks at barrier {count}; one is stuck, or slower "
                            f"than that (a first sha256 of a large label store: run `lpld labels verify` on it "
                            f"beforehand, or raise {TIMEOUT_ENV})")
        time.sleep(pause)
        pause = min(2 * pause, MAX_POLL_S)


@contextlib.contextmanager
def sole_writer(artifact) -> Iterator[None]:
    """``atomic.sole_writer`` for a stage under torchrun: rank 0 holds the lock for the run, the other
    ranks write under it; when another run holds it, every rank stops with rank 0's message."""
    with atomic.sole_writer(artifact) if is_main() else contextlib.nullcontext():
        barrier()
        yield


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a single process)."""
    if dist.is_initialized():
        barrier()  # every rank is here, so the reduction cannot wait on one that stopped
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` stacked along dim 0 in rank order, one collective (no barrier: callers
    reach it in lockstep). torch 2.14 renamed ``all_gather_into_tensor`` to ``all_gather_single``;
    both ends of the supported range have one of them."""
    out = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.contiguous())
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics drift apart under DDP after the last
    step), so that a sharded evaluation scores one model: the one rank 0 saves."""
    if dist.is_initialized():
        barrier()
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def device(requested: str | torch.device | None = None) -> torch.device:
    """The device this process computes on: ``requested``, else this rank's GPU, else the CPU.

    A CUDA device without an index ("cuda") means this rank's GPU (LOCAL_RANK), so the result can
    always be made current (``torch.cuda.set_device`` refuses a device without an index).
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    requested = torch.device(requested)
    if requested.type == "cuda" and requested.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return requested
