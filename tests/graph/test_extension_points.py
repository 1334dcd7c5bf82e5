"""Public extension points: leaf modules and autowrapped functions from Python, FLOP formulas for custom ops."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import mexify
from mexify.errors import TraceError
from mexify.graph import flops, trace
from mexify.graph.flops import count_flops

FIXTURES = Path(__file__).resolve().parents[1] / "fixture_models.py"


@pytest.fixture
def clean_registries():
    leaves, wrapped, formulas = set(trace._LEAF_MODULES), dict(trace._AUTOWRAP_FUNCTIONS), dict(flops.FLOP_FORMULAS)
    yield
    trace._LEAF_MODULES.clear()
    trace._LEAF_MODULES.update(leaves)
    trace._AUTOWRAP_FUNCTIONS.clear()
    trace._AUTOWRAP_FUNCTIONS.update(wrapped)
    flops.FLOP_FORMULAS.clear()
    flops.FLOP_FORMULAS.update(formulas)


def _fixtures():
    spec = importlib.util.spec_from_file_location("mexify_test_fixture_models", FIXTURES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_register_leaf_module_converts_an_untraceable_model(clean_registries, tmp_path):
    fx = _fixtures()
    with pytest.raises(TraceError):
        mexify.convert(fx.BranchyNet(), trace=mexify.TraceConfig((64, 64), method="fx"), exits=2)
    assert mexify.register_leaf_module(fx.DataDependentGate) is fx.DataDependentGate  # usable as a decorator
    model = fx.BranchyNet().eval()
    result = mexify.convert(model, trace=mexify.TraceConfig((64, 64), method="fx"), exits=2)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(result.model(x), model(x)["out"])
    assert "DataDependentGate" in result.config.trace.leaf_modules  # recorded, so a bundle reloads by name


def shift(x):
    return x + 1 if x.sum() > 0 else x - 1  # data-dependent: fails to trace unless wrapped


def test_register_autowrap_function_records_one_call(clean_registries):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(shift(x))

    config = mexify.config.TraceConfig((32, 32), method="fx")
    with pytest.raises(TraceError):
        trace.trace_model(Net(), config, torch.zeros(1, 3, 32, 32))
    assert mexify.register_autowrap_function(shift) is shift
    gm = trace.trace_model(Net(), mexify.config.TraceConfig((32, 32), method="fx"), torch.zeros(1, 3, 32, 32))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [shift]


def test_register_flop_formula_counts_a_custom_op(clean_registries):
    @torch.library.custom_op("mexify_test::scale_channels", mutates_args=())
    def scale_channels(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w[None, :, None, None]

    @scale_channels.register_fake
    def _(x, w):
        return torch.empty_like(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return scale_channels(x, self.w)

    x = torch.zeros(2, 4, 8, 8)
    assert count_flops(Net(), x) == 0

    @mexify.register_flop_formula(torch.ops.mexify_test.scale_channels)
    def _flops(args, out):
        return out.numel()

    assert count_flops(Net(), x) == 2 * 4 * 8 * 8


def test_register_flop_formula_rejects_non_operators():
    with pytest.raises(TypeError, match="torch operators"):
        mexify.register_flop_formula(len)(lambda a, o: 0)
