"""mexify.graph.batching on hand-built graphs: how every value follows the batch.

Each network keeps one kind of batch-dependent value: the batch size as an int, sequence-first
``(N, B, C)`` tokens, the batch folded into another dimension, a tuple of tensors.
"""
import pytest
import torch
import torch.fx as fx
from torch import nn

from mexify.graph.adapt import prepare_graph
from mexify.graph.batching import BATCH_KEY, BatchDim, analyze_batch, classify, shrink_value, _signature


def _analyzed(module, size=(8, 8)):
    gm = prepare_graph(fx.symbolic_trace(module.eval()))
    return gm, {name: str(dim) for name, dim in analyze_batch(gm, size).items()}


class BatchInt(nn.Module):
    """``b = x.shape[0]`` and ``h, w = x.shape[-2:]`` kept for a reshape after the convolutions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        b = x.shape[0]
        h, w = x.shape[-2:]
        f = self.a(x)
        return self.cls(f.reshape(b, 4, -1).softmax(-1).reshape(b, 4, h, w))


class SequenceFirst(nn.Module):
    """Tokens ``(N, B, C)``, as ``nn.MultiheadAttention`` takes them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.a(x)
        t = self.proj(f.flatten(2).permute(2, 0, 1))
        return self.cls(f + t.permute(1, 2, 0).reshape_as(f))


