"""Device choice per torchrun rank, the process group's timeout, and a UserError on one rank
stopping every rank (two gloo processes)."""
import contextlib
import io
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lpld import cli, distributed
from lpld.errors import UserError
from lpld.labels import LabelStore

from test_labels import write_store


def test_bare_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device("cuda") == torch.device("cuda", 3)
    assert distributed.device(torch.device("cuda")) == torch.device("cuda", 3)  # what Python callers pass
    assert distributed.device("cuda:1") == torch.device("cuda", 1)
    assert distributed.device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.device("cpu") == distributed.device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.device(None) == torch.device("cuda", 3)


def _init_with_fewer_gpus_than_ranks(rank, folder, port):
    """One torchrun-like rank on a host whose CUDA reports a single device: ``init("cpu")`` must not
    touch CUDA (set_device(1) is "invalid device ordinal" there), and must join a gloo group."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    touched = []

    def set_device(device):
        touched.append(str(device))
        raise RuntimeError("CUDA error: invalid device ordinal")

    torch.cuda.is_available, torch.cuda.device_count, torch.cuda.set_device = (lambda: True), (lambda: 1), set_device
    outcome = {}
    try:
        outcome["ranks"] = distributed.init("cpu")
        outcome["backend"] = str(dist.get_backend())
        outcome["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item()
        dist.destroy_process_group()
        if rank == 1:  # asked for its GPU, the rank the host lacks gets a message, not a CUDA error
            try:
                distributed.init(None)
                outcome["gpu"] = "joined"
            except UserError as error:
                outcome["gpu"] = str(error)
    except Exception as error:  # reported to the parent: the test's assertion shows it
        outcome["error"] = repr(error)
    outcome["touched"] = touched
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_init_on_the_cpu_ignores_a_host_with_fewer_gpus_than_ranks(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_init_with_fewer_gpus_than_ranks, args=(str(tmp_path), port), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, outcome in enumerate(ranks):
        assert "error" not in outcome, outcome
        assert outcome["ranks"] == [rank, 2] and outcome["backend"] == "gloo" and outcome["sum"] == 3.0
    assert ranks[0]["touched"] == [] and ranks[1]["touched"] == []
    assert "has 1 CUDA device(s)" in ranks[1]["gpu"] and "--device cpu" in ranks[1]["gpu"]


def test_single_process_is_rank_zero_of_one():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    tensor = torch.ones(3)
    assert torch.equal(distributed.all_reduce_sum(tensor), torch.ones(3))


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout() == timedelta(minutes=30)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90.5")
    assert distributed.timeout() == timedelta(seconds=90.5)
    for bad in ("0", "-5", "ten", "nan", "1e300"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=distributed.TIMEOUT_ENV):
            distributed.timeout()


def test_init_passes_the_timeout_to_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *args, **kwargs: calls.append(kwargs))
    distributed.init()
    assert calls == [{"timeout": timedelta(seconds=42)}]


def test_barrier_gives_up_after_the_group_timeout(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1,
                            timeout=timedelta(seconds=0.5))
    try:
        for _ in range(3):
            distributed.barrier()
        store = dist.distributed_c10d._get_default_store()
        assert not store.check(["lpld/barrier/1"]) and store.check(["lpld/barrier/3"])  # old barriers cleaned up
        monkeypatch.setattr(distributed, "world_size", lambda: 2)  # a rank that never comes
        start = time.perf_counter()
        with pytest.raises(UserError, match="waited 0.5 s for the other ranks at barrier 4"):
            distributed.barrier()
        assert time.perf_counter() - start < 5
    finally:
        dist.destroy_process_group()


def _corrupt_store_on_rank_0(rank, folder, store):
    """What ``lpld train`` does under torchrun: rank 0 verifies the store, the others check sizes and
    wait at the barrier. Each rank writes its exit code, stderr and seconds spent to a file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(minutes=10))
    stderr, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stderr(stderr):
            if rank == 0:
                code = cli.main(["labels", "info", store])
            else:
                LabelStore.open(store, verify_checksums=False)
                try:
                    distributed.barrier()
                    code = 0
                except UserError as error:
                    print(error, file=sys.stderr)
                    code = 2
    finally:
        dist.destroy_process_group()
    outcome = {"code": code, "stderr": stderr.getvalue(), "seconds": time.perf_counter() - start}
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_a_corrupt_store_on_rank_0_stops_every_rank_with_its_message(tmp_path):
    write_store(tmp_path / "s", np.arange(4))
    (tmp_path / "s" / "verified.json").unlink()
    data = bytearray((tmp_path / "s" / "logits.npy").read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "s" / "logits.npy").write_bytes(bytes(data))
    start = time.perf_counter()
    mp.spawn(_corrupt_store_on_rank_0, args=(str(tmp_path), str(tmp_path / "s")), nprocs=2)
    assert time.perf_counter() - start < 60  # the group's timeout is 10 min
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [outcome["code"] for outcome in ranks] == [2, 2]
    assert "lpld labels: error:" in ranks[0]["stderr"] and "rank 0: " in ranks[1]["stderr"]
    assert all("logits.npy: sha256 differs from meta.json" in outcome["stderr"] for outcome in ranks)
    assert ranks[1]["seconds"] < 30
