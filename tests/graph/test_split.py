"""mexify.graph.split on hand-built graphs: stages that carry every value alive at a cut and,
chained, give exactly the original output."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mexify.errors import PlacementError
from mexify.graph.adapt import prepare_graph
from mexify.graph.batching import BatchDim, analyze_batch, shrink_value
from mexify.graph.split import split_stages


class SkipNet(nn.Module):
    """``s`` (node ``mul``) skips over b, relu and c; the parameter ``scale`` is read before and after.

    Nodes: x, a, mul, b, relu, c, getattr_1, getitem, interpolate, mul_1, add, cls.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.a(x) * self.scale
        y = self.c(self.b(s).relu())
        return self.cls(F.interpolate(y, size=s.shape[-2:]) + s * self.scale)


class BatchInt(nn.Module):
    """``b = x.shape[0]`` and ``h, w`` are taken first and used after two convolutions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        b = x.shape[0]
        h, w = x.shape[-2:]
        f = self.b(self.a(x))
        return self.cls(f.reshape(b, 4, -1).softmax(-1).reshape(b, 4, h, w))


class SequenceFirst(nn.Module):
    """Tokens ``(N, B, C)`` made before ``b`` and used after it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.a(x)
        t = f.flatten(2).permute(2, 0, 1)
        g = self.b(f)
        return self.cls(g + self.proj(t).permute(1, 2, 0).reshape_as(g))


def _graph(module, size=(16, 16)):
    torch.manual_seed(0)
    gm = prepare_graph(fx.symbolic_trace(module.eval()))
    analyze_batch(gm, size)
    return gm


def _chain(stages, x):
    """Run the stages one after another, each fed only what the previous one returned."""
    values = dict(zip(stages[0].inputs, [x]))
    for stage in stages[:-1]:
        out = stage.module(*[values[name] for name in stage.inputs])
        assert isinstance(out, tuple) and len(out) == len(stage.outputs)
        values = dict(zip(stage.outputs, out))
    last = stages[-1]
    return last.module(*[values[name] for name in last.inputs])


def _io(stages):
    return [(s.inputs, s.outputs, s.exit_value) for s in stages]


@pytest.mark.parametrize("cuts", [[], ["mul"], ["relu"], ["mul", "relu"], ["relu", "c"], ["a", "mul", "relu", "c", "interpolate", "add"]])
def test_chained_stages_give_exactly_the_original_output(cuts):
    gm = _graph(SkipNet())
    stages = split_stages(gm, cuts)
    assert len(stages) == len(cuts) + 1
    assert [s.exit_value for s in stages] == cuts + [""]
    with torch.no_grad():
        for x in (torch.randn(2, 3, 16, 16), torch.randn(3, 3, 24, 20)):  # any batch and size the graph takes
            assert torch.equal(_chain(stages, x), gm(x))


def test_a_cut_inside_a_skip_carries_the_skip_to_the_next_stage():
    stages = split_stages(_graph(SkipNet()), ["relu"])
    assert _io(stages) == [
        (["x"], ["relu", "mul"], "relu"),  # the exit first, then what the next stage needs
        (["mul", "relu"], ["cls"], ""),  # in definition order
    ]
    assert stages[0].batch_dims == {"relu": "dim:0", "mul": "dim:0"}
    assert stages[1].batch_dims == {}


