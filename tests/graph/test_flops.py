"""Tests for mexify.graph.flops: FLOPs per node (fvcore convention) and shapes."""
import logging
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mexify.graph import flops as flops_module
from mexify.graph.flops import META_KEY, FlopReport, NodeProfile, count_flops, profile_graph



def _tv_seg():
    """torchvision's segmentation models; only the tests that use them skip without torchvision."""
    return pytest.importorskip("torchvision.models.segmentation")


def _fvcore_total(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore's FlopCountAnalysis total, with its warnings silenced."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())


def _graph_total(model: nn.Module, *inputs) -> int:
    return profile_graph(torch.fx.symbolic_trace(model), *inputs).total


# --------------------------------------------------------------------- fixture networks
class TinyEncoderDecoder(nn.Module):
    """Conv/BN encoder, a transposed-conv decoder with a skip, norms, einsum, matmul and
    bilinear/nearest upsampling: every counted operator family in one small graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.GroupNorm(4, 16))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.ln = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.cls = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        s = self.stem(x)
        d = self.down(s)
        u = self.inorm(self.up(d)) + s
        n, c, h, w = u.shape
        t = self.ln(u.flatten(2).transpose(1, 2))  # (n, hw, c)
        t = self.proj(t)
        attn = torch.einsum("nqc,nkc->nqk", t, t).softmax(-1)
        t = torch.matmul(attn, t)
        u = t.transpose(1, 2).reshape(n, c, h, w)
        y = self.cls(u)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return F.interpolate(y, scale_factor=2, mode="nearest")


class DataDependent(nn.Module):
    """Boolean-mask indexing: output shape depends on values, so fake tensors cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)

    def forward(self, x):
        y = self.conv(x)
        return y[y > 0].sum() + y.mean()


