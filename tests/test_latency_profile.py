"""`mexify profile`: per-stage, per-head and per-policy-step latency, kept in the bundle by device, batch, dtype, size."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mexify
from mexify import api
from mexify.bundle import read_config
from mexify.cli import app

FIXTURES = Path(__file__).parent / "fixture_models.py"


@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "b.mex"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, input_size=(64, 64), exits=3, out=str(out))
    return out


def test_profile_is_stored_by_device_batch_dtype_and_size(bundle):
    profiles = api.profile(bundle, device="cpu", batch_sizes=[1, 2], warmup=0, repeats=1)
    assert [p.key for p in profiles] == ["cpu|b1|float32|64x64", "cpu|b2|float32|64x64"]
    stored = read_config(bundle).latency
    assert sorted(stored) == sorted(p.key for p in profiles)
    for p in profiles:
        assert len(p.stage_ms) == 4 and len(p.head_ms) == 3 and p.policy_ms is None  # not calibrated
        assert all(v > 0 for v in p.stage_ms + p.head_ms)
        to_exit = p.to_exit_ms()
        assert to_exit[-1] == pytest.approx(sum(p.stage_ms) + sum(p.head_ms))
        assert stored[p.key]["stage_ms"] == pytest.approx(p.stage_ms)
    api.profile(bundle, device="cpu", batch_sizes=[1], warmup=0, repeats=1)  # replaces its own key only
    assert sorted(read_config(bundle).latency) == sorted(stored)
    assert mexify.load(bundle).num_exits == 4  # the bundle still loads


def test_calibrated_bundle_profiles_its_policy_steps(bundle):
    api.calibrate(bundle, "synthetic:scenes?size=64&classes=4&n=8&n_eval=8", policy="mess", max_drop=1.0, batch_size=4)
    (p,) = api.profile(bundle, device="cpu", batch_sizes=[1], warmup=0, repeats=1, dtype="bfloat16")
    assert p.dtype == "bfloat16" and p.policy_ms is not None and len(p.policy_ms) == 3
    assert p.to_exit_ms()[0] == pytest.approx(p.stage_ms[0] + p.head_ms[0] + p.policy_ms[0])


def test_profile_cli(bundle):
    res = CliRunner().invoke(app, ["profile", str(bundle), "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["profiles"][0]["batch_size"] == 1
    res = CliRunner().invoke(app, ["profile", str(bundle), "--dtype", "float8"])
    assert res.exit_code == 1 and "unknown dtype 'float8'" in res.output
    res = CliRunner().invoke(app, ["profile", str(bundle), "--dtype", "float16", "--device", "cpu"])
    assert res.exit_code == 1 and "float16 is for GPUs" in res.output
    res = CliRunner().invoke(app, ["profile", str(bundle), "--batch-size", "1,x"])
    assert res.exit_code == 1 and "--batch-size" in res.output
