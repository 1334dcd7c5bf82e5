"""Checkpoints are atomic: a failed write leaves the previous file intact."""
import random

import pytest
import torch

from mexify.errors import TrainingError
from mexify.train import checkpoint as ck


def test_round_trip_and_rng(tmp_path):
    p = tmp_path / "checkpoint.pt"
    torch.manual_seed(3)
    random.seed(3)
    rng = ck.rng_state()
    a = (torch.rand(3), random.random())
    ck.save_checkpoint({"stage": 1, "iteration": 7, "model": {"w": torch.ones(2)}, "rng": rng}, p)
    st = ck.load_checkpoint(p)
    assert st["stage"] == 1 and st["iteration"] == 7 and torch.equal(st["model"]["w"], torch.ones(2))
    ck.set_rng_state(st["rng"])
    assert torch.equal(torch.rand(3), a[0]) and random.random() == a[1]


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    ck.save_checkpoint({"stage": 1, "iteration": 5}, p)

    def boom(obj, fh, *a, **k):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"stage": 1, "iteration": 10}, p)
    monkeypatch.undo()
    assert ck.load_checkpoint(p)["iteration"] == 5
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_corrupt_or_missing_checkpoint_is_training_error(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read"):
        ck.load_checkpoint(bad)