class Attention(nn.Module):
    """A bare scaled_dot_product_attention call (fvcore does not count it; we do)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------- single layers
@pytest.mark.parametrize(
    "layer, shape, expected",
    [
        # batch * prod(weight (8, 4/2, 3, 3)) * output pixels; bias not counted
        (nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=True), (2, 4, 10, 10), 2 * 8 * 2 * 9 * 100),
        # stride 2, no padding: 9x9 -> 4x4
        (nn.Conv2d(3, 5, 3, stride=2), (1, 3, 9, 9), 5 * 3 * 9 * 16),
        # transposed: batch * prod(weight (4, 2, 2, 2)) * input pixels
        (nn.ConvTranspose2d(4, 2, 2, stride=2), (1, 4, 5, 5), 4 * 2 * 2 * 2 * 25),
        (nn.Linear(16, 10), (3, 16), 3 * 16 * 10),
        (nn.Linear(16, 10, bias=False), (2, 5, 16), 2 * 5 * 16 * 10),
        # eval-mode batch norm: scale and shift per element
        (nn.BatchNorm2d(8), (2, 8, 5, 5), 2 * 400),
        (nn.BatchNorm2d(8, affine=False), (2, 8, 5, 5), 400),
        (nn.GroupNorm(2, 8), (2, 8, 5, 5), 5 * 400),
        (nn.LayerNorm(6, elementwise_affine=False), (3, 4, 6), 4 * 72),
        (nn.Upsample(size=(8, 8), mode="bilinear", align_corners=False), (1, 3, 4, 4), 4 * 3 * 64),
        (nn.Upsample(scale_factor=2, mode="nearest"), (1, 3, 4, 4), 3 * 64),
        (nn.AdaptiveAvgPool2d(1), (2, 3, 4, 4), 2 * 3 * 16),
        (nn.ReLU(), (2, 3, 4, 4), 0),
        (nn.MaxPool2d(2), (2, 3, 4, 4), 0),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_single_layer_flops_by_hand(layer, shape, expected):
    x = torch.randn(shape)
    assert count_flops(layer, x) == expected
    assert _graph_total(nn.Sequential(layer), x) == expected


def test_batch_norm_in_train_mode_is_counted_as_eval_and_mode_is_restored():
    bn = nn.BatchNorm2d(8).train()
    before = bn.running_mean.clone()
    assert count_flops(bn, torch.randn(2, 8, 5, 5)) == 2 * 400
    assert bn.training
    assert torch.equal(bn.running_mean, before)  # eval mode: running stats untouched


def test_sdpa_is_counted_as_multiply_adds():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 32, 8), torch.randn(2, 4, 32, 6)
    expected = 2 * 4 * 16 * 32 * (8 + 6)  # Q @ K^T plus attn @ V
    assert count_flops(Attention(), q, k, v) == expected
    report = profile_graph(torch.fx.symbolic_trace(Attention()), q, k, v)
    assert report.total == expected


def test_matrix_products_by_hand():
    a, b, bias = torch.randn(3, 4, 5), torch.randn(3, 5, 6), torch.randn(3, 4, 6)

    class Products(nn.Module):
        """bmm, baddbmm (bias not counted) and a broadcasting matmul."""

        def forward(self, a, b, bias):
            return torch.bmm(a, b) + torch.baddbmm(bias, a, b) + torch.matmul(a[0], b)

    assert count_flops(Products(), a, b, bias) == 3 * (3 * 4 * 5 * 6)


def test_unsupported_ops_are_reported_and_warned_once(caplog, monkeypatch):
    monkeypatch.setattr(flops_module, "_warned", set())  # as in a fresh process
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sigmoid(), nn.Hardswish())
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="mexify.graph.flops"):
        report = profile_graph(gm, x)
        profile_graph(gm, x)
    assert report.total == 4 * 3 * 16
    assert report.unsupported.get("aten::sigmoid") == 1
    assert any("aten::hardswish" in name for name in report.unsupported)
    assert "aten::convolution" in report.by_operator
    warned = [r for r in caplog.records if "aten::sigmoid" in r.getMessage()]
    assert len(warned) == 1  # the second profile of the same graph stays quiet


# --------------------------------------------------------------------- whole graphs
def test_report_records_every_node_and_sums_to_total():
    model = TinyEncoderDecoder().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16)
    report = profile_graph(gm, x)

    assert isinstance(report, FlopReport)
    names = [n.name for n in gm.graph.nodes]
    assert list(report.per_node) == names
    assert sum(report.per_node.values()) == report.total
    assert sum(report.by_operator.values()) == report.total
    for node in gm.graph.nodes:
        prof = node.meta[META_KEY]
        assert isinstance(prof, NodeProfile)
        assert prof.flops == report.per_node[node.name]
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert placeholder.meta[META_KEY] == NodeProfile((2, 3, 16, 16), torch.float32, 0, True)
    size_node = next(n for n in gm.graph.nodes if n.target == getattr and n.args[1] == "shape")
    assert size_node.meta[META_KEY].is_tensor is False
    assert size_node.meta[META_KEY].shape is None
    # leaf call_module nodes carry the cost of the whole module call
    stem_conv = next(n for n in gm.graph.nodes if n.target == "stem.0")
    assert report.per_node[stem_conv.name] == 2 * 8 * 3 * 9 * 256


def test_tiny_model_matches_fvcore():
    model = TinyEncoderDecoder().eval()
    x = torch.randn(2, 3, 16, 16)
    ours, theirs = _graph_total(model, x), _fvcore_total(model, x)
    # fvcore's einsum handle reads numpy's einsum_path report, printed to 4 significant
    # digits (1048576 becomes 1048500); every other operator agrees exactly.
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours - theirs == 1048576 - 1048500
    assert count_flops(model, x) == ours


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "core_aten"])
def test_graphs_from_torch_export_are_counted_the_same(decompose):
    model = TinyEncoderDecoder().eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,), strict=False)
    if decompose:
        program = program.run_decompositions()
    gm = program.module()
    assert profile_graph(gm, x).total == _graph_total(model, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"],
)
def test_torchvision_totals_agree_with_fvcore(name):
    model = getattr(_tv_seg(), name)(weights=None, weights_backbone=None, num_classes=21).eval()
    x = torch.randn(1, 3, 128, 128)
    ours = _graph_total(model, x)
    theirs = _fvcore_total(model, x)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
    assert model.training is False


def test_shapes_match_an_eager_run():
    from torch.fx.passes.shape_prop import ShapeProp

    model = _tv_seg().lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 96, 128)
    profile_graph(gm, x)
    ours = {n.name: n.meta[META_KEY] for n in gm.graph.nodes}
    ShapeProp(gm).propagate(x)  # real execution
    checked = 0
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata):
            assert ours[node.name].shape == tuple(meta.shape), node.name
            assert ours[node.name].dtype == meta.dtype, node.name
            checked += 1
    assert checked > 50
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta[META_KEY].is_tensor is False  # torchvision returns a dict


def test_mode_and_grad_state_are_left_alone():
    model = TinyEncoderDecoder().train()
    model.stem.eval()  # mixed modes must come back exactly as they were
    gm = torch.fx.symbolic_trace(model)
    modes = {name: m.training for name, m in gm.named_modules()}
    bn = gm.get_submodule("stem.1")
    stats = bn.running_mean.clone()

    profile_graph(gm, torch.randn(1, 3, 16, 16))

    assert {name: m.training for name, m in gm.named_modules()} == modes
    assert torch.equal(bn.running_mean, stats)
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in gm.parameters())


def test_falls_back_to_real_tensors_when_fake_execution_fails(caplog):
    model = DataDependent().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="mexify.graph.flops"):
        report = profile_graph(gm, x)
    assert report.total == 4 * 3 * 64
    assert any("real tensors" in r.getMessage() for r in caplog.records)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta[META_KEY].shape == ()


def test_failure_names_the_node():
    class Broken(nn.Module):
        def forward(self, x):
            return torch.cat([x, x[:, :, :1]], dim=1)  # mismatched sizes

    gm = torch.fx.symbolic_trace(Broken())
    with pytest.raises(RuntimeError, match="cat"):
        profile_graph(gm, torch.randn(1, 2, 3, 4))
