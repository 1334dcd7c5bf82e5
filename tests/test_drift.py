"""Watching for drift: calibration's record, the runtime's stream statistics, the tests between them, `mexify predict`."""
import json
import math
import re
import shutil
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import mexify
from mexify.bundle import read_config, update_bundle
from mexify.cli import app
from mexify.errors import ConfigError
from mexify.policies import build_policy, policy_from_dict
from mexify.runtime import EarlyExitRuntime, StreamMonitor, drift_report, expected_stream
from mexify.runtime.graphs import GraphCaptureError

FIXTURES = Path(__file__).parent / "fixture_models.py"
NAMES = ["e0", "e1", "final"]


# ------------------------------------------------------------------------------------ calibration's record
def test_expected_stream_rates_and_confidence_over_the_images_that_reach_each_exit():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.4], [0.1, 0.5], [0.4, 0.9]])
    assignment = np.array([0, 0, 1, 2, 2, 1])
    rec = expected_stream(NAMES, scores, assignment)
    assert rec["images"] == 6
    assert rec["exit_rates"] == {"e0": 2 / 6, "e1": 2 / 6, "final": 2 / 6}
    c0, c1 = rec["confidence"]["e0"], rec["confidence"]["e1"]
    assert c0["reached"] == 6 and c1["reached"] == 4  # every image is scored at e0; e1 sees the four that stayed
    assert c0["mean"] == pytest.approx(np.mean(scores[:, 0]), abs=1e-15)
    assert c0["std"] == pytest.approx(np.std(scores[:, 0], ddof=1), abs=1e-15)
    assert c1["mean"] == pytest.approx((0.7 + 0.4 + 0.5 + 0.9) / 4, abs=1e-15)
    assert c1["std"] == pytest.approx(np.std([0.7, 0.4, 0.5, 0.9], ddof=1), abs=1e-15)
    assert yaml.safe_load(yaml.safe_dump(rec)) == rec  # plain YAML


def test_expected_stream_skips_switched_off_and_unreached_exits():
    scores = np.array([[0.9, 0.1], [0.8, np.nan], [0.7, 0.2]])
    rec = expected_stream(NAMES, scores, np.array([0, 0, 0]), thresholds=[0.5, math.inf])
    assert rec["exit_rates"] == {"e0": 1.0, "e1": 0.0, "final": 0.0}
    assert list(rec["confidence"]) == ["e0"]  # e1 is off (and nobody reached it)
    rec = expected_stream(NAMES, scores, np.array([1, 1, 2]))
    assert rec["confidence"]["e1"]["reached"] == 2  # the NaN score is not counted
    with pytest.raises(ConfigError, match="expected_stream needs"):
        expected_stream(NAMES, scores[:, :1], np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="exit indices"):
        expected_stream(NAMES, scores, np.array([0, 1, 3]))


def test_policy_round_trips_its_monitor_record():
    pol = build_policy("maxprob").with_thresholds([0.5, math.inf])
    pol.exit_names = list(NAMES)
    assert pol.monitor is None and "monitor" not in pol.to_dict()
    pol.monitor = expected_stream(NAMES, np.array([[0.9, 0.1], [0.2, 0.4]]), np.array([0, 2]), pol.thresholds)
    d = yaml.safe_load(yaml.safe_dump(pol.to_dict()))
    assert d["monitor"] == pol.monitor
    back = policy_from_dict(d)
    assert back.monitor == pol.monitor and back.thresholds == pol.thresholds
    del d["monitor"]
    assert policy_from_dict(d).monitor is None  # bundles calibrated before the record load as before
    with pytest.raises(ConfigError, match="monitor"):
        policy_from_dict({**d, "monitor": [1, 2]})


