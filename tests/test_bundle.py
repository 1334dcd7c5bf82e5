"""Bundle writes: config and weights change together, and a failed write leaves the old bundle whole."""
from pathlib import Path

import pytest
import torch
import yaml

import mexify
from mexify import bundle as bundle_mod
from mexify import files as files_mod
from mexify.bundle import read_config, update_bundle

FIXTURES = Path(__file__).parent / "fixture_models.py"


@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "b.mex"
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=2, out=str(out))
    (out / "calibration").mkdir()
    (out / "calibration" / "pareto.csv").write_text("curve\n")
    return out


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return model


def test_update_writes_config_and_weights_together_and_keeps_other_files(bundle):
    model = _perturbed(mexify.load(bundle))
    update_bundle(bundle, model=model, training={"note": "x"})
    again = mexify.load(bundle)
    assert read_config(bundle).training == {"note": "x"} and again.config.training == {"note": "x"}
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert (bundle / "calibration" / "pareto.csv").read_text() == "curve\n"
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["b.mex"]  # no temporary directory left


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_failed_update_leaves_the_old_bundle(bundle, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(files_mod, "_exchange", lambda a, b: False)
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    model = _perturbed(mexify.load(bundle))

    def broken_config(config):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "config_text", broken_config)  # fails after the new weights are written
    with pytest.raises(OSError, match="disk full"):
        update_bundle(bundle, model=model, policy={"name": "maxprob"})
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["b.mex"]


def test_update_without_exchange_swaps_by_renames(bundle, monkeypatch):
    monkeypatch.setattr(files_mod, "_exchange", lambda a, b: False)
    update_bundle(bundle, training={"note": "y"})
    assert yaml.safe_load((bundle / "config.yaml").read_text())["training"] == {"note": "y"}
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["b.mex"]


def test_weights_that_do_not_fit_are_refused_in_one_line(bundle):
    from safetensors.torch import load_file, save_file

    state = load_file(str(bundle / "weights.safetensors"))
    dropped = next(k for k in state if k.endswith("weight"))
    del state[dropped]
    save_file(state, str(bundle / "weights.safetensors"))
    with pytest.raises(mexify.MexifyError, match=f"missing 1 key.*{dropped}"):
        mexify.load(bundle)
