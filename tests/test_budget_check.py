"""Whether a calibrated budget held: `budget_verdict` for each kind, `mexify eval` and `mexify bench` reporting it."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import mexify
from mexify import api
from mexify.bundle import update_bundle
from mexify.cli import app
from mexify.data import build_dataset
from mexify.policies import build_policy
from mexify.tools import BudgetObservation, budget_verdict

FIXTURES = Path(__file__).parent / "fixture_models.py"
DATA = "synthetic:scenes?classes=4&size=32&n=8&n_eval=8"


# ----------------------------------------------------------------- the verdict, kind by kind


def _obs(**kw):
    base = dict(images=400, split="val", drop=0.62, disagreement=0.019, flops_speedup=2.5, flops_fraction=0.4,
                speedup=1.9, cost_fraction=0.5, ms_per_image=7.5, timing="predicted by the profile cpu|b1")
    return BudgetObservation(**{**base, **kw})


def test_max_drop_held_and_broken():
    v = budget_verdict({"kind": "max_drop", "value": 1.0, "text": "max-drop 1.0"}, _obs())
    assert v.held and v.observed == pytest.approx(0.62) and v.accuracy
    assert v.line() == "budget max-drop 1.0 held on val (400 images): drop 0.62 points"
    broken = budget_verdict({"kind": "max_drop", "value": 1.0, "text": "max-drop 1.0"}, _obs(drop=1.48))
    assert not broken.held and broken.line().startswith("budget max-drop 1.0 BROKEN on val (400 images): drop 1.48 points")
    assert budget_verdict({"kind": "max_drop", "value": 0.62}, _obs()).held  # exactly at the budget holds
    d = broken.to_dict()
    assert {"held": False, "kind": "max_drop", "value": 1.0, "split": "val", "images": 400}.items() <= d.items()
    assert d["observed"] == pytest.approx(1.48) and d["line"] == broken.line()


def test_max_drop_with_a_confidence_names_the_bound_and_the_expected_break_rate():
    record = {"kind": "max_drop", "value": 1.0, "text": "max-drop 1.0", "confidence": 0.9}
    figures = {"drop": 0.6, "drop_bound": 0.95}
    v = budget_verdict(record, _obs(), figures)
    assert v.held and v.line().endswith("drop 0.62 points (calibrated bound at 90% confidence: 0.95)")
    v = budget_verdict(record, _obs(drop=1.48), figures)
    assert "BROKEN" in v.line() and "expected to break on about 1 split in 10 like this one" in v.line()
    assert "the images differ from the calibration images" in v.note
    v = budget_verdict({**record, "confidence": 0.95}, _obs(drop=1.48))
    assert "1 split in 20" in v.line() and "calibrated bound" not in v.line()
    v = budget_verdict({**record, "confidence": 0}, _obs(drop=1.48), {"drop": 0.6})
    assert v.confidence is None and "(0.60 on the calibration images)" in v.line() and "without a confidence" in v.note


def test_max_drop_without_labels_is_agreement_with_the_final_exit():
    v = budget_verdict({"kind": "max_drop", "value": 1.0, "text": "max-drop 1.0"}, _obs(drop=0.3, labelled=False))
    assert v.held and "agreement-mIoU drop 0.30 points against the final exit (no labels)" in v.line()


def test_max_disagree():
    record = {"kind": "max_disagree", "value": 0.02, "text": "max-disagree 2%", "confidence": 0.9}
    v = budget_verdict(record, _obs(), {"disagreement": 0.015, "disagreement_bound": 0.018})
    assert v.held and v.accuracy and "1.90% of pixels differ from the final exit" in v.line() and "1.80%" in v.line()
    assert not budget_verdict(record, _obs(disagreement=0.03, reference="original model")).held
    assert "original model" in budget_verdict(record, _obs(reference="original model")).reading


def test_speedup_judged_in_the_calibrations_cost_model():
    record = {"kind": "speedup", "value": 2.0, "text": "2x"}
    by_time = budget_verdict(record, _obs(), {"cost": "latency", "speedup_bound": 2.1})
    assert not by_time.held and by_time.observed == pytest.approx(1.9) and "1.90x predicted by the profile cpu|b1" in by_time.line()
    assert not by_time.accuracy and by_time.status() == "budget 2x BROKEN (1.90x predicted by the profile cpu|b1)"
    by_flops = budget_verdict(record, _obs(), {"cost": "flops"})
    assert by_flops.held and by_flops.observed == pytest.approx(2.5) and "2.50x by FLOPs" in by_flops.line()
    no_profile = budget_verdict(record, _obs(speedup=float("nan")), {"cost": "latency"})
    assert no_profile.held and "by FLOPs" in no_profile.reading  # what the evaluation has


def test_cost_fraction_and_latency():
    frac = {"kind": "cost_fraction", "value": 0.45, "text": "45%"}
    assert budget_verdict(frac, _obs(), {"cost": "flops"}).held  # 40% of the FLOPs
    v = budget_verdict({**frac, "confidence": 0.9}, _obs(), {"cost": "latency", "cost_bound": 5.0, "mean_cost": 4.0,
                                                             "cost_fraction": 0.4})
    assert not v.held and v.bound == pytest.approx(0.5) and "cost 50.0% of the original predicted" in v.line()
    assert "calibrated bound at 90% confidence: 50.00%" in v.line()
    ms = {"kind": "latency_ms", "value": 8.0, "text": "8ms"}
    assert budget_verdict(ms, _obs(), {"cost": "latency"}).held
    v = budget_verdict({**ms, "value": 7.0}, _obs(timing="measured", split=None), {"cost": "latency", "mean_ms": 6.5})
    assert not v.held and v.line().startswith("budget 8ms BROKEN on these 400 images: 7.50 ms/image measured")


def test_no_verdict_without_a_budget_or_a_figure():
    assert budget_verdict(None, _obs()) is None
    assert budget_verdict({"kind": "someday", "value": 1.0}, _obs()) is None
    assert budget_verdict({"kind": "max_disagree", "value": 0.02}, _obs(disagreement=float("nan"))) is None
    assert budget_verdict({"kind": "latency_ms", "value": 8.0}, _obs(ms_per_image=float("nan"))) is None


# ----------------------------------------------------------------- mexify eval


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "calibrated.mex"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(out))
    api.calibrate(out, DATA, policy="maxprob", budget=api.Budget.max_drop(1.0), split="calib", batch_size=4)
    return out


def _with_budget(src, dst, budget, thresholds=None):
    """A copy of the bundle whose policy records ``budget`` (and, when given, other thresholds)."""
    shutil.copytree(src, dst)
    policy = yaml.safe_load((Path(dst) / "config.yaml").read_text())["policy"]
    policy["budget"] = budget
    if thresholds is not None:
        policy["thresholds"] = thresholds
    update_bundle(dst, policy=policy)
    return dst


def _eval_json(bundle, data=DATA):
    res = CliRunner().invoke(app, ["eval", str(bundle), "--data", data, "--split", "val", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_eval_says_a_loose_budget_held_and_a_tightened_one_broke(calibrated, tmp_path):
    report = api.evaluate(calibrated, DATA, split="val", batch_size=4, workers=0, device="cpu")
    check, (row,) = report.budget_check, report.policies
    assert check is not None and check.held and check.kind == "max_drop" and check.split == "val" and check.images == 8
    assert check.observed == pytest.approx(report.final.miou - row.miou, abs=1e-9)
    assert 0.0 <= row.disagreement <= 1.0 and row.agreement_miou <= 100.0
    out = _eval_json(calibrated)
    assert out["budget_check"]["held"] is True and out["budget_check"]["kind"] == "max_drop"
    assert {"held", "kind", "value", "observed", "split", "images"} <= set(out["budget_check"])
    assert out["policies"][0]["extra"]["disagreement"] == pytest.approx(row.disagreement)
    res = CliRunner().invoke(app, ["eval", str(calibrated), "--data", DATA, "--split", "val", "--workers", "0"])
    assert res.exit_code == 0 and "budget max-drop 1.0 held on val (8 images)" in res.output

    # the same policy, its budget edited to a speed-up beyond what the split shows
    tight = _with_budget(calibrated, tmp_path / "tight", {"kind": "speedup", "value": 1000.0, "text": "1000x", "confidence": 0.9})
    out = _eval_json(tight)
    check = out["budget_check"]
    assert check["held"] is False and check["kind"] == "speedup" and check["value"] == 1000.0 and check["images"] == 8
    assert check["observed"] == pytest.approx(out["policies"][0]["extra"]["speedup_flops"])
    res = CliRunner().invoke(app, ["eval", str(tight), "--data", DATA, "--split", "val", "--workers", "0"])
    assert "budget 1000x BROKEN on val (8 images)" in res.output and "1 split in 10" in res.output


@pytest.fixture(scope="module")
def half_early(calibrated, tmp_path_factory):
    """The calibrated bundle with a threshold that sends about half the val images out at exit 0."""
    model = mexify.load(calibrated)
    ds = build_dataset(DATA, split="val")
    with torch.no_grad():
        scores = build_policy("maxprob").scores(0, model.forward_all(torch.stack([ds[i][0] for i in range(len(ds))]))[0])
    thresholds = {model.exit_names[0]: float(scores.median()), model.exit_names[1]: None}
    return _with_budget(calibrated, tmp_path_factory.mktemp("budget") / "half.mex",
                        {"kind": "max_disagree", "value": 1.0, "text": "max-disagree 100%"}, thresholds)


def test_eval_max_disagree_against_the_final_exit(half_early, tmp_path):
    out = _eval_json(half_early)
    seen = out["budget_check"]["observed"]
    assert out["budget_check"]["held"] is True and 0.0 < seen < 1.0
    assert out["policies"][0]["extra"]["disagreement"] == pytest.approx(seen)
    tight = _with_budget(half_early, tmp_path / "tight", {"kind": "max_disagree", "value": seen / 2, "text": "max-disagree tight"})
    check = _eval_json(tight)["budget_check"]
    assert check["held"] is False and check["observed"] == pytest.approx(seen)
    assert "without a confidence" in check["line"]


def _image_folder(root, n=6, size=32):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"frame{i}.png")
    return root


def test_eval_on_images_without_labels(half_early, tmp_path):
    folder = _image_folder(tmp_path / "frames")
    bundle = _with_budget(half_early, tmp_path / "drop", {"kind": "max_drop", "value": 100.0, "text": "max-drop 100.0"})
    report = api.evaluate(bundle, f"folder:{folder}", split="val", batch_size=4, workers=0, device="cpu")  # classes: the model's
    (row,) = report.policies
    assert report.labelled_pixels == 0 and math.isnan(report.final.miou) and any("no labels" in n for n in report.notes)
    check = report.budget_check
    assert check.held and check.images == 6 and check.observed == pytest.approx(100.0 - row.agreement_miou)
    assert "agreement-mIoU drop" in check.line() and "(no labels)" in check.line()
    assert report.to_dict()["labelled_pixels"] == 0


def test_eval_without_a_budget_or_a_policy_says_nothing(calibrated, tmp_path):
    bundle = _with_budget(calibrated, tmp_path / "none", None)
    assert api.evaluate(bundle, DATA, split="val", batch_size=4, workers=0, device="cpu").budget_check is None
    plain = tmp_path / "plain"
    shutil.copytree(calibrated, plain)
    update_bundle(plain, policy=None)
    out = _eval_json(plain)
    assert out["budget_check"] is None and out["policies"] == []
    res = CliRunner().invoke(app, ["eval", str(plain), "--data", DATA, "--split", "val", "--workers", "0"])
    assert res.exit_code == 0 and "held" not in res.output and "BROKEN" not in res.output


# ----------------------------------------------------------------- mexify bench


def test_bench_reports_the_drop_and_disagreement_on_the_timed_images(half_early, tmp_path):
    bundle = _with_budget(half_early, tmp_path / "bench", {"kind": "max_drop", "value": 1.0, "text": "max-drop 1.0"})
    args = ["bench", str(bundle), "--data", DATA, "--limit", "6", "--batch-size", "2", "--warmup", "0", "--repeats", "1"]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    p, check = rep["policy"], rep["budget_check"]
    assert 0.0 < p["disagreement"] < 1.0 and p["agreement_miou"] < 100.0
    assert p["drop"] == pytest.approx(p["final_miou"] - p["miou"])
    assert check["kind"] == "max_drop" and check["images"] == 6 and check["split"] == "val"
    assert check["observed"] == pytest.approx(p["drop"]) and check["held"] == (p["drop"] <= 1.0)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"on these 6 images: drop {p['drop']:.2f} points" in res.output and "% of pixels differ from the original" in res.output
    assert "budget max-drop 1.0 " in res.output


def test_bench_without_labels_counts_agreement(half_early, tmp_path):
    folder = _image_folder(tmp_path / "frames", n=4)
    rep = api.bench(half_early, f"folder:{folder}", split="val", limit=4, warmup=0, repeats=1, device="cpu")
    p = rep.policy
    assert "drop" not in p and "miou" not in p and 0.0 <= p["disagreement"] <= 1.0
    assert rep.budget_check is not None and rep.budget_check.kind == "max_disagree"
    assert rep.budget_check.observed == pytest.approx(p["disagreement"]) and rep.budget_check.split == "val"
    assert all("miou" not in r for r in rep.exits)
    assert json.dumps(rep.to_dict())
