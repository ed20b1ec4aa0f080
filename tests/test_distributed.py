"""Device choice per torchrun rank (no process group needed to check it)."""
import torch

from lpld import distributed


def test_bare_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device("cuda") == torch.device("cuda", 3)
    assert distributed.device("cuda:1") == torch.device("cuda", 1)
    assert distributed.device("cpu") == torch.device("cpu")


def test_single_process_is_rank_zero_of_one():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    tensor = torch.ones(3)
    assert torch.equal(distributed.all_reduce_sum(tensor), torch.ones(3))