# ------------------------------------------------------------------------------------ the stream
def test_monitor_statistics_equal_numpy():
    rng = np.random.default_rng(0)
    mon = StreamMonitor(NAMES)
    exits, rows = [], []
    for n in (1, 5, 40, 100):  # both the Python and the numpy summing paths
        e = rng.integers(0, 3, n)
        conf = rng.random((n, 2))
        conf[e < 1, 1] = np.nan  # images that left at e0 are never scored at e1
        mon.update(torch.as_tensor(e), conf)
        exits.append(e)
        rows.append(conf)
    e, conf = np.concatenate(exits), np.concatenate(rows)
    s = mon.snapshot()
    assert s.images == len(e) == mon.images
    assert s.exit_counts == {name: int((e == i).sum()) for i, name in enumerate(NAMES)}
    assert s.exit_rates["e1"] == pytest.approx((e == 1).mean(), abs=1e-15)
    for i, name in enumerate(NAMES[:-1]):
        col = conf[np.isfinite(conf[:, i]), i]
        assert s.confidence[name]["reached"] == len(col)
        assert s.confidence[name]["mean"] == pytest.approx(col.mean(), abs=1e-12)
        assert s.confidence[name]["std"] == pytest.approx(col.std(ddof=1), abs=1e-12)
    assert s.mean_confidence == {k: v["mean"] for k, v in s.confidence.items()}
    with pytest.raises(ConfigError, match="rows of confidences"):
        mon.update([0, 1], np.zeros((3, 2)))
    mon.reset()
    assert mon.images == 0 and mon.snapshot().confidence == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_monitor_sums_on_the_device():
    mon, host = StreamMonitor(NAMES), StreamMonitor(NAMES)
    c = torch.rand(50, dtype=torch.float32)
    with torch.inference_mode():
        mon.observe(0, c.cuda())
    mon.observe(0, c[:3].cuda())  # outside inference mode too
    host.observe(0, torch.cat([c, c[:3]]))
    for k in ("mean", "std", "reached"):
        assert mon.snapshot().confidence["e0"][k] == pytest.approx(host.snapshot().confidence["e0"][k], abs=1e-9)


# ------------------------------------------------------------------------------------ the tests
def _draw(rng, n, shift=0.0):
    """A stream of ``n`` images: confidence at e0 ~ N(0.6 + shift, 0.1), leave at e0 when >= 0.6, and at e1 when >= 0.5."""
    scores = np.stack([rng.normal(0.6 + shift, 0.1, n), rng.normal(0.5 + shift, 0.1, n)], 1)
    assignment = np.where(scores[:, 0] >= 0.6, 0, np.where(scores[:, 1] >= 0.5, 1, 2))
    return scores, assignment


def _stream(scores, assignment):
    mon = StreamMonitor(NAMES)
    seen = scores.copy()
    seen[assignment < 1, 1] = np.nan  # what the runtime computes: e1 only for the images that reached it
    mon.update(assignment, seen)
    return mon.snapshot()


def test_a_shifted_stream_warns_and_one_drawn_like_calibration_does_not():
    expected = expected_stream(NAMES, *_draw(np.random.default_rng(1), 1000))
    same = drift_report(_stream(*_draw(np.random.default_rng(2), 2000)), expected)
    assert same.warnings == [] and not same.drifted and len(same.tests) == 4
    assert same.critical_z == pytest.approx(NormalDist().inv_cdf(1 - 0.01 / (2 * 4)))  # Bonferroni over 4 tests
    harder = drift_report(_stream(*_draw(np.random.default_rng(3), 300, shift=-0.1)), expected)
    assert harder.drifted
    rate = next(w for w in harder.warnings if w.startswith("exit e0: "))
    want = round(100 * expected["exit_rates"]["e0"])
    assert re.match(rf"exit e0: \d+% of images left here, calibration expects {want}% \(z=-\d+\.\d\): new images", rate)
    assert "budget may not hold" in rate and "recalibrate on recent images" in rate
    assert any("mean confidence" in w for w in harder.warnings)
    assert {t.kind for t in harder.tests if t.drifted} == {"exit rate", "confidence"}
    assert json.loads(json.dumps(harder.to_dict()))["warnings"] == harder.warnings


def test_false_warnings_stay_rare_on_streams_drawn_like_calibration():
    expected = expected_stream(NAMES, *_draw(np.random.default_rng(0), 500))
    flagged = sum(drift_report(_stream(*_draw(np.random.default_rng(100 + k), 200)), expected, alpha=0.05).drifted
                  for k in range(200))
    assert flagged <= 20  # about alpha (0.05) of the streams, at most, with the Bonferroni correction


def test_too_few_images_say_nothing():
    expected = {"images": 500, "exit_rates": {"e0": 0.9, "e1": 0.0, "final": 0.1}, "confidence": {}}
    few = drift_report(_stream(np.zeros((29, 2)), np.full(29, 2)), expected)
    assert few.warnings == [] and few.tests == [] and "from 30" in few.note
    enough = drift_report(_stream(np.zeros((30, 2)), np.full(30, 2)), expected)
    assert [w.split(":")[0] for w in enough.warnings] == ["exit e0"] and "0% of images left here, calibration expects 90%" in enough.warnings[0]
    with pytest.raises(ConfigError, match="malformed"):
        drift_report(_stream(np.zeros((30, 2)), np.full(30, 2)), {"images": 10, "exit_rates": {"e0": "x"}})
    with pytest.raises(ConfigError, match="alpha"):
        drift_report(_stream(np.zeros((30, 2)), np.full(30, 2)), expected, alpha=1.5)


