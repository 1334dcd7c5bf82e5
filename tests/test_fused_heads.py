"""Fused exit heads: the skip feature each exit reads (found from the graph), carried across cuts like any
live value (shrinking, training, export), the final exit untouched, and convert's resolution warnings."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mexify
from mexify.config import HeadConfig
from mexify.graph.placement import ExitPoint, fuse_sources, fuse_stride
from mexify.nn import build_head
from mexify.prepare import check_shrinking, convert, trace_for_exits
from mexify.tools.export import export_bundle

SIZE = (64, 64)


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SkipDecoder(nn.Module):
    """An encoder to stride 16 and a decoder that fuses the encoder's stride-``skip`` map with the deep one
    (LR-ASPP / DeepLabV3+ style), then upsamples its logits to the input."""

    def __init__(self, skip=8, num_classes=3):
        super().__init__()
        self.skip = skip
        self.s2, self.s4, self.s8, self.s16 = _block(3, 8, 2), _block(8, 12, 2), _block(12, 16, 2), _block(16, 24, 2)
        self.deep = nn.Sequential(_block(24, 24), _block(24, 24), _block(24, 24))
        self.low_cls = nn.Conv2d(12 if skip == 4 else 16, num_classes, 1)
        self.high_cls = nn.Conv2d(24, num_classes, 1)

    def forward(self, x):
        f4 = self.s4(self.s2(x))
        f8 = self.s8(f4)
        d = self.deep(self.s16(f8))
        low = f4 if self.skip == 4 else f8
        y = self.low_cls(low) + F.interpolate(self.high_cls(d), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class UpsamplingDecoder(SkipDecoder):
    """No skip: the deep map is upsampled to stride 8 by a learned layer. The stride-8 encoder map is dead
    after the next block, so a fused head must have it carried across the cuts."""

    def __init__(self, num_classes=3):
        super().__init__(8, num_classes)
        self.up = nn.ConvTranspose2d(24, 16, 2, stride=2)

    def forward(self, x):
        d = self.deep(self.s16(self.s8(self.s4(self.s2(x)))))
        return F.interpolate(self.low_cls(self.up(d)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class CoarseOnly(SkipDecoder):
    """Classifies the stride-16 map alone: the output path is at stride 16, no exit needs a skip."""

    def forward(self, x):
        d = self.deep(self.s16(self.s8(self.s4(self.s2(x)))))
        return F.interpolate(self.high_cls(d), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _convert(model, exits=3, **kw):
    torch.manual_seed(0)
    return convert(model.eval(), trace=mexify.api.TraceConfig(SIZE), exits=exits, **kw)


def _resolution_notes(result):  # (tiny nets: the heads-cost warning is beside the point here)
    return [n for n in result.notes if "output path" in n]


@pytest.mark.parametrize("skip", [4, 8])
def test_a_coarse_exit_fuses_the_feature_the_decoder_uses(skip):
    result = _convert(SkipDecoder(skip), exits=4, at=None)
    traced = trace_for_exits(SkipDecoder(skip).eval(), mexify.api.TraceConfig(SIZE))
    assert traced.output_stride == skip
    decoder_skip = {4: "s4_2", 8: "s8_2"}[skip]  # the ReLU closing the block the decoder reads
    for e in result.config.exits:
        if e.stride > skip:
            assert (e.skip, e.skip_stride) == (decoder_skip, skip)
            assert result.model.heads[e.name].fused
        else:
            assert e.skip == "" and not result.model.heads[e.name].fused
    assert any(e.stride > skip for e in result.config.exits)
    assert not _resolution_notes(result)  # every coarse exit reaches the output detail


def test_no_finer_output_path_means_no_skip_and_no_warning():
    result = _convert(CoarseOnly(), exits=4)
    assert result.output_stride == 16
    assert all(e.skip == "" for e in result.config.exits)
    assert not any(h.fused for h in result.model.heads.values())
    assert not _resolution_notes(result)


def test_plain_heads_at_coarse_exits_get_one_warning_naming_them():
    result = _convert(SkipDecoder(8), exits=4, head_set={"fuse": False})
    coarse = [i for i, e in enumerate(result.config.exits) if e.stride > 8]
    assert coarse and all(e.skip == "" for e in result.config.exits)
    (note,) = _resolution_notes(result)
    assert "output path is at stride 8" in note and "fuse=true" in note
    assert all(f"{i} ({result.config.exits[i].name}, stride 16)" in note for i in coarse)


def test_fuse_sources_prefers_a_value_alive_across_the_cut_then_blocks_then_the_latest():
    def point(name, pos, stride, block="b", last_use=0):
        return ExitPoint(name, pos, 8, 4, 4, stride, pos, pos / 10, block, 1, "", last_use)

    candidates = [point("a", 1, 8, last_use=9), point("b", 2, 8, last_use=3), point("c", 3, 8, "", last_use=4),
                  point("d", 4, 4, last_use=5), point("e", 5, 16, last_use=6), point("f", 6, 16, last_use=7)]
    exit16 = candidates[5]
    assert fuse_stride(8) == 8 and fuse_stride(1) == 4
    assert fuse_sources(candidates, [exit16], 8)[0].name == "a"  # alive at the cut: the decoder's own skip
    candidates[0] = point("a", 1, 8, last_use=2)
    assert fuse_sources(candidates, [exit16], 8)[0].name == "b"  # then the last block output ("c" is none)
    assert fuse_sources(candidates, [exit16], 2)[0].name == "d"  # finest stride allowed: 4
    assert fuse_sources(candidates, [candidates[1]], 8) == [None]  # fine enough already


def test_a_skip_carried_across_cuts_shrinks_with_the_batch_and_leaves_the_final_exit_bit_identical():
    model = UpsamplingDecoder().eval()
    result = _convert(model, at=["s8_2", "s16_2", "deep_0_2", "deep_1_2"])
    m = result.model
    skips = {e.skip for e in result.config.exits if e.skip}
    assert len(skips) == 1
    skip = skips.pop()
    readers = [i for i, e in enumerate(result.config.exits) if e.skip]
    assert skip == "s8_2" and readers == [1, 2, 3]  # alive across several cuts, dead in the original graph
    for i in range(m.num_exits - 1):  # an output up to the last exit reading it, then dropped
        outputs = m.stage_io(i)[1]
        assert (skip in outputs) == (i <= readers[-1]), (i, outputs)
    assert skip not in m.stage_io(m.num_exits - 1)[0]
    x = torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(x), model(x))
        check_shrinking(m, SIZE)
        # rows dropped after the first cut: every exit's logits on the kept rows equal those of the kept images alone
        keep = torch.tensor([1, 3])
        state = m.run_stage(0, m.start(x)).select(keep)
        alone = m.run_stage(0, m.start(x[keep]))
        for i in range(1, m.num_exits - 1):
            state, alone = m.run_stage(i, state), m.run_stage(i, alone)
            torch.testing.assert_close(m.exit_logits(i, state), m.exit_logits(i, alone), rtol=1e-5, atol=1e-5)


def test_fused_heads_train_and_only_the_heads_move_in_stage_2():
    result = _convert(UpsamplingDecoder(), exits=3)
    m = result.model.train()
    m.freeze_backbone()
    before = {k: v.clone() for k, v in m.stages.state_dict().items()}
    opt = torch.optim.SGD(list(m.head_parameters()), lr=0.1)
    x = torch.randn(2, 3, *SIZE)
    outs = m.forward_all(x)
    sum(o.float().pow(2).mean() for o in outs[:-1]).backward()
    fused = [h for h in m.heads.values() if h.fused]
    assert fused and all(h.skip[0].weight.grad is not None and h.skip[0].weight.grad.abs().sum() > 0 for h in fused)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.stages.state_dict().items())


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_fused_bundle_reloads_and_its_exports_match(tmp_path, fmt):
    """The skip crosses three cuts (exits 1-3 read it): the pt2 programs and the ONNX graphs (run by onnxruntime,
    without torch) give every exit's output as the bundle does."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "up.mex"
    mexify.api.convert(f"{Path(__file__)}:UpsamplingDecoder", trace=mexify.api.TraceConfig(SIZE), at=["s8_2", "s16_2", "deep_0_2", "deep_1_2"],
                       out=str(out))
    model = mexify.load(out)
    assert [h.fused for h in model.heads.values()] == [False, True, True, True]
    export_bundle(out, tmp_path / f"up.{fmt}.mex", fmt)
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.forward_all(x, upsample=False)
    if fmt == "pt2":
        exported = mexify.load(tmp_path / "up.pt2.mex")
        assert [h.fused for h in exported.heads.values()] == [False, True, True, True]
        with torch.no_grad():
            got = exported.forward_all(x, upsample=False)
    else:
        from mexify.deploy import Runner

        got = [torch.from_numpy(a) for a in Runner(tmp_path / "up.onnx.mex", exit=0).exit_outputs(x.numpy())]  # no policy: a fixed exit
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_fused_head_without_its_skip_says_so_and_the_plain_config_ignores_fuse():
    head = build_head(HeadConfig(width=8, fuse=True), 16, 3, skip_channels=12)
    assert head.fused
    with pytest.raises(TypeError, match="skip feature"):
        head(torch.zeros(1, 16, 4, 4))
    out = head(torch.zeros(1, 16, 4, 4), skip=torch.zeros(1, 12, 8, 8))
    assert out.shape == (1, 3, 8, 8)
    assert not build_head(HeadConfig(width=8, fuse=True), 16, 3).fused  # no skip at this exit: a plain head


