"""Random streams derived from a recipe seed and the ids of what they randomize.

Recover's jobs, relabel's epochs and prune's pools and plans each draw from a stream that is a
pure function of (seed, ids), mixed by numpy's SeedSequence, so any piece can be regenerated on
its own (one class, one epoch, on any rank) and equals what a whole run drew.
"""
from __future__ import annotations

import numpy as np
import torch


def derive(seed: int, *ids: int) -> int:
    """A 63-bit seed for the stream of (seed, ids)."""
    state = np.random.SeedSequence([seed, *ids]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def torch_generator(seed: int, *ids: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive(seed, *ids))


def numpy_generator(seed: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *ids]))
