"""Artifact identity (one check for every stage) and the one seed derivation."""
import json

import numpy as np
import pytest
import torch

from lpld import identity, seeds
from lpld.errors import UserError


def test_a_fresh_identity_equals_the_one_read_back():
    made = identity.of(recover={"crop_scale": (0.5, 1.0), "ipc": 10}, teacher_fingerprint="abc")
    assert made == json.loads(json.dumps(made)) and made["recover"]["crop_scale"] == [0.5, 1.0]
    identity.check(json.loads(json.dumps(made)), made, "x", "never")


def test_check_names_what_differs_and_ignores_what_only_the_artifact_records():
    expected = identity.of(train={"lr": 0.001}, labels="f1", world_size=1)
    found = dict(expected, labels="f2", world_size=2, written_by="an older lpld")
    with pytest.raises(UserError, match=r"^students/a was made with other labels, world_size; delete it$"):
        identity.check(found, expected, "students/a", "delete it")
    identity.check(dict(expected, written_by="an older lpld"), expected, "students/a", "delete it")
    with pytest.raises(UserError, match="other labels, train, world_size"):
        identity.check(None, expected, "students/a", "delete it")  # no identity recorded at all


def test_seeds_keep_the_streams_every_stored_artifact_was_made_with():
    """Relabel regenerates records and recover its jobs from these: a changed derivation would
    silently disagree with every store and distilled set made before it (values from the
    SeedSequence mixing that made them)."""
    assert seeds.derive(0, 0, 3) == 426229271328196471  # recover: class-wise job of class 3
    assert seeds.derive(0, 1, 2, 40) == 8118695427085134015  # recover: across-class job
    assert seeds.derive(7, 5) == 2153077621588806562  # relabel: seed 7, epoch 5
    state = np.random.SeedSequence([7, 5]).generate_state(2, dtype=np.uint32)
    assert seeds.derive(7, 5) == int(state[0]) << 31 ^ int(state[1]) < 2 ** 63
    assert torch.randint(0, 1000, (3,), generator=seeds.torch_generator(0, 2)).tolist() == [621, 399, 591]
    assert seeds.numpy_generator(0, 2).integers(0, 1000, 3).tolist() == [979, 80, 286]
    assert seeds.derive(0, 0, 3) != seeds.derive(0, 0, 4) != seeds.derive(1, 0, 4)