class FoldedBatch(nn.Module):
    """``(B * 2, C / 2, H, W)`` head groups: the batch folded into dimension 0 with the channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.a(x)
        B, C, H, W = f.shape
        g = f.reshape(B * 2, C // 2, H, W).sigmoid()
        return self.cls(f * g.reshape(B, C, H, W))


class Chunks(nn.Module):
    """A tuple of tensors, each batch-first, and a value shared by every row (a parameter's sigmoid)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        parts = self.a(x).chunk(2, dim=1)
        return self.cls(parts[0] * self.gate.sigmoid() + parts[1])


def test_tensors_that_keep_the_batch_first_are_dim_0():
    gm, dims = _analyzed(Chunks())
    assert dims["x"] == dims["a"] == dims["cls"] == "dim:0"
    assert dims["chunk"] == "dim:0"  # a tuple of tensors batched alike
    assert dims["gate"] == dims["sigmoid"] == "none"  # shared by all rows
    assert all(isinstance(n.meta[BATCH_KEY], BatchDim) for n in gm.graph.nodes)  # recorded on the nodes too


def test_an_int_holding_the_batch_and_the_sizes_it_comes_from():
    gm, dims = _analyzed(BatchInt())
    getitem = next(n for n in gm.graph.nodes if n.name == "getitem")
    assert getitem.args[1] == 0 and dims["getitem"] == "int"  # b = x.shape[0]
    assert dims["getattr_1"] == "size:0"  # x.shape: a size with the batch at index 0
    assert dims["getitem_1"] == "none"  # x.shape[-2:]: spatial only
    assert dims["getitem_2"] == dims["getitem_3"] == "none"  # h, w
    assert dims["reshape"] == dims["softmax"] == dims["reshape_1"] == "dim:0"


def test_sequence_first_tokens_carry_the_batch_along_dimension_1():
    _, dims = _analyzed(SequenceFirst())
    assert dims["flatten"] == "dim:0"
    assert dims["permute"] == dims["proj"] == "dim:1"
    assert dims["permute_1"] == dims["reshape_as"] == dims["add"] == "dim:0"


def test_a_batch_folded_into_another_dimension_is_unsafe_and_says_why():
    gm, dims = _analyzed(FoldedBatch())
    assert dims["getitem"] == "int"  # B
    assert dims["mul"] == "unsafe"  # B * 2: an int that is not the batch size
    assert dims["reshape"] == dims["sigmoid"] == "unsafe"
    assert dims["reshape_1"] == dims["mul_1"] == "dim:0"  # unfolded again
    why = {n.name: n.meta[BATCH_KEY].why for n in gm.graph.nodes}
    assert why["mul"] == "an int that is 4 at batch 2, 10 at batch 5"
    assert why["reshape"] == "a tensor of shape [4, 2, 8, 8] at batch 2, [10, 2, 8, 8] at batch 5"
    assert not next(n for n in gm.graph.nodes if n.name == "sigmoid").meta[BATCH_KEY].safe


def test_the_analysis_runs_in_eval_mode_and_restores_the_modules_modes():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    gm = prepare_graph(fx.symbolic_trace(module))
    gm.train()
    gm._modules["1"].training = False  # a mixed state is restored as it was
    analyze_batch(gm, (4, 4))
    assert [m.training for m in gm.modules()] == [True, True, False, True]
    assert gm._modules["1"].running_mean.abs().sum() == 0  # eval mode (and fake tensors): statistics untouched


@pytest.mark.parametrize(
    "small, large, expected",
    [
        (("tensor", (3, 4)), ("tensor", (3, 4)), "none"),
        (("tensor", (2, 4)), ("tensor", (5, 4)), "dim:0"),
        (("tensor", (7, 2, 4)), ("tensor", (7, 5, 4)), "dim:1"),
        (("tensor", (2, 2)), ("tensor", (5, 5)), "unsafe"),  # two dimensions follow the batch
        (("tensor", (2, 4)), ("tensor", (5, 4, 1)), "unsafe"),  # the rank changes
        (("tensor", (4, 4)), ("tensor", (10, 4)), "unsafe"),  # folded: 2B rows
        (("int", 2), ("int", 5), "int"),
        (("int", 3), ("int", 6), "unsafe"),  # B + 1
        (("ints", (2, 3)), ("ints", (5, 3)), "size:0"),
        (("ints", (3, 2)), ("ints", (3, 5)), "size:1"),
        (("int", 2), ("ints", (5,)), "unsafe"),  # the type changes
        (("seq", (("tensor", (2, 1)), ("tensor", (2, 3)))), ("seq", (("tensor", (5, 1)), ("tensor", (5, 3)))), "dim:0"),
        (("seq", (("tensor", (2, 1)), ("tensor", (1, 3)))), ("seq", (("tensor", (5, 1)), ("tensor", (1, 3)))), "unsafe"),
    ],
)
def test_classify_compares_two_batch_sizes(small, large, expected):
    assert str(classify(small, large, (2, 5))) == expected


def test_batch_dims_round_trip_through_their_bundle_form():
    for text in ("none", "int", "dim:0", "dim:1", "size:2", "unsafe"):
        assert str(BatchDim.parse(text)) == text
    with pytest.raises(ValueError, match="unknown batch dependence"):
        BatchDim.parse("rows")


def test_shrink_value_keeps_rows_as_the_classification_says():
    keep = torch.tensor([0, 2])
    x = torch.arange(3 * 4).reshape(3, 4)
    assert torch.equal(shrink_value(x, BatchDim("dim", 0), keep), x[[0, 2]])
    tokens = torch.arange(4 * 3).reshape(4, 3)  # (N, B)
    assert torch.equal(shrink_value(tokens, BatchDim("dim", 1), keep), tokens[:, [0, 2]])
    assert shrink_value(3, BatchDim("int"), keep) == 2
    assert shrink_value(torch.Size([3, 4, 8, 8]), BatchDim("size", 0), keep) == torch.Size([2, 4, 8, 8])
    assert shrink_value([5, 3], BatchDim("size", 1), keep) == [5, 2]
    shared = torch.ones(1, 4)
    assert shrink_value(shared, BatchDim("none"), keep) is shared
    pair = shrink_value((x, x + 1), BatchDim("dim", 0), keep)
    assert isinstance(pair, tuple) and torch.equal(pair[1], x[[0, 2]] + 1)
    with pytest.raises(ValueError, match="cannot be shrunk"):
        shrink_value(x, BatchDim("unsafe", why="folded"), keep)


def test_a_model_output_kept_whole_is_compared_by_its_entries_not_by_its_type():
    # a leaf module answering a transformers-style output (a dict subclass) with the batch in it: never "none"
    small, large = (_signature({"last_hidden_state": torch.zeros(n, 4)}) for n in (2, 5))
    assert str(classify(small, large, (2, 5))) == "unsafe"
    shared = _signature({"weights": torch.zeros(3)})
    assert str(classify(shared, shared, (2, 5))) == "none"
