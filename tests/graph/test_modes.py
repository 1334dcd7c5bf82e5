"""training_mode: the one way a library function changes a module's train/eval mode, and puts it back."""
import pytest
import torch
from torch import nn

from mexify.graph.modes import training_mode


class Swapping(nn.Module):
    """Keeps a second attribute in step with its mode, as DualGraphModule swaps its graph in train()."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.graph = "eval"

    def train(self, mode=True):
        self.graph = "train" if mode else "eval"
        return super().train(mode)


class Refusing(nn.Module):
    """Refuses train()/eval() like a torch.export module."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def train(self, mode=True):
        raise NotImplementedError("the graph fixed the mode")


def _flags(m):
    return [x.training for x in m.modules()]


def test_a_mixed_mode_model_comes_back_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), Swapping())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    before = _flags(model)
    with training_mode(model, False) as m:
        assert m is model and not any(_flags(model)) and model[2].graph == "eval"
    assert _flags(model) == before and model[2].graph == "train"  # restored through train(): in step again


def test_train_mode_inside_and_none_only_restores():
    model = nn.Sequential(nn.Dropout(0.5), Swapping()).eval()
    with training_mode(model, True):
        assert all(_flags(model)) and model[1].graph == "train"
    assert not any(_flags(model)) and model[1].graph == "eval"
    with training_mode(model, None):
        model.train()  # whatever happens inside
    assert not any(_flags(model)) and model[1].graph == "eval"


def test_flags_only_never_calls_train_and_restores_after_an_error():
    model = Refusing()
    model.training = True
    with pytest.raises(RuntimeError, match="inside"):
        with training_mode(model, False, flags_only=True):
            assert not any(_flags(model))
            raise RuntimeError("inside")
    assert all(_flags(model))


def test_an_error_inside_restores_the_mode():
    model = nn.Sequential(nn.Linear(2, 2)).train()
    with pytest.raises(ValueError):
        with training_mode(model, False):
            raise ValueError
    assert all(_flags(model))
    assert torch.is_grad_enabled()  # modes only: nothing else changes
