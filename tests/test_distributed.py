"""Device choice per torchrun rank and the process group's timeout (no process group needed)."""
from datetime import timedelta

import pytest
import torch

from lpld import distributed
from lpld.errors import UserError


def test_bare_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device("cuda") == torch.device("cuda", 3)
    assert distributed.device("cuda:1") == torch.device("cuda", 1)
    assert distributed.device("cpu") == torch.device("cpu")


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

