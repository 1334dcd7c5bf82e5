"""`calibrate --search`: per exit off or one head candidate, and the thresholds, for a budget; the
written bundle keeps and runs only the chosen heads."""
from pathlib import Path

import pytest
import torch

import mexify
from mexify.api import Budget, evaluate_policy, search
from mexify.bundle import read_config, update_bundle
from mexify.calibrate import search_configuration
from mexify.data import as_loader, build_dataset
from mexify.errors import ConfigError
from mexify.runtime import EarlyExitRuntime

FIXTURES = Path(__file__).parent / "fixture_models.py"
SCENES = "synthetic:scenes?size=64&classes=4&n=16&n_eval=40"


@pytest.fixture
def bundle(tmp_path):
    """TinyUNet with the mess-fcn space (an fcn and a mess candidate per exit), heads sharpened so that
    their confidences spread as trained ones do."""
    out = tmp_path / "cand.mex"
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=3, out=str(out), heads="mess-fcn")
    model = mexify.load(out)
    with torch.no_grad():
        for cands in model.candidates.values():
            for j, head in enumerate(cands):
                [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(20.0 + 20 * j)
    update_bundle(out, model=model)
    return out


@pytest.mark.parametrize("budget", ["1.5x", "2x"])
def test_search_meets_the_budget_on_the_cache_and_the_bundle_runs_only_the_chosen_heads(bundle, budget):
    before = mexify.load(bundle)
    cand_state = {k: v.clone() for k, v in before.state_dict().items() if k.startswith("candidates.")}
    report = search(bundle, SCENES, policy="maxprob", budget=Budget.parse(budget))
    original = before.original_flops
    assert report.figures["mean_cost"] <= original / float(budget[:-1]) * (1 + 1e-12)
    assert report.figures["mean_flops"] == pytest.approx(report.figures["mean_cost"])
    assert report.baseline is not None and report.baseline["mean_cost"] <= original / float(budget[:-1]) * (1 + 1e-12)
    assert report.figures["miou"] >= report.baseline["miou"] - 1e-9  # uniform fcn is one of the configurations tried

    model = mexify.load(bundle)
    assert model.candidates is None and not any(e.candidates for e in model.config.exits)
    thresholds = report.policy.thresholds
    for e, (name, k) in enumerate(zip(model.exit_names[:-1], report.choice)):
        head = model.heads[name]
        keep = model.config.exits[e].chosen
        assert k is None or keep == k
        for key, value in head.state_dict().items():
            assert torch.equal(value, cand_state[f"candidates.{name}.{keep}.{key}"])
    calls = {}
    for name, head in model.heads.items():
        head.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    ds = build_dataset(SCENES, split="calib")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    EarlyExitRuntime(model).predict_batch(x)
    ran = {name for name, t in zip(model.exit_names[:-1], thresholds) if t != float("inf")}
    assert set(calls) <= ran and (not ran or calls)
    # the search's figures (cache arithmetic) are what the runtime gives on the same split
    run = evaluate_policy(bundle, SCENES, split="calib")
    assert run.miou == pytest.approx(report.figures["miou"], abs=1e-6)
    assert run.mean_flops == pytest.approx(report.figures["mean_flops"], rel=1e-9)


def test_search_keeps_candidates_when_asked_and_refuses_what_it_cannot_search(bundle, tmp_path):
    report = search(bundle, SCENES, policy="entropy", budget=Budget.max_drop(50.0), keep_candidates=True)
    model = mexify.load(bundle)
    assert model.candidates is not None and [e.chosen for e in model.config.exits] == [
        k if k is not None else 0 for k in report.choice]
    assert report.figures["drop"] <= 50.0
    with pytest.raises(ConfigError, match="per-exit"):
        search(bundle, SCENES, policy="learned")
    from mexify.errors import BudgetError

    with pytest.raises(BudgetError, match="no configuration reaches 20x"):
        search(bundle, SCENES, policy="maxprob", budget=Budget.parse("20x"), keep_candidates=True)
    plain = tmp_path / "plain.mex"
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=2, out=str(plain))
    with pytest.raises(ConfigError, match="--heads"):
        search(plain, SCENES)


@pytest.mark.slow
def test_search_at_the_issue_scale_6_exits_x_4_candidates_x_500_images(tmp_path):
    """6 exits x 4 candidates x 500+ images: one collection pass, then arithmetic (timed in bench_calibrate)."""
    out = tmp_path / "big.mex"
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((32, 32)), exits=6, out=str(out), heads="mess")
    model = mexify.load(out)
    ds = build_dataset("synthetic:scenes?size=32&classes=4&n=16&n_eval=1000", split="calib")
    report = search_configuration(model, lambda: as_loader(ds, 50), policy="maxprob", budget=Budget.parse("1.5x"))
    assert len(ds) >= 500 and len(report.choice) == 6 and report.evaluations > 6
    assert report.figures["mean_cost"] <= model.original_flops / 1.5 * (1 + 1e-12)


