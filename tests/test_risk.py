"""Risk-controlled calibration: bounds that hold on new images at the stated rate, the point fit unchanged,
the small-set note, label-free calibration from the command line, compare's calibration and test columns."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import mexify
from mexify.calibrate import Budget, ExitCache, RiskBound, images_to_certify, parse_confidence
from mexify.calibrate.fit import _fit_on_cache
from mexify.cli import app
from mexify.errors import ConfigError
from mexify.policies import build_policy
sys.path.insert(0, str(Path(__file__).parent))
from risk_caches import cache_of, draw  # noqa: E402

FIXTURES = Path(__file__).parent / "fixture_models.py"


def test_bound_covers_new_sets_at_the_stated_rate():
    """For fixed thresholds, the drop on a new set as large as the calibration set stays under the bound
    about ``confidence`` of the time (300 independent calibration / new-set pairs from a known population)."""
    rng = np.random.default_rng(1)
    thresholds = np.array([0.9, 0.85, 0.8])
    covered, margins = [], []
    for _ in range(300):
        scores, tp, pc, lc = draw(rng, 150)
        cache = cache_of(tp, pc, lc)
        drop, upper = RiskBound(cache, 0.9, resamples=400).drop(cache.assign(scores, thresholds))
        assert drop == pytest.approx(cache.final_miou - cache.miou(cache.assign(scores, thresholds)))
        margins.append(upper - drop)
        scores2, tp2, pc2, lc2 = draw(rng, 150)
        new = cache_of(tp2, pc2, lc2)
        covered.append(new.final_miou - new.miou(new.assign(scores2, thresholds)) <= upper)
    assert 0.85 <= np.mean(covered) <= 0.95  # binomial sd 0.017 around 0.9
    assert min(margins) > 0


def test_bound_shrinks_with_more_images_and_cost_bound_follows_exit_rates():
    rng = np.random.default_rng(2)
    margins = {}
    for n in (100, 400):
        scores, tp, pc, lc = draw(rng, n)
        cache = cache_of(tp, pc, lc)
        a = cache.assign(scores, [0.9, 0.85, 0.8])
        d, up = RiskBound(cache, 0.9).drop(a)
        margins[n] = up - d
        cost, cost_up = RiskBound(cache, 0.9).cost(cache.exit_costs()[a])
        assert cost == pytest.approx(cache.exit_costs()[a].mean()) and cost_up > cost
        dis, dis_up = RiskBound(cache, 0.9).disagreement(a)
        assert 0 < dis < dis_up < 1
    assert margins[400] < 0.7 * margins[100]  # about 1 / sqrt(4)
    assert images_to_certify(100, 0.5, 1.5, 1.0) == 400 and images_to_certify(100, 1.2, 1.5, 1.0) is None


def test_confidence_zero_is_the_point_fit_as_released():
    """``confidence=0`` gives exactly the thresholds the search gave before budgets had a confidence
    (recorded from that release on the same cache)."""
    golden = json.loads((Path(__file__).parent / "data" / "point_fit_thresholds.json").read_text())
    scores, tp, pc, lc = draw(np.random.default_rng(7), 300)
    cache = cache_of(tp, pc, lc)
    for kw, thresholds in golden.items():
        got = cache.search(scores, **json.loads(kw), confidence=0.0).thresholds
        assert [t if math.isfinite(t) else None for t in got] == thresholds


def test_certified_fit_is_within_its_bound_and_breaks_new_sets_less_often():
    rng = np.random.default_rng(3)
    broken = {0.0: 0, 0.9: 0}
    for _ in range(12):
        scores, tp, pc, lc = draw(rng, 300)
        cache = cache_of(tp, pc, lc)
        scores2, tp2, pc2, lc2 = draw(rng, 300)
        new = cache_of(tp2, pc2, lc2)
        for conf in broken:
            res = cache.search(scores, max_drop=1.0, confidence=conf)
            f = res.figures()
            assert f["drop"] <= 1.0 + 1e-9
            if conf:
                assert f["drop_bound"] <= 1.0 + 1e-9 and f["confidence"] == 0.9 and f["speedup_bound"] <= f["speedup"]
            a = new.assign(scores2, res.thresholds)
            broken[conf] += (new.final_miou - new.miou(a)) > 1.0
    assert broken[0.9] < broken[0.0]


def test_a_cost_budget_is_certified_on_the_mean_cost():
    scores, tp, pc, lc = draw(np.random.default_rng(4), 200)
    cache = cache_of(tp, pc, lc)
    res = cache.search(scores, max_cost=2.5, confidence=0.9)
    assert res.figures()["cost_bound"] <= 2.5 + 1e-9
    assert res.figures()["mean_cost"] <= cache.search(scores, max_cost=2.5).figures()["mean_cost"] + 1e-9


def test_small_calibration_set_says_how_many_images_would_certify():
    scores, tp, pc, lc = draw(np.random.default_rng(5), 60)
    cache = cache_of(tp, pc, lc)
    pol = build_policy("maxprob")
    pol.cache_scores = lambda c: scores  # the drawn scores stand for the policy's
    notes = []
    rep = _fit_on_cache(pol, cache, Budget.max_drop(1.0), None, {}, notes, None)
    assert rep.point is not None and rep.point["speedup"] > rep.figures["speedup"]
    note = " ".join(notes)
    assert "60 calibration images certify" in note and "would certify" in note


def test_merge_and_subset_keep_every_images_counts():
    scores, tp, pc, lc = draw(np.random.default_rng(6), 40)
    cache = cache_of(tp, pc, lc)
    parts = [cache.subset(np.arange(0, 25)), cache.subset(np.arange(25, 40))]
    merged = ExitCache.merge(parts)
    a = cache.assign(scores, [0.8, 0.8, 0.8])
    assert merged.miou(a) == pytest.approx(cache.miou(a)) and merged.num_images == 40


def test_parse_confidence():
    assert parse_confidence("0.95") == pytest.approx(0.95) and parse_confidence("80%") == pytest.approx(0.8)
    assert parse_confidence("0") == 0.0
    for bad in ("1", "1.5", "-0.1", "sure", "nan"):
        with pytest.raises(ConfigError, match="--confidence"):
            parse_confidence(bad)


def _images_only(root: Path, n: int = 24, size: int = 64) -> None:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.uniform(0, 1, (size, size, 3)) * 255).astype(np.uint8)
        img[: size // 2] //= 3  # some structure: a dark half
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")


def test_label_free_calibration_from_the_cli(tmp_path):
    bundle = tmp_path / "unet.mex"
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(bundle))
    _images_only(tmp_path / "frames")
    spec = f"folder:{tmp_path / 'frames'}?classes=4"
    res = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", spec, "--split", "all", "--policy", "maxprob",
                                   "--max-disagree", "5%", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert not out["labelled"] and out["budget"] == {"kind": "max_disagree", "value": 0.05, "text": "max-disagree 5%", "confidence": 0.9}
    assert out["figures"]["disagreement_bound"] <= 0.05 + 1e-9 and out["figures"]["disagreement"] <= out["figures"]["disagreement_bound"]
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    assert cfg["policy"]["budget"]["kind"] == "max_disagree" and cfg["policy"]["monitor"]["images"] == 24
    bad = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", spec, "--max-disagree", "5%", "--max-drop", "1"])
    assert bad.exit_code != 0 and "--max-drop and --max-disagree" in " ".join(bad.output.split())

