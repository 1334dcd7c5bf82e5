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
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(out))
    return out


def test_profile_is_stored_by_device_batch_dtype_and_size(bundle):
    profiles = api.profile(bundle, device="cpu", batch_sizes=[1, 2], warmup=0, repeats=1).profiles
    assert [p.key for p in profiles] == ["cpu|b1|float32|64x64|eager", "cpu|b2|float32|64x64|eager"]
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


def test_threads_are_put_back_after_profiling(bundle):
    before = torch.get_num_threads()
    api.profile(bundle, device="cpu", batch_sizes=[1], warmup=0, repeats=1, threads=1 if before > 1 else 2, write=False)
    assert torch.get_num_threads() == before


def test_calibrated_bundle_profiles_its_policy_steps(bundle):
    api.calibrate(bundle, "synthetic:scenes?size=64&classes=4&n=8&n_eval=8", policy="mess", budget=api.Budget.max_drop(1.0), batch_size=4)
    (p,) = api.profile(bundle, device="cpu", batch_sizes=[1], warmup=0, repeats=1, dtype="bfloat16").profiles
    assert p.dtype == "bfloat16" and p.policy_ms is not None and len(p.policy_ms) == 3
    assert p.to_exit_ms()[0] == pytest.approx(p.stage_ms[0] + p.head_ms[0] + p.policy_ms[0])


def test_profile_cli(bundle):
    res = CliRunner().invoke(app, ["profile", str(bundle), "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["profiles"][0]["batch_size"] == 1
    res = CliRunner().invoke(app, ["profile", str(bundle), "--dtype", "float8"])
    assert res.exit_code == 2 and "unknown dtype 'float8'" in res.output  # a bad option value: a usage error
    res = CliRunner().invoke(app, ["profile", str(bundle), "--dtype", "float16", "--device", "cpu"])
    assert res.exit_code == 1 and "float16 is for GPUs" in res.output
    res = CliRunner().invoke(app, ["profile", str(bundle), "--batch-size", "1,x"])
    assert res.exit_code == 2 and "--batch-size" in res.output


SCENES = "synthetic:scenes?size=64&classes=4&n=24&n_eval=12"


def _hand_profile(bundle, stage_ms, head_ms, batch=2):
    """A latency table written by hand, so that the arithmetic below is known exactly."""
    from mexify.bundle import update_bundle

    key = f"cpu|b{batch}|float32|64x64|eager"
    update_bundle(bundle, latency={key: {
        "device": "cpu", "batch_size": batch, "dtype": "float32", "input_size": [64, 64], "stage_ms": stage_ms,
        "head_ms": head_ms, "policy_ms": [0.1] * len(head_ms), "original_ms": sum(stage_ms), "warmup": 0, "repeats": 1,
    }})
    return key


def test_calibrate_on_measured_latency_and_eval_reports_the_same(bundle):
    # an expensive first head: by FLOPs it is nothing, by the clock it is most of the first exit
    key = _hand_profile(bundle, [2.0, 2.0, 2.0, 14.0], [6.0, 1.0, 1.0])
    rep = api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.max_drop(1.0), batch_size=4)
    fig = rep.figures
    assert fig["cost"] == "latency" and fig["latency_profile"] == key
    assert any("measured latency" in n for n in rep.notes)
    # ms per image: stages and the active heads (+ 0.1 ms policy step each) on the way, batch of 2
    th = rep.policy.thresholds
    on = [not (t == float("inf")) for t in th]
    per = []
    for i in range(4):
        heads = sum((h + 0.1) for j, h in enumerate([6.0, 1.0, 1.0][: min(i + 1, 3)]) if on[j])
        per.append((sum([2.0, 2.0, 2.0, 14.0][: i + 1]) + heads) / 2)
    rates = list(fig["exit_rates"].values())
    assert fig["mean_ms"] == pytest.approx(sum(r * m for r, m in zip(rates, per)))
    assert fig["predicted_speedup"] == pytest.approx(10.0 / fig["mean_ms"])
    # what eval reports through the runtime on the same images is what calibration stored
    run = api.evaluate_policy(bundle, SCENES, split="calib", batch_size=4, device="cpu")
    assert list(run.exit_rates) == pytest.approx(rates)
    assert run.latency.mean_ms == pytest.approx(fig["mean_ms"])
    assert run.latency.profile == key
    flops = api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.max_drop(1.0, cost="flops"), batch_size=4, write=False)
    assert flops.figures["cost"] == "flops" and "mean_ms" in flops.figures


