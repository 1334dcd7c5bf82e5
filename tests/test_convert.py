"""Conversion leaves the final exit unchanged, gives every exit full-size logits, round-trips."""
import sys
from pathlib import Path

import pytest
import torch

import mexify
from mexify.errors import PlacementError, SpecError, TraceError
from mexify.graph.adapt import adapt_output

FIXTURES = Path(__file__).parent / "fixture_models.py"
sys.path.insert(0, str(FIXTURES.parent))
from fixture_models import rows_agree_with_single_images  # noqa: E402
TV = "torchvision.models.segmentation:"
NO_DOWNLOAD = {"weights": None, "weights_backbone": None}

TORCHVISION = [
    ("fcn_resnet50", 64),
    ("deeplabv3_resnet50", 64),
    ("deeplabv3_mobilenet_v3_large", 96),
    ("lraspp_mobilenet_v3_large", 96),
]


def _check_model(result, original, size, num_classes, tmp_path):
    model = result.model.eval()
    original.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = adapt_output(original(x))
        outs = model.forward_all(x)
    # the final exit is the original model's output
    assert torch.equal(outs[-1], expected) or (outs[-1] - expected).abs().max() <= 1e-5
    assert len(outs) == len(model.exit_names) == len(result.exits) + 1
    for o in outs:
        assert o.shape == (2, num_classes, size, size)
    # save/load round-trips to identical outputs at every exit
    bundle = tmp_path / "bundle"
    mexify.bundle.save_bundle(model, bundle)
    loaded = mexify.load(bundle)
    with torch.no_grad():
        again = loaded.forward_all(x)
    for a, b in zip(outs, again):
        assert torch.equal(a, b)
    # the shrinking runtime gives every image what it gets alone, at the exit it took
    rows_agree_with_single_images(model, size, agree=0.999)
    # every head parameter gets a gradient in training mode
    model.train()
    model.zero_grad()
    loss = sum(o.float().mean() for o in model.forward_all(torch.randn(2, 3, size, size)))
    loss.backward()
    for name, p in model.heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,size", TORCHVISION)
def test_torchvision_models_convert_exactly(name, size, tmp_path):
    import torchvision.models.segmentation as seg

    torch.manual_seed(0)
    original = getattr(seg, name)(num_classes=5, **NO_DOWNLOAD)
    result = mexify.convert(original, trace=mexify.TraceConfig((size, size)))
    assert len(result.exits) == 6
    fractions = [e.fraction for e in result.exits]
    assert len(set(e.name for e in result.exits)) == 6
    assert fractions[0] < 0.35 and fractions[-1] > 0.5, "exits spread over the network, not bunched at one end"
    # the module spec form cannot be rebuilt; use the factory spec for the bundle round-trip
    result = mexify.convert(TV + name, args={"num_classes": 5, **NO_DOWNLOAD}, trace=mexify.TraceConfig((size, size)))
    rebuilt_original = getattr(seg, name)(num_classes=5, **NO_DOWNLOAD)
    rebuilt_original.load_state_dict(_original_state(result.model, rebuilt_original))
    _check_model(result, rebuilt_original, size, 5, tmp_path)


def _original_state(model, original):
    """The original model's state_dict, read back out of the converted stages."""
    names = set(original.state_dict())
    state = {}
    for stage in model.stages:
        for k, v in stage.state_dict().items():
            if k in names:
                state[k] = v
    missing = names - set(state)
    assert not missing, missing
    return state


def test_unet_with_skip_connections(tmp_path):
    result = mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=5)
    original = mexify.spec.build_model(mexify.spec.parse_spec(f"{FIXTURES}:TinyUNet", {"num_classes": 4}))
    original.load_state_dict(_original_state(result.model, original))
    model = _check_model(result, original, 64, 4, tmp_path)
    # some cut carries more than one live tensor (a skip connection)
    assert max(e.live_tensors for e in result.exits) >= 2
    assert any(len(model.stage_io(i)[0]) >= 2 for i in range(1, model.num_exits))


def test_low_resolution_logits_are_upsampled(tmp_path):
    result = mexify.convert(f"{FIXTURES}:LowResSegmenter", trace=mexify.TraceConfig((64, 64)), exits=3)
    assert result.config.upsample_logits
    model = result.model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model.forward_all(x)
    assert all(o.shape == (1, 3, 64, 64) for o in outs)


@pytest.mark.slow
def test_export_archive(tmp_path):
    from torch.export import Dim

    import torchvision.models.segmentation as seg

    torch.manual_seed(0)
    original = seg.lraspp_mobilenet_v3_large(num_classes=3, **NO_DOWNLOAD).eval()
    example = torch.randn(2, 3, 96, 96)
    program = torch.export.export(original, (example,), dynamic_shapes=({0: Dim("batch")},), strict=False)
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    result = mexify.convert(str(path), trace=mexify.TraceConfig((96, 96)), exits=4)
    assert result.config.spec["kind"] == "export"
    original_from_archive = torch.export.load(str(path)).module()
    model = result.model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - original(x)["out"]).abs().max() <= 1e-5
        assert torch.equal(model(x), adapt_output(original_from_archive(x)))
    bundle = tmp_path / "b"
    mexify.bundle.save_bundle(model, bundle)
    with torch.no_grad():
        for a, b in zip(model.forward_all(x), mexify.load(bundle).forward_all(x)):
            assert torch.equal(a, b)