def test_a_nan_confidence_in_the_stream_tests_the_rates_only():
    expected = expected_stream(NAMES, *_draw(np.random.default_rng(1), 200))
    mon = StreamMonitor(NAMES)
    mon.update(np.zeros(40, dtype=int), np.stack([np.r_[np.nan, np.full(39, 0.7)], np.full(40, np.nan)], 1))
    mon.observe(0, torch.tensor([math.nan]))  # a policy that scored NaN (NaN logits)
    report = drift_report(mon.snapshot(), expected)
    assert math.isnan(mon.snapshot().confidence["e0"]["mean"])
    assert [t.kind for t in report.tests] == ["exit rate", "exit rate"]


# ------------------------------------------------------------------------------------ through the runtime
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """TinyUNet at 64x64 with 3 early exits (4 in all)."""
    out = tmp_path_factory.mktemp("drift") / "tiny.mex"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(out))
    return out


@pytest.fixture(scope="module")
def model(bundle):
    return mexify.load(bundle)


def _images(n, seed, lo=0.2, hi=4.0):
    """Random images, each at a contrast drawn from [lo, hi] (the random heads' confidence follows it)."""
    g = torch.Generator().manual_seed(seed)
    scale = lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)
    return torch.randn(n, 3, 64, 64, generator=g) * scale


def _calibrated(model, x):
    """maxprob with thresholds at the calibration images' medians (exit 1 off) and their record, as calibrate makes it."""
    pol = build_policy("maxprob")
    with torch.no_grad():
        native = model.forward_all(x, upsample=False)
    scores = np.stack([pol.scores(i, z).double().numpy() for i, z in enumerate(native[:-1])], 1)
    th = [float(np.median(scores[:, 0])), math.inf, float(np.median(scores[:, 2]))]
    leave = scores >= np.array(th)
    assignment = np.where(leave.any(1), leave.argmax(1), len(th))
    pol = pol.with_thresholds(th)
    pol.exit_names = list(model.exit_names)
    pol.monitor = expected_stream(model.exit_names, scores, assignment, th)
    return pol, scores, assignment


def test_runtime_stream_matches_its_results(model):
    pol, _, _ = _calibrated(model, _images(64, 1))
    rt = EarlyExitRuntime(model, pol)
    x = _images(40, 5)
    exits, conf_e0 = [], []
    for batch in x.split(8):
        res = rt.predict_batch(batch)
        exits.append(res.exit_index)
        conf_e0.append(pol.scores(0, model.forward_all(batch, upsample=False)[0]))
    exits, conf_e0 = torch.cat(exits), torch.cat(conf_e0)
    stats = rt.stats()
    names = model.exit_names
    assert stats.images == 40 and rt.stream.images == 40
    assert stats.exit_counts == {n: int((exits == i).sum()) for i, n in enumerate(names)}
    assert stats.exit_rates == {n: int((exits == i).sum()) / 40 for i, n in enumerate(names)}
    assert 0 < stats.exit_counts[names[0]] < 40  # the thresholds split the stream
    assert names[1] not in stats.confidence  # switched off: never scored
    assert stats.confidence[names[0]]["reached"] == 40
    assert stats.confidence[names[2]]["reached"] == int((exits >= 2).sum())
    assert stats.confidence[names[0]]["mean"] == pytest.approx(float(conf_e0.double().mean()), abs=1e-6)
    rt.reset_stats()
    assert rt.stats().images == 0


def test_a_batch_rerun_eagerly_is_counted_once(model, monkeypatch):
    pol, _, _ = _calibrated(model, _images(64, 1))
    rt = EarlyExitRuntime(model, pol)
    x = _images(6, 5)

    def fails_midway(x, seen):
        seen.append((0, torch.ones(int(x.shape[0]))))  # a stage captured, then the next one cannot be
        raise GraphCaptureError("a host sync inside")

    monkeypatch.setattr(rt, "_graphs", object())
    monkeypatch.setattr(rt, "_run_graphed", fails_midway)
    rt.predict_batch(x)
    ref = EarlyExitRuntime(model, pol)
    ref.predict_batch(x)
    assert rt.stats() == ref.stats()


def test_runtime_drift_against_the_policy_record(model):
    pol, _, _ = _calibrated(model, _images(300, 1))
    rt = EarlyExitRuntime(model, pol)
    assert rt.drift().warnings == [] and "from 30" in rt.drift().note  # nothing seen yet
    for batch in _images(300, 2).split(50):  # drawn like the calibration images
        rt.predict_batch(batch)
    alike = rt.drift()
    assert alike.images == 300 and alike.tests and alike.warnings == []
    rt.reset_stats()
    for batch in _images(100, 3, lo=0.05, hi=0.5).split(50):  # low-contrast images: the heads score them otherwise
        rt.predict_batch(batch)
    assert rt.drift().drifted
    assert any(w.startswith(f"exit {model.exit_names[0]}: ") for w in rt.drift().warnings)
    assert EarlyExitRuntime(model, exit=0).drift() is None  # a forced exit has no record
    bare = pol.with_thresholds(pol.thresholds)
    bare.monitor = None
    assert EarlyExitRuntime(model, bare).drift() is None


