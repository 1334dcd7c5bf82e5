"""`mexify compare`: every registered policy fitted on one split and judged on another, plus the oracle."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mexify
from mexify.api import Budget, compare, evaluate_policy
from mexify.bundle import update_bundle
from mexify.calibrate import comparable_policies
from mexify.cli import app

FIXTURES = Path(__file__).parent / "fixture_models.py"
SCENES = "synthetic:scenes?size=64&classes=4&n=16&n_eval=40"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A TinyUNet bundle whose heads are sharpened so that exits differ in confidence, as trained ones do."""
    out = tmp_path_factory.mktemp("cmp") / "unet.mex"
    torch.manual_seed(0)  # the same bundle whatever ran before (its heads' initial weights decide the exits)
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=3, out=str(out))
    model = mexify.load(out)
    with torch.no_grad():
        for head in model.heads.values():
            [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(40.0)
    update_bundle(out, model=model)
    return out


def test_compare_json_lists_every_policy_and_the_oracle(bundle, tmp_path):
    res = CliRunner().invoke(app, ["compare", str(bundle), "--data", SCENES, "--max-drop", "5", "--repeats", "1",
                                   "-o", str(tmp_path / "cmp"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    names = [r["policy"] for r in report["rows"]]
    assert names == comparable_policies() + ["oracle"]
    assert {"fft", "learned", "mess", "entropy", "maxprob", "cbt", "class-means"} <= set(names)
    for r in report["rows"][:-1]:
        e = r["eval"]
        assert e["drop"] == pytest.approx(e["final_miou"] - e["miou"])
        assert e["measured_speedup"] > 0 and e["flops_speedup"] > 0  # below 1 where heads run and few images leave
        assert r["fit"]["drop"] <= 5.0 + 1e-9  # the budget holds where it was fitted
    oracle = report["rows"][-1]
    assert oracle["oracle_share"] == 1.0 and oracle["eval"]["drop"] <= 5.0 + 1e-9
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0 and (tmp_path / "cmp" / "compare.csv").is_file()


def test_compared_figures_are_what_the_runtime_gives(bundle):
    """A policy's row on the evaluation split (cache arithmetic) equals the runtime's result on that split."""
    report = compare(bundle, SCENES, budget=Budget.max_drop(5.0), policies=["maxprob", "fft"], measure=False, out=None)
    for row in report.rows:
        policy = report.policies[row["policy"]]
        run = evaluate_policy(bundle, SCENES, policy=policy, split="test")
        assert run.miou == pytest.approx(row["eval"]["miou"], abs=1e-6)
        assert run.mean_flops == pytest.approx(row["eval"]["mean_flops"], rel=1e-9)


def test_compare_refuses_the_oracle_and_unknown_policies(bundle):
    res = CliRunner().invoke(app, ["compare", str(bundle), "--data", SCENES, "--policies", "oracle", "--no-measure"])
    assert res.exit_code == 1 and "oracle" in res.output
    res = CliRunner().invoke(app, ["compare", str(bundle), "--data", SCENES, "--policies", "entropi", "--no-measure"])
    assert res.exit_code == 2 and "entropy" in res.output  # an unknown name: a usage error


def test_compare_shows_the_fitting_figure_beside_the_held_out_one_and_marks_broken_budgets(bundle, tmp_path):
    """Each row: the drop where the policy was fitted, its bound, the drop on the evaluation split, and whether the
    budget held there (a budget tighter than what the evaluation split shows is marked BROKEN)."""
    args = ["compare", str(bundle), "--data", SCENES, "--policies", "maxprob,entropy", "--no-measure", "-o", str(tmp_path / "c")]
    res = CliRunner().invoke(app, args + ["--max-drop", "5", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"][:-1]
    for r in rows:
        assert r["held"] == (r["eval"]["drop"] <= 5.0 + 1e-9)
        assert r["fit"]["drop_bound"] <= 5.0 + 1e-9 and r["fit"]["confidence"] == 0.9 and r["point_fit"] is not None
        assert r["eval"]["agree_drop"] >= 0 and 0 <= r["eval"]["disagreement"] <= 1
    # the point fit on a budget of 0.01 point: somewhere it uses an early exit, and the evaluation split breaks it
    res = CliRunner().invoke(app, args + ["--max-drop", "0.01", "--confidence", "0", "--budget", "1.2x"])
    assert res.exit_code != 0 and "--budget and --max-drop" in " ".join(res.output.split())
    res = CliRunner().invoke(app, args + ["--budget", "1.3x", "--confidence", "0"], terminal_width=250)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "fit drop" in text and "eval drop" in text and "vs final" in text and "point fit" in text
    report = CliRunner().invoke(app, args + ["--budget", "1.3x", "--confidence", "0", "--json"])
    rows = json.loads(report.stdout)["rows"][:-1]
    assert all(r["held"] == (r["eval"]["speedup"] >= 1.3 - 1e-9) for r in rows)
    assert ("BROKEN" in text) == any(r["held"] is False for r in rows)