def test_data_dependent_control_flow_needs_leaf_module():
    with pytest.raises(TraceError) as info:
        mexify.convert(f"{FIXTURES}:BranchyNet", trace=mexify.TraceConfig((64, 64)), exits=3)
    msg = str(info.value)
    assert "gate" in msg and "DataDependentGate" in msg and "--leaf-module" in msg
    result = mexify.convert(f"{FIXTURES}:BranchyNet", trace=mexify.TraceConfig((64, 64), leaf_modules=["DataDependentGate"]), exits=3)
    assert len(result.model.forward_all(torch.randn(1, 3, 64, 64))) == 4


def test_at_overrides_placement_and_validates_names():
    inspected = mexify.inspect(f"{FIXTURES}:TinyUNet", trace=mexify.TraceConfig((64, 64)))
    names = [c.name for c in inspected.candidates]
    chosen = [names[3], names[1]]
    result = mexify.convert(f"{FIXTURES}:TinyUNet", trace=mexify.TraceConfig((64, 64)), at=chosen)
    assert result.model.exit_names == [names[1], names[3], "final"]
    with pytest.raises(PlacementError, match="nearest valid"):
        mexify.convert(f"{FIXTURES}:TinyUNet", trace=mexify.TraceConfig((64, 64)), at=[names[1] + "x"])


def test_exits_count_is_validated():
    with pytest.raises(PlacementError, match="at least 1"):
        mexify.convert(f"{FIXTURES}:TinyUNet", trace=mexify.TraceConfig((64, 64)), exits=0)
    with pytest.raises(PlacementError, match="candidate exit points"):
        mexify.convert(f"{FIXTURES}:TinyUNet", trace=mexify.TraceConfig((64, 64)), exits=500)


def test_weights_are_loaded_and_mismatches_named(tmp_path):
    from safetensors.torch import save_file

    spec = f"{FIXTURES}:TinyUNet"
    donor = mexify.spec.build_model(mexify.spec.parse_spec(spec))
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)
    good = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(good))
    result = mexify.convert(spec, weights=str(good), trace=mexify.TraceConfig((64, 64)), exits=2)
    x = torch.randn(1, 3, 64, 64)
    donor.eval()
    with torch.no_grad():
        assert torch.equal(result.model(x), donor(x))
    bad = tmp_path / "bad.pt"
    state = donor.state_dict()
    state["extra.weight"] = state.pop("final.weight")
    torch.save(state, bad)
    with pytest.raises(SpecError, match=r"final\.weight.*extra\.weight"):
        mexify.convert(spec, weights=str(bad), trace=mexify.TraceConfig((64, 64)))


def test_pickle_needs_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(mexify.spec.build_model(mexify.spec.parse_spec(f"{FIXTURES}:TinyUNet")), path)
    with pytest.raises(SpecError, match="arbitrary code"):
        mexify.convert(str(path), trace=mexify.TraceConfig((64, 64)))
    result = mexify.convert(str(path), trace=mexify.TraceConfig((64, 64)), exits=2, trust=mexify.Trust(pickle=True))
    assert result.model.num_classes == 4


def test_export_falls_back_to_a_dynamic_batch_and_records_it(tmp_path, monkeypatch):
    """A dynamic-spatial export that does not finish in time is abandoned for a dynamic batch alone; the
    bundle records it, loading repeats it, and inputs of another size are refused in one line."""
    import time

    import torch.export

    real_export = torch.export.export

    def slow_when_spatial_is_dynamic(model, args, **kw):
        if len(kw["dynamic_shapes"][0]) > 1:
            time.sleep(40)
        return real_export(model, args, **kw)

    monkeypatch.setattr(torch.export, "export", slow_when_spatial_is_dynamic)
    monkeypatch.setenv("MEXIFY_TRACE_TIMEOUT", "8")  # the batch-only export must finish within it on a loaded machine too
    t0 = time.perf_counter()
    result = mexify.convert(f"{FIXTURES}:TinyUNet", trace=mexify.TraceConfig((64, 64), method="export"), exits=2, out=str(tmp_path / "b"))
    assert time.perf_counter() - t0 < 35  # the slow attempt was abandoned, not waited for
    assert result.config.trace.export_shapes == "batch"
    loaded = mexify.load(tmp_path / "b")
    assert loaded.static_size == (64, 64)
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(loaded(x), result.model(x))
    with pytest.raises(mexify.MexifyError, match="accepts 64x64 inputs only"):
        loaded(torch.randn(1, 3, 32, 32))


def test_trace_failure_hint_names_the_module():
    with pytest.raises(TraceError) as exc:
        mexify.convert(f"{FIXTURES}:BranchyNet", trace=mexify.TraceConfig((64, 64), method="fx"), exits=3)
    assert "--leaf-module DataDependentGate (its class) or --leaf-module gate (this instance)" in exc.value.hint


class SmallImagesOnly(torch.nn.Module):
    """Branches on the image size as a Python int: torch.export keeps the sizes dynamic but guards them to a range."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if x.shape[-1] <= 48:
            y = y * 2
        return self.b(y)


def test_an_export_whose_guards_bound_the_spatial_size_keeps_it_fixed_and_says_so_in_one_line():
    result = mexify.convert(SmallImagesOnly().eval(), trace=mexify.TraceConfig((32, 32), method="export"), exits=1)
    assert result.config.trace.export_shapes == "batch"  # not called dynamic in sizes it would refuse
    with pytest.raises(mexify.MexifyError, match="accepts 32x32 inputs only"):
        result.model(torch.randn(1, 3, 64, 64))