# ------------------------------------------------------------------------------------ mexify predict
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.RandomState(0)
    for i in range(32):
        Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return d


def _with_policy(bundle, tmp_path, policy):
    out = tmp_path / "b.mex"
    shutil.copytree(bundle, out)
    update_bundle(out, policy=policy)
    return out


def test_predict_warns_when_the_images_drift(bundle, photos, tmp_path):
    names = read_config(bundle).exit_names
    pol = build_policy("maxprob").with_thresholds([2.0, math.inf, math.inf])  # nothing can leave early
    pol.exit_names = list(names)
    pol.monitor = {"images": 500, "exit_rates": {**{n: 0.0 for n in names}, names[0]: 0.9, names[-1]: 0.1}, "confidence": {}}
    shifted = _with_policy(bundle, tmp_path, pol.to_dict())
    res = CliRunner().invoke(app, ["predict", str(shifted), str(photos), "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if "calibration expects" in line]
    pooled = 0.9 * 500 / (500 + 32)
    z = -0.9 / math.sqrt(pooled * (1 - pooled) * (1 / 32 + 1 / 500))  # the two-proportion z
    assert lines == [f"warning: exit {names[0]}: 0% of images left here, calibration expects 90% (z={z:.1f}): new images may not "
                     "look like the calibration images, and the budget may not hold; recalibrate on recent images"]
    drift = json.loads(res.stdout)["drift"]
    assert drift["compared"] and drift["stats"]["images"] == 32 and drift["stats"]["exit_rates"][names[-1]] == 1.0
    assert drift["warnings"] == [lines[0][len("warning: "):]]
    res = CliRunner().invoke(app, ["predict", str(shifted), str(photos), "-o", str(tmp_path / "t")])
    assert res.exit_code == 0 and "calibration expects 90%" in res.stderr and "calibration expects" not in res.stdout


def test_predict_without_a_record_or_with_a_damaged_one(bundle, photos, tmp_path):
    names = read_config(bundle).exit_names
    pol = build_policy("maxprob").with_thresholds([2.0, math.inf, math.inf])
    pol.exit_names = list(names)
    plain = _with_policy(bundle, tmp_path, pol.to_dict())
    res = CliRunner().invoke(app, ["predict", str(plain), str(photos), "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    drift = json.loads(res.stdout)["drift"]
    assert drift["compared"] is False and drift["warnings"] == [] and drift["stats"]["images"] == 32
    assert "warning" not in res.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    damaged = _with_policy(bundle, damaged, {**pol.to_dict(), "monitor": {"images": "many"}})
    res = CliRunner().invoke(app, ["predict", str(damaged), str(photos), "-o", str(tmp_path / "d"), "--json"])
    assert res.exit_code == 0, res.output  # the predictions are written; the check is skipped with a warning
    assert "drift not checked" in res.stderr and json.loads(res.stdout)["drift"]["compared"] is False
    res = CliRunner().invoke(app, ["predict", str(plain), str(photos), "-o", str(tmp_path / "f"), "--exit", "0", "--json"])
    assert json.loads(res.stdout)["drift"] is None  # a forced exit is no policy to watch


@pytest.mark.slow  # an ONNX export: about 20 s on 2 cores
def test_predict_with_onnxruntime_compares_the_exit_mix(bundle, photos, tmp_path):
    pytest.importorskip("onnxruntime")
    names = read_config(bundle).exit_names
    pol = build_policy("maxprob").with_thresholds([2.0, math.inf, math.inf])
    pol.exit_names = list(names)
    pol.monitor = {"images": 500, "exit_rates": {**{n: 0.0 for n in names}, names[0]: 0.9, names[-1]: 0.1},
                   "confidence": {names[0]: {"mean": 0.9, "std": 0.01, "reached": 500}}}
    onnx = tmp_path / "b.onnx.mex"
    mexify.api.export(_with_policy(bundle, tmp_path, pol.to_dict()), out=str(onnx), format="onnx")
    res = CliRunner().invoke(app, ["predict", str(onnx), str(photos), "-o", str(tmp_path / "o"), "--engine", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    drift = json.loads(res.stdout)["drift"]
    assert [t["kind"] for t in drift["tests"]] == ["exit rate"]  # the runner reports no confidence at the exits it passed
    assert drift["warnings"] and f"exit {names[0]}: 0% of images left here" in res.stderr