def test_view_profile_merges_switched_off_stages_and_takes_the_chosen_candidates_times():
    from mexify.calibrate.configure import Candidate, view_profile
    from mexify.runtime import LatencyProfile

    class _Cand:  # two exits x two candidates, as CandidateView lays them out
        columns = [Candidate(0, "a", 0), Candidate(0, "a", 1), Candidate(1, "b", 0), Candidate(1, "b", 1)]
        exit_names = ["a#0", "a#1", "b#0", "b#1", "final"]

    profile = LatencyProfile.from_dict({
        "batch_size": 2, "mode": "eager", "stage_ms": [1.0, 2.0, 4.0], "head_ms": [0.5, 0.5], "policy_ms": [0.1, 0.2],
        "mask_ms": [0.3, 0.4, 0.8], "candidate_head_ms": {"a": [0.25, 0.75], "b": [1.5, 3.0]}}, key="cpu|b1")
    v = view_profile(profile, _Cand(), [1])  # exit a with its second candidate, exit b off
    assert v.stage_ms == [1.0, 6.0] and v.head_ms == [0.75] and v.policy_ms == [0.1] and v.mask_ms == [0.3, 0.8]
    v = view_profile(profile, _Cand(), [3])  # exit a off, exit b with its second candidate
    assert v.stage_ms == [3.0, 4.0] and v.head_ms == [3.0] and v.policy_ms == [0.2] and v.mask_ms == [0.4, 0.8]


def test_search_on_measured_latency_keeps_the_profile_for_the_chosen_heads(bundle):
    from mexify.api import profile

    profile(bundle, device="cpu", warmup=1, repeats=2)
    entry = next(iter(read_config(bundle).latency.values()))
    assert {len(v) for v in entry["candidate_head_ms"].values()} == {5}
    report = search(bundle, SCENES, policy="maxprob", budget=Budget.parse("1.3x"))
    assert any("measured latency" in n for n in report.notes)
    assert report.figures["cost"] == "latency" and report.figures["mean_ms"] <= report.figures["original_ms"] / 1.3 * (1 + 1e-9)
    after = read_config(bundle)
    kept = next(iter(after.latency.values()))
    assert "candidate_head_ms" not in kept
    assert kept["head_ms"] == [entry["candidate_head_ms"][e.name][e.chosen] for e in after.exits]


def test_search_moves_exits_among_positions_and_its_figures_are_the_runtimes(tmp_path):
    """--max-exits: a bundle with one head per position, at most 2 of its 6 exits kept on; the figures of the chosen
    positions (cache arithmetic) are what the runtime gives, and the oracle is reported for them."""
    out = tmp_path / "positions.mex"
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=6, out=str(out))
    model = mexify.load(out)
    with torch.no_grad():
        for j, head in enumerate(model.heads.values()):
            [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(20.0 + 10 * j)
    update_bundle(out, model=model)
    with pytest.raises(ConfigError, match="--max-exits 6"):
        search(out, SCENES, policy="maxprob", budget=Budget.parse("1.5x"))  # every exit on, one head each: nothing to choose
    report = search(out, SCENES, policy="maxprob", budget=Budget.parse("1.5x"), max_exits=2)
    on = [e for e, k in enumerate(report.choice) if k is not None]
    assert 1 <= len(on) <= 2 and report.evaluations > 6
    assert report.figures["mean_cost"] <= model.original_flops / 1.5 * (1 + 1e-12)
    assert all(t == float("inf") for e, t in enumerate(report.policy.thresholds) if e not in on)  # off: never leaves
    assert report.oracle is not None and report.oracle["mean_cost"] <= model.original_flops / 1.5 * (1 + 1e-12)
    assert report.baseline is None and report.default is None  # every exit on breaks the cap
    run = evaluate_policy(out, SCENES, split="calib")
    assert run.miou == pytest.approx(report.figures["miou"], abs=1e-6)
    assert run.mean_flops == pytest.approx(report.figures["mean_flops"], rel=1e-9)
    assert sum(r > 0 for r in run.exit_rates[:-1]) <= 2
    monitor = read_config(out).policy["monitor"]  # the drift record: what the chosen configuration did on these images
    assert monitor["exit_rates"] == pytest.approx(report.figures["exit_rates"])
    rates, thresholds = list(report.figures["exit_rates"].values()), report.policy.thresholds
    scored = {model.exit_names[e] for e in on if thresholds[e] < float("inf") and sum(rates[e:]) > 0}
    assert set(monitor["confidence"]) == scored and scored  # scored where images arrive and may leave


def test_a_search_over_positions_keeps_the_heads_and_their_latency_profile(tmp_path):
    """Moving exits changes no head: the bundle's measured profile stays valid, and the search is costed by it."""
    out = tmp_path / "positions.mex"
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=4, out=str(out))
    mexify.api.profile(str(out), device="cpu", warmup=1, repeats=2)
    before = mexify.load(out)
    report = search(out, SCENES, policy="maxprob", budget=Budget.max_drop(50.0), max_exits=2)
    assert any("measured latency" in n for n in report.notes)
    after = mexify.load(out)
    assert after.config.latency == before.config.latency and after.config.latency
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