def test_onnxruntime_shrinks_the_skip_with_the_batch_like_the_torch_runtime(tmp_path):
    """A maxprob policy sends images out at exits 1 and 2: the rows that go on carry a shrunk skip to exit 3."""
    pytest.importorskip("onnxruntime")
    from mexify.bundle import update_bundle
    from mexify.deploy import Runner
    from mexify.policies import build_policy
    from mexify.runtime import EarlyExitRuntime

    out = tmp_path / "up.mex"
    mexify.api.convert(f"{Path(__file__)}:UpsamplingDecoder", trace=mexify.api.TraceConfig(SIZE), at=["s8_2", "s16_2", "deep_0_2", "deep_1_2"],
                       out=str(out))
    model = mexify.load(out)
    with torch.no_grad():  # sharpened random heads: confidences spread as trained ones do
        for head in model.heads.values():
            head.classifier.weight.mul_(40.0)
    update_bundle(out, model=model)
    x = torch.randn(24, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = model.forward_all(x, upsample=False)
    policy = build_policy("maxprob").with_thresholds([float("inf"), 0.0, 0.0, float("inf")])
    s1, s2 = policy.scores(1, outs[1]), policy.scores(2, outs[2])
    policy = policy.with_thresholds([float("inf"), float(s1.quantile(0.66)), float(s2.quantile(0.5)), float("inf")])
    policy.exit_names = list(model.exit_names)
    update_bundle(out, policy=policy.to_dict())
    export_bundle(out, tmp_path / "up.onnx.mex", "onnx")
    ref = EarlyExitRuntime(mexify.load(out)).predict_batch(x)
    got = Runner(tmp_path / "up.onnx.mex").predict(x.numpy())
    assert {1, 2, 4} <= set(ref.exit_index.tolist())  # rows leave at two fused exits, the rest go on
    assert (got.exit_index == ref.exit_index.numpy()).mean() >= 0.99
    assert (got.masks == ref.masks.numpy()).mean() >= 0.999
