"""Calibration: exact mIoU from the cache, budget-respecting joint search, errors, CLI, bundles."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "policies"))
from toy_models import NoisyExits, make_scenes  # noqa: E402

from mexify.api import Budget, calibrate  # noqa: E402
from mexify.calibrate import (  # noqa: E402
    collect_cache,
    fit_temperatures,
    oracle_at,
    parse_budget,
)
from mexify.errors import BudgetError, ConfigError  # noqa: E402
from mexify.metrics import ConfusionMatrix, per_image_miou  # noqa: E402
from mexify.policies import build_policy, policy_from_dict  # noqa: E402

FIXTURES = Path(__file__).parent / "fixture_models.py"


def test_collect_cache_leaves_the_callers_model_and_policy_as_they_were():
    model, data = NoisyExits(), make_scenes(6)
    model.train()
    pol = build_policy("entropy", temperatures=[1.0, 1.0, 1.0, 1.0])
    collect_cache(model, torch.utils.data.DataLoader(data, batch_size=3), source=pol, temperatures=[2.0, 2.0, 2.0, 2.0])
    assert model.training and pol.temperatures == [1.0, 1.0, 1.0, 1.0]




@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = NoisyExits(num_classes=4, num_exits=4)
    data = make_scenes(36)
    cache = collect_cache(model, torch.utils.data.DataLoader(data, batch_size=9))
    return model, data, cache


def _preds(model, data):
    x = torch.stack([d[0] for d in data])
    y = torch.stack([d[1] for d in data])
    return [z.argmax(1) for z in model.forward_all(x)], y


def test_cache_miou_equals_direct_confusion_matrix(toy):
    model, data, cache = toy
    preds, y = _preds(model, data)
    rng = np.random.RandomState(0)
    for _ in range(3):
        a = rng.randint(0, cache.num_exits, size=len(data))
        cm = ConfusionMatrix(model.num_classes)
        for n, e in enumerate(a):
            cm.update(preds[e][n : n + 1], y[n : n + 1])
        assert cache.miou(a) == pytest.approx(cm.miou(), abs=1e-9)
    pim = cache.per_image_miou()
    for e in range(cache.num_exits):
        ref = per_image_miou(preds[e], y, model.num_classes).numpy()
        assert np.allclose(pim[:, e], ref, atol=1e-6)


def test_cache_is_compact():
    """A real cache of 7 exits x 19 classes: the same bytes per image at any resolution, ~140 MB per 1,000 images."""
    model = NoisyExits(num_classes=19, num_exits=7)
    per_image = {}
    for size, thumb in ((128, 64), (256, 64), (256, 0)):
        data = make_scenes(6, num_classes=19, size=size)
        cache = collect_cache(model, torch.utils.data.DataLoader(data, batch_size=3), thumb=thumb)
        assert cache.num_images == 6
        per_image[size, thumb] = cache.nbytes() / 6
    assert per_image[128, 64] == per_image[256, 64]  # independent of the resolution
    mb_per_1000 = {k: v * 1000 / 2**20 for k, v in per_image.items()}
    assert 100 < mb_per_1000[256, 64] < 150  # the module docstring's figure
    assert mb_per_1000[256, 0] < 65  # without cbt's thumbnails


def test_search_respects_budget_and_beats_one_global_threshold(toy):
    _, _, cache = toy
    for name in ("mess", "maxprob", "entropy"):
        pol = build_policy(name)
        scores = pol._fit_params(cache).cache_scores(cache)
        for speedup in (1.5, 2.5, 4.0):
            max_cost = cache.original_flops / speedup
            res = cache.search(scores, max_cost=max_cost)
            f = res.figures()
            assert f["mean_flops"] <= max_cost + 1e-9
            assert cache.assign(scores, res.thresholds).tolist() == res.assignment.tolist()
            # exhaustive single global threshold as the baseline
            best = -1.0
            for t in np.unique(scores):
                a = cache.assign(scores, [t] * scores.shape[1])
                if cache.costs[a].mean() <= max_cost + 1e-9:
                    best = max(best, cache.miou(a))
            assert f["miou"] >= best - 1e-9, (name, speedup)


def test_max_drop_is_fastest_within_the_drop(toy):
    _, _, cache = toy
    scores = build_policy("maxprob").cache_scores(cache)
    res = cache.search(scores, max_drop=1.0)
    f = res.figures()
    assert f["drop"] <= 1.0 + 1e-9
    assert f["speedup"] > 1.0
    # no point on the explored Pareto front is cheaper within the same drop
    assert all(p["mean_cost"] >= f["mean_cost"] - 1e-9 for p in res.pareto if p["miou"] >= f["final_miou"] - 1.0)


def test_impossible_budget_reports_best_reachable(toy):
    _, _, cache = toy
    scores = build_policy("maxprob").cache_scores(cache)
    best = cache.original_flops / cache.costs[0]
    with pytest.raises(BudgetError, match=f"{best:.2f}x") as exc:
        cache.search(scores, max_cost=cache.original_flops / (best * 1.5))
    assert exc.value.exit_code == 3


def test_parse_budget():
    assert parse_budget("2x") == {"kind": "speedup", "value": 2.0, "text": "2x"}
    assert parse_budget("40%")["value"] == pytest.approx(0.4)
    for bad in ("2", "-1x", "140%", "fast"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_budget_is_one_value_with_a_plain_form():
    b = Budget.parse("2x", cost="flops", profile="cpu|b1")
    assert b.to_dict() == {"kind": "speedup", "value": 2.0, "text": "2x", "cost": "flops", "profile": "cpu|b1", "confidence": 0.9}
    assert Budget.from_dict(b.to_dict()) == b and b.record() == {**parse_budget("2x"), "confidence": 0.9}  # what a fitted policy keeps
    assert Budget() == Budget.max_drop(1.0) == Budget.from_options() and Budget().record()["text"] == "max-drop 1.0"
    assert Budget.from_options(budget="40%").max_cost(100.0) == pytest.approx(40.0) and Budget().max_cost(100.0) is None
    assert Budget.max_drop(2.0).bounds(100.0) == {"max_cost": None, "max_drop": 2.0, "max_disagree": None, "confidence": 0.9}
    # a record written without a confidence (every fit before confidences existed) is a point fit
    assert Budget.from_dict({"kind": "max_drop", "value": 1.0, "text": "max-drop 1.0"}).confidence == 0.0
    point = Budget.from_options(max_drop=1.0, confidence="0")
    assert point.confidence == 0.0 and "confidence" not in point.record() and "point fit" in point.claim
    assert Budget.from_options(confidence="95%").confidence == pytest.approx(0.95)
    d = Budget.from_options(max_disagree="2%")
    assert (d.kind, d.value, d.text, d.disagree, d.drop, d.accuracy) == ("max_disagree", 0.02, "max-disagree 2%", 0.02, None, True)
    assert Budget.max_disagree("0.05").value == pytest.approx(0.05)
    assert d.held({"disagreement": 0.019}) and not d.held({"disagreement": 0.021}) and d.held({}) is None
    assert Budget.parse("2x").held({"speedup": 2.1}) and not Budget.parse("2x").held({"speedup": 1.9})
    with pytest.raises(ConfigError, match="not --budget and --max-drop"):
        Budget.from_options(budget="2x", max_drop=1.0)
    with pytest.raises(ConfigError, match="needs measured latencies"):
        Budget.parse("8ms").max_cost(100.0, "flops")
    for bad in (1.0, -0.1, "high", "150%"):
        with pytest.raises(ConfigError, match="confidence"):
            Budget(confidence=bad)
    for bad in ("0%", "2", "200%", "many"):
        with pytest.raises(ConfigError, match="max-disagree"):
            Budget.max_disagree(bad)
    with pytest.raises(ConfigError, match="unknown cost model"):
        Budget(cost="joules")
    with pytest.raises(ConfigError, match="Budget.parse"):
        calibrate(NoisyExits(), make_scenes(4), budget="2x")  # a string is refused with the way to make a Budget


def test_oracle_is_earliest_within_tolerance(toy):
    _, _, cache = toy
    pim = cache.per_image_miou()
    a = cache.oracle_assignment(2.0)
    for n, e in enumerate(a):
        assert pim[n, e] >= pim[n, -1] - 2.0 - 1e-9
        assert all(pim[n, j] < pim[n, -1] - 2.0 for j in range(e))
    fig, curve = oracle_at(cache, max_cost=cache.original_flops / 2)
    assert fig["mean_flops"] <= cache.original_flops / 2 + 1e-9 and len(curve) > 10


def test_unlabelled_data_fits_label_free_parts():
    model = NoisyExits()
    data = make_scenes(12, labelled=False)
    rep = calibrate(model, data, policy="cbt", budget=Budget.parse("1.5x"), temperature=True, batch_size=6)
    assert not rep.labelled and rep.oracle is None and rep.temperatures is None
    assert any("no labels" in n for n in rep.notes)
    assert rep.figures["final_miou"] == pytest.approx(100.0)  # agreement of the final exit with itself
    assert rep.policy.class_thresholds is not None


def test_temperatures_recover_a_known_scale():
    model = NoisyExits(num_exits=2)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 4, 8, 8, generator=g) * 2
    y = torch.distributions.Categorical(logits=z.permute(0, 2, 3, 1)).sample()
    model.forward_all = lambda x: [x * 3.0, x * 3.0]  # over-confident by 3x
    temps = fit_temperatures(model, [(z, y)])
    assert temps is not None and all(abs(t - 3.0) < 0.4 for t in temps)


def test_calibrate_on_toy_model_writes_pareto_and_reports(tmp_path, toy):
    model, data, _ = toy
    rep = calibrate(model, data, policy="mess", budget=Budget.parse("2x"), out=tmp_path, batch_size=9, policy_options={"edge_radius": 1})
    assert rep.figures["speedup"] >= 2.0 - 1e-9
    assert rep.oracle is not None and rep.oracle["speedup"] >= 2.0 - 1e-9
    assert (tmp_path / "pareto.png").stat().st_size > 0
    rows = (tmp_path / "pareto.csv").read_text().splitlines()
    assert rows[0].startswith("curve,") and any(r.startswith("oracle,") for r in rows)
    d = json.loads(json.dumps(rep.to_dict(), default=str))
    assert set(d["thresholds"]) == set(model.exit_names[:-1])
    # the fitted policy reproduces the cache's assignment at run time
    x = torch.stack([d_[0] for d_ in data])
    logits = model.forward_all(x)
    taken = torch.full((len(data),), -1)
    for i, z in enumerate(logits):
        ex, _ = rep.policy.decide(i, z)
        taken[(taken < 0) & ex] = i
    assert taken.tolist() == rep.search.assignment.tolist()


def test_class_means_calibrates_without_trained_heads(toy):
    model, data, _ = toy
    rep = calibrate(model, data, policy="class-means", budget=Budget.max_drop(5.0), batch_size=9)
    assert rep.figures["drop"] <= 5.0 + 1e-9
    back = policy_from_dict(yaml.safe_load(yaml.safe_dump(rep.policy.to_dict())))
    x = torch.stack([d[0] for d in data[:4]])
    feats = model.forward_features(x)
    logits = model.forward_all(x)
    for i in range(len(feats)):
        assert torch.equal(back.decide(i, logits[i], feats[i])[0], rep.policy.decide(i, logits[i], feats[i])[0])


def test_calibrate_bundle_end_to_end_and_cli(tmp_path, capsys):
    import mexify
    from typer.testing import CliRunner

    from mexify.cli import app

    bundle = tmp_path / "bundle"
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(bundle))
    spec = "synthetic:scenes?size=64&classes=4&n=24&n_eval=8"
    res = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", spec, "--policy", "maxprob", "--max-drop", "1.0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["figures"]["drop"] <= 1.0 + 1e-9
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    pol = policy_from_dict(cfg["policy"])
    assert pol.name == "maxprob" and len(pol.thresholds) == len(cfg["policy"]["exit_names"]) - 1
    assert cfg["policy"]["budget"]["kind"] == "max_drop"
    model = mexify.load(bundle)
    assert pol.exit_names == list(model.exit_names)
    # an impossible budget: exit code 3 and the best reachable value in one line
    with pytest.raises(SystemExit) as exc:
        app(["calibrate", str(bundle), "--data", spec, "--budget", "1000x"], prog_name="mexify")
    assert exc.value.code == 3
    assert "best reachable" in capsys.readouterr().err


def test_calibrating_on_a_dataset_with_other_classes_is_refused_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    import mexify
    from mexify.cli import app

    bundle = tmp_path / "bundle"
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(bundle))
    before = (bundle / "config.yaml").read_text()
    res = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", "synthetic:scenes?size=64&classes=6&n=8&n_eval=4"])
    assert res.exit_code == 1
    assert "6 classes but the model predicts 4" in res.output and "Traceback" not in res.output
    assert (bundle / "config.yaml").read_text() == before and not (bundle / "calibration").exists()


def test_switched_off_exits_cost_nothing_and_calibration_agrees_with_the_runtime(tmp_path):
    import mexify
    from mexify import api

    bundle = tmp_path / "bundle"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(bundle))
    model = mexify.load(bundle)
    spec = "synthetic:scenes?size=64&classes=4&n=24&n_eval=12"
    rep = api.calibrate(bundle, spec, policy="maxprob", budget=Budget.max_drop(1.0), batch_size=4)
    cache = rep.cache
    # arithmetic: an exit at +inf drops its head from every later exit's cost
    t = [float("inf"), 0.5, float("inf")]
    want = [sum(model.stage_flops[: i + 1]) + (model.head_flops[1] if i >= 1 else 0) for i in range(model.num_exits)]
    assert cache.exit_costs(t).tolist() == pytest.approx(want)
    assert cache.exit_costs(None).tolist() == pytest.approx([model.cost_to_exit(i) for i in range(model.num_exits)])
    # the stored figures are what the runtime spends on the same images
    run = api.evaluate_policy(bundle, spec, split="calib", batch_size=4, device="cpu")
    assert run.mean_flops == pytest.approx(rep.figures["mean_flops"])
    assert list(run.exit_rates) == pytest.approx(list(rep.figures["exit_rates"].values()))


@pytest.mark.parametrize("name,opts", [("mess", {}), ("mess", {"edge_weight": 0.3}), ("entropy", {}), ("maxprob", {}), ("cbt", {}),
                                       ("fft", {"band": 1}), ("fft", {"band": 5})])
def test_scores_at_feature_resolution_equal_the_caches(tmp_path, name, opts):
    """On a converted model whose heads answer below the input resolution, the runtime's scores
    (taken on the heads' own maps) are the cache's, and the cache's masks are the runtime's."""
    import mexify
    from mexify.data import build_dataset
    from mexify.runtime import EarlyExitRuntime

    bundle = tmp_path / "bundle"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(bundle))
    model = mexify.load(bundle).eval()
    ds = build_dataset("synthetic:scenes?size=64&classes=4&n=12&n_eval=6", split="val")
    x = torch.stack([ds[i][0] for i in range(6)])
    y = torch.stack([ds[i][1] for i in range(6)])
    cache = collect_cache(model, [(x, y)])
    pol = build_policy(name, **opts)._fit_params(cache)
    with torch.no_grad():
        native = model.forward_all(x, upsample=False)
    assert any(z.shape[-2] < 64 for z in native[:-1])
    cached = pol.cache_scores(cache)
    for i in range(model.num_exits - 1):
        assert cache.exit_pixels()[0, i] == native[i].shape[-2] * native[i].shape[-1]
        live = pol.scores(i, native[i]).double().numpy()
        assert np.array_equal(cached[:, i], live), (name, i)
    # every image forced to each exit: the runtime's masks give the cache's per-image counts
    for i in range(model.num_exits):
        masks = EarlyExitRuntime(model, exit=i).predict_batch(x).masks
        tp = torch.stack([((masks == y) & (masks == k)).flatten(1).sum(1) for k in range(4)], 1)
        assert np.array_equal(cache.tp[:, i], tp.numpy())