def test_a_value_alive_across_two_cuts_is_carried_by_both_stages_between():
    stages = split_stages(_graph(SkipNet()), ["mul", "relu", "c"])
    assert _io(stages) == [
        (["x"], ["mul"], "mul"),  # the exit is also the skip: returned once
        (["mul"], ["relu", "mul"], "relu"),
        (["mul", "relu"], ["c", "mul"], "c"),
        (["mul", "c"], ["cls"], ""),
    ]
    stage = stages[1].module
    placeholders = [n for n in stage.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["mul"]
    assert [n.name for n in stage.graph.nodes if n.op not in ("placeholder", "output")] == ["b", "relu"]


def test_parameters_are_read_in_every_stage_that_uses_them_and_stay_shared():
    gm = _graph(SkipNet())
    stages = split_stages(gm, ["relu"])
    for stage in stages:
        assert [n.target for n in stage.module.graph.nodes if n.op == "get_attr"] == ["scale"]
        assert stage.module.scale is gm.scale
    assert not hasattr(stages[0].module, "c") and stages[1].module.c is gm.c  # modules go where they run


def test_an_int_holding_the_batch_crosses_the_cut_and_follows_a_shrinking_batch():
    gm = _graph(BatchInt())
    stages = split_stages(gm, ["a"])
    assert stages[0].outputs == ["a", "getitem", "getitem_2", "getitem_3"]  # the exit, b, h, w
    assert stages[0].batch_dims == {"a": "dim:0", "getitem": "int", "getitem_2": "none", "getitem_3": "none"}
    x = torch.randn(3, 3, 16, 16)
    keep = torch.tensor([0, 2])
    with torch.no_grad():
        out = stages[0].module(x)
        assert out[1] == 3
        kept = [shrink_value(v, BatchDim.parse(stages[0].batch_dims[n]), keep) for n, v in zip(stages[0].outputs, out)]
        assert kept[1] == 2
        values = dict(zip(stages[0].outputs, kept))
        result = stages[1].module(*[values[n] for n in stages[1].inputs])
        assert torch.allclose(result, gm(x[keep]), atol=1e-6)


def test_sequence_first_tokens_cross_the_cut_with_the_batch_along_dimension_1():
    gm = _graph(SequenceFirst())
    stages = split_stages(gm, ["b"])
    assert stages[0].outputs == ["b", "permute"]
    assert stages[0].batch_dims == {"b": "dim:0", "permute": "dim:1"}
    x = torch.randn(3, 3, 16, 16)
    keep = torch.tensor([1])
    with torch.no_grad():
        out = stages[0].module(x)
        assert out[1].shape == (256, 3, 4)
        values = {n: shrink_value(v, BatchDim.parse(stages[0].batch_dims[n]), keep) for n, v in zip(stages[0].outputs, out)}
        result = stages[1].module(*[values[n] for n in stages[1].inputs])
        assert torch.allclose(result, gm(x[keep]), atol=1e-6)
        assert torch.equal(_chain(stages, x), gm(x))


def test_batch_dims_are_left_out_when_the_graph_was_not_analysed():
    gm = prepare_graph(fx.symbolic_trace(SkipNet().eval()))
    stages = split_stages(gm, ["relu"])
    assert stages[0].outputs == ["relu", "mul"] and stages[0].batch_dims == {}


def test_unknown_duplicate_or_unordered_exit_points_are_refused():
    gm = _graph(SkipNet())
    with pytest.raises(PlacementError, match="'rleu' is not a node of the traced graph") as raised:
        split_stages(gm, ["mul", "rleu"])
    assert raised.value.hint.startswith("nearest: relu")
    with pytest.raises(PlacementError, match="distinct and in execution order"):
        split_stages(gm, ["relu", "mul"])
    with pytest.raises(PlacementError, match="distinct and in execution order"):
        split_stages(gm, ["relu", "relu"])


class ResizesToInput(nn.Module):
    """Reads the input's size only at the end (``F.interpolate(..., size=x.shape[-2:])``), as torchvision's models do."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.cls(self.b(self.a(x)).relu())
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_the_input_crosses_no_cut_only_for_its_size():
    model = ResizesToInput().eval()
    gm = prepare_graph(fx.symbolic_trace(model))
    x = torch.randn(2, 3, 32, 32)
    stages = split_stages(gm, ["a", "b"])
    assert all("x" not in s.inputs for s in stages[1:])  # the size travels, not the image
    state = {"x": x}
    for s in stages[:-1]:
        state.update(zip(s.outputs, s.module(*[state[n] for n in s.inputs])))
        assert not any(isinstance(v, torch.Tensor) and v.shape[-2:] == x.shape[-2:] for v in map(state.get, s.outputs))
    out = stages[-1].module(*[state[n] for n in stages[-1].inputs])
    assert torch.equal(out, model(x))


class _Residual(nn.Module):
    def __init__(self, noise: bool):
        super().__init__()
        self.noise = noise
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if self.noise:  # stochastic depth's ``keep + rand(B, 1, 1, 1)``: an add of another shape before the residual add
            y = y * (y.mean((1, 2, 3), keepdim=True) + 0.5)
        return y + x.repeat(1, 2, 1, 1)[:, :4]


def test_a_train_only_operation_of_the_same_kind_does_not_shift_the_skip():
    from mexify.graph.split import corresponding_node

    graphs = []
    for noise in (False, True):
        gm = fx.symbolic_trace(_Residual(noise))
        for n in gm.graph.nodes:  # what torch.export records on every node
            shape = (2, 1, 1, 1) if n.name == "add" and noise else (2, 4, 8, 8)
            n.meta["val"] = torch.empty(shape)
        graphs.append(gm)
    eval_gm, train_gm = graphs
    residual = next(n.name for n in eval_gm.graph.nodes if n.target is __import__("operator").add)
    twin = corresponding_node(eval_gm, train_gm, residual)
    assert residual == "add" and twin == "add_1"  # the same name is the noise's add in train mode
    assert corresponding_node(eval_gm, train_gm, "nope") is None