def test_budget_in_milliseconds_is_enforced(bundle):
    from mexify.errors import BudgetError, ConfigError

    with pytest.raises(ConfigError, match="needs measured latencies"):
        api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.parse("8ms"), batch_size=4)  # no profile yet
    _hand_profile(bundle, [2.0, 2.0, 2.0, 14.0], [1.0, 1.0, 1.0])
    for budget in ("6ms", "4ms"):
        rep = api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.parse(budget), batch_size=4, write=False)
        assert rep.figures["mean_ms"] <= float(budget[:-2]) + 1e-9
        assert rep.budget.kind == "latency_ms"
    with pytest.raises(BudgetError, match="not reachable"):
        api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.parse("1ms"), batch_size=4)
    with pytest.raises(ConfigError, match="needs measured latencies"):
        api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.parse("8ms", cost="flops"), batch_size=4)
    with pytest.raises(ConfigError, match="match"):
        api.calibrate(bundle, SCENES, policy="maxprob", budget=api.Budget.max_drop(1.0, profile="H100"), batch_size=4)


def test_exit_costs_count_what_the_runtime_runs():
    from mexify.runtime import exit_ms_per_image, original_ms_per_image

    prof = {"batch_size": 2, "stage_ms": [2.0, 4.0, 8.0], "head_ms": [1.0, 1.0], "policy_ms": [0.5, 0.5],
            "mask_ms": [0.2, 0.2, 0.4], "original_ms": 13.0}
    # eager: stages, active heads + decisions on the way, masks at the exit taken only
    assert exit_ms_per_image(prof, [0, 1]) == pytest.approx([(2 + 1.5 + 0.2) / 2, (6 + 3 + 0.2) / 2, (14 + 3 + 0.4) / 2])
    assert exit_ms_per_image(prof, [1]) == pytest.approx([(2 + 0.2) / 2, (6 + 1.5 + 0.2) / 2, (14 + 1.5 + 0.4) / 2])
    # CUDA graphs: every active exit's graph makes the masks of all its rows
    graphs = {**prof, "mode": "graphs"}
    assert exit_ms_per_image(graphs, [0, 1]) == pytest.approx([(2 + 1.7) / 2, (6 + 3.4) / 2, (14 + 3.4 + 0.4) / 2])
    # the baseline comes from the same pieces: every stage and the final masks (not the separately timed original)
    assert original_ms_per_image(prof) == pytest.approx((14 + 0.4) / 2)
    assert original_ms_per_image(graphs) == pytest.approx((14 + 0.4) / 2)


def test_a_throughput_budget_is_costed_at_full_batches_and_eval_predicts_the_throughput(bundle):
    from mexify.bundle import update_bundle
    from mexify.errors import ConfigError

    def entry(batch, stage_ms, head_ms):
        return {"device": "cpu", "batch_size": batch, "dtype": "float32", "input_size": [64, 64], "stage_ms": stage_ms,
                "head_ms": head_ms, "policy_ms": [0.1] * 3, "original_ms": sum(stage_ms), "warmup": 0, "repeats": 1}

    # per image, batch 8 is 2.5x cheaper than batch 1 (as a CPU or GPU batches): the throughput budget must read b8
    b1, b8 = "cpu|b1|float32|64x64|eager", "cpu|b8|float32|64x64|eager"
    update_bundle(bundle, latency={b1: entry(1, [2.0, 2.0, 2.0, 14.0], [1.0, 1.0, 1.0]),
                                   b8: entry(8, [6.4, 6.4, 6.4, 44.8], [3.2, 3.2, 3.2])})
    budget = api.Budget.parse("160/s")
    assert budget.kind == "latency_ms" and budget.value == pytest.approx(6.25) and budget.batched and budget.text == "160/s"
    rep = api.calibrate(bundle, SCENES, policy="maxprob", budget=budget, batch_size=4)
    assert rep.figures["latency_profile"] == b8
    assert rep.figures["mean_ms"] <= 6.25 + 1e-9  # at b1 the same exit mix would cost 2.5x more: out of budget
    run = api.evaluate_policy(bundle, SCENES, split="calib", batch_size=4, device="cpu")
    t = run.throughput
    assert t.batch_size == 8 and t.profile == b8
    assert t.images_per_s == pytest.approx(1000.0 / rep.figures["mean_ms"]) and t.images_per_s >= 160 * (1 - 1e-9)
    assert t.original_images_per_s == pytest.approx(1000.0 / (64.0 / 8))
    res = CliRunner().invoke(app, ["eval", str(bundle), "--data", SCENES, "--split", "calib"])
    assert res.exit_code == 0 and "predicted throughput with full batches of 8" in " ".join(res.output.split())
    for bad in ("0/s", "abc/s", "-3/s"):
        with pytest.raises(ConfigError):
            api.Budget.parse(bad)
