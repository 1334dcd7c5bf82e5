"""`evaluate` and `mexify eval` on a tiny converted model and small synthetic scenes."""
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mexify
from mexify.data import build_dataset
from mexify.errors import DataError
from mexify.tools.evaluation import EvalReport, PolicyResult, evaluate
from mexify.metrics import ConfusionMatrix
from mexify.runtime import EarlyExitRuntime

FIXTURES = Path(__file__).parent / "fixture_models.py"
DATA = "synthetic:scenes?classes=5&size=32&n=8&n_eval=6"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "bundle"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 5, "width": 4}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(out))
    return out


def test_evaluate_matches_direct_computation(bundle):
    model = mexify.load(str(bundle))
    model.train()
    ds = build_dataset(DATA, split="val")
    seen = []
    report = evaluate(model, ds, device="cpu", batch_size=4, num_workers=0, progress=lambda stage, d, t: seen.append((d, t)))
    assert isinstance(report, EvalReport)
    assert model.training, "the model is handed back in the mode it arrived in"
    assert seen == [(4, 6), (6, 6)]
    assert [e.name for e in report.exits] == model.exit_names and report.exits[-1].name == "final"
    assert report.num_images == 6 and report.per_image_miou.shape == (len(model.exit_names), 6)

    model.eval()
    x = torch.stack([ds[i][0] for i in range(6)])
    y = torch.stack([ds[i][1] for i in range(6)])
    with torch.no_grad():
        outs = model.forward_all(x)
    for e, logits in zip(report.exits, outs):
        cm = ConfusionMatrix(5).update(logits.argmax(1), y)
        assert e.miou == pytest.approx(cm.miou())
        assert e.pixel_accuracy == pytest.approx(cm.pixel_accuracy())
    # costs from the bundle's record: the stages up to the exit plus every early head on the way
    cfg = mexify.bundle.read_config(bundle)
    stage = [e.stage_flops for e in cfg.exits] + [cfg.final_flops]
    head = [e.head_flops for e in cfg.exits]
    flops = [e.flops for e in report.exits]
    assert flops == [sum(stage[: i + 1]) + sum(head[: i + 1]) for i in range(len(stage))]
    assert report.exits[-1].flops_fraction >= 1.0 > report.exits[0].flops_fraction
    d = report.to_dict(per_image=True)
    json.dumps(d)
    assert len(d["per_image_miou"][0]) == 6


def test_evaluate_limit_and_class_mismatch(bundle):
    model = mexify.load(str(bundle))
    report = evaluate(model, build_dataset(DATA, split="val"), device="cpu", limit=3, num_workers=0)
    assert report.num_images == 3
    with pytest.raises(DataError, match="classes"):
        evaluate(model, build_dataset("synthetic:scenes?classes=7&size=32&n=4", split="val"), device="cpu")


def _app():
    from mexify.cli import app

    return app


def test_cli_eval_json_and_table(bundle):
    runner = CliRunner()
    res = runner.invoke(_app(), ["eval", str(bundle), "--data", DATA, "--limit", "4", "--batch-size", "2", "--json", "--workers", "0"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["num_images"] == 4 and out["exits"][-1]["name"] == "final"
    assert all(0.0 <= e["miou"] <= 100.0 for e in out["exits"]) and out["policies"] == []

    res = runner.invoke(_app(), ["eval", str(bundle), "--data", DATA, "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "final" in res.stdout and "GFLOPs" in res.stdout and "% of original" in res.stdout


def test_cli_eval_errors(bundle, tmp_path):
    runner = CliRunner()
    res = runner.invoke(_app(), ["eval", str(bundle)])
    assert res.exit_code == 1 and "--data" in res.output
    res = runner.invoke(_app(), ["eval", str(bundle), "--data", "nope:/x"])
    assert res.exit_code == 2 and "synthetic:" in res.output  # a bad --data value: a usage error


def test_eval_reports_the_bundles_policy_row(bundle, tmp_path):
    """A calibrated bundle: `mexify eval` adds the policy's row, computed through the early-exit runtime."""
    import shutil

    from mexify import api

    calibrated = tmp_path / "calibrated"
    shutil.copytree(bundle, calibrated)
    api.calibrate(calibrated, DATA, policy="maxprob", budget=api.Budget.max_drop(1.0), split="calib", batch_size=4)
    report = api.evaluate(calibrated, DATA, split="val", batch_size=4, workers=0, device="cpu")
    (row,) = report.policies
    assert isinstance(row, PolicyResult) and row.name == "maxprob"
    direct = api.evaluate_policy(calibrated, DATA, split="val", batch_size=4, device="cpu")
    assert row.miou == pytest.approx(direct.miou) and row.exit_rates == direct.exit_rates
    assert sum(row.exit_rates) == pytest.approx(1.0)
    # each exit's FLOPs with the heads the runtime evaluates (a switched-off exit's head never runs)
    runtime = EarlyExitRuntime(api.load(calibrated))
    assert row.mean_flops == pytest.approx(sum(r * f for r, f in zip(row.exit_rates, runtime.exit_flops)), rel=1e-9)
    assert row.mean_flops <= sum(r * e.flops for r, e in zip(row.exit_rates, report.exits))
    res = CliRunner().invoke(_app(), ["eval", str(calibrated), "--data", DATA, "--split", "val", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "exit policies" in res.output and "maxprob" in res.output
    assert f"{row.miou:.2f}" in res.output
    assert not math.isnan(report.to_dict()["policies"][0]["mean_flops"])
    # judged on a held-out split: no warning; on the calibration images themselves: a warning
    assert report.notes == []
    again = api.evaluate(calibrated, DATA, split="calib", batch_size=4, workers=0, device="cpu")
    assert any("calibrated on these images" in n for n in again.notes)
