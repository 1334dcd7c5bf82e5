"""One definition each (docs/internals.md, "Definitions"): exit FLOPs; mIoU in points, NaN without labelled pixels;
masks made at the input size, then resized to the labels."""
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "policies"))
from toy_models import NoisyExits, make_scenes  # noqa: E402

import mexify  # noqa: E402
from mexify.calibrate import collect_cache  # noqa: E402
from mexify.data import as_loader  # noqa: E402
from mexify.metrics import ConfusionMatrix, miou_from_counts, per_image_miou  # noqa: E402
from mexify.nn import exit_flops  # noqa: E402
from mexify.policies import build_policy  # noqa: E402
from mexify.runtime import FixedExit  # noqa: E402
from mexify.tools import evaluate, evaluate_policy  # noqa: E402

FIXTURES = Path(__file__).parent / "fixture_models.py"


def test_exit_flops_counts_stages_and_the_heads_that_run():
    stages, heads = [10, 20, 30, 40], [1, 2, 3]
    assert exit_flops(stages, heads) == [11, 33, 66, 106]  # every head on the way
    assert exit_flops(stages, heads, active=[0, 2]) == [11, 31, 64, 104]  # head 1 switched off costs nothing
    assert exit_flops(stages, heads, active=[]) == [10, 30, 60, 100]  # every exit off: the stages alone
    assert all(isinstance(v, int) for v in exit_flops(stages, heads))
    assert exit_flops([1.5, 2.5], [0.5]) == [2.0, 4.5]


def test_the_cache_costs_exits_by_exit_flops():
    model = NoisyExits(num_classes=4, num_exits=4)
    model.head_flops = [5, 7, 11]
    cache = collect_cache(model, torch.utils.data.DataLoader(make_scenes(4), batch_size=4))
    assert cache.exit_costs(None, "flops").tolist() == exit_flops(model.stage_flops, model.head_flops)
    assert cache.exit_costs([0.5, np.inf, 0.5], "flops").tolist() == exit_flops(model.stage_flops, model.head_flops, [0, 2])


def test_miou_is_in_points_and_nan_without_a_labelled_pixel():
    assert miou_from_counts([3, 0, 1], [4, 0, 1], [3, 0, 2]) == pytest.approx(100 * (3 / 4 + 1 / 2) / 2)
    assert math.isnan(miou_from_counts([0, 0], [0, 0], [0, 0]))
    rows = miou_from_counts(np.array([[1, 1], [0, 0]]), np.array([[1, 1], [0, 0]]), np.array([[1, 1], [0, 0]]))
    assert rows[0] == 100.0 and math.isnan(rows[1])


def test_an_image_without_labels_is_nan_everywhere_and_weighs_on_nothing():
    """The metrics, the exit cache, the oracle and the learned policy apply one rule to an unlabelled image."""
    model = NoisyExits(num_classes=4, num_exits=4)
    data = make_scenes(12)
    data[2] = (data[2][0], torch.full_like(data[2][1], 255))
    cache = collect_cache(model, torch.utils.data.DataLoader(data, batch_size=6))
    pim = cache.per_image_miou()
    assert np.isnan(pim[2]).all() and not np.isnan(np.delete(pim, 2, 0)).any()
    x, y = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
    for e, logits in enumerate(model.forward_all(x)):
        pred = logits.argmax(1)
        np.testing.assert_allclose(pim[:, e], per_image_miou(pred, y, 4).numpy(), rtol=1e-6, equal_nan=True)
        assert cache.exit_miou(e) == pytest.approx(ConfusionMatrix(4).update(pred, y).miou(), abs=1e-9)
    assert cache.oracle_assignment(0.0)[2] == 0  # leaving early costs it nothing
    pol = build_policy("learned").fit(cache, max_drop=1.0)  # left out of the training set, not counted as bad
    assert np.isfinite(pol.cache_scores(cache)).all()


def test_evaluation_scores_the_masks_predict_gives_whatever_the_label_size(tmp_path):
    """Labels at another size than the input: every exit's row, the runtime's and the cache's mIoU agree."""
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(tmp_path / "b.mex"))
    model = mexify.load(tmp_path / "b.mex")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights: masks with several classes, whose borders the two resizes place apart
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    data = [(torch.randn(3, 32, 32, generator=g), torch.randint(0, 4, (48, 40), generator=g)) for _ in range(4)]
    report = evaluate(model, data, batch_size=2, num_workers=0, device="cpu")
    cache = collect_cache(model, as_loader(data, 2))
    for e, row in enumerate(report.exits):
        assert evaluate_policy(model, FixedExit(e, model.num_exits), data, batch_size=2).miou == row.miou
        assert cache.exit_miou(e) == pytest.approx(row.miou, abs=1e-9)


def test_time_calls_is_the_median_of_rounds_that_run_every_call_in_turn():
    from mexify.tools.timing import time_call, time_calls, timed_pass

    order = []
    waits = {"a": iter([0.0, 0.0, 0.03, 0.0, 0.0, 0.0]), "b": iter([0.0] * 6)}

    def call(name):
        def run():
            order.append(name)
            time.sleep(next(waits[name]))
        return run

    s = time_calls({"a": call("a"), "b": call("b")}, "cpu", warmup=1, repeats=5)
    assert order == ["a", "b"] * 6  # one warm-up round, then rounds of every call in turn
    assert s["a"] < 0.02  # the median: one slow round does not move it
    assert time_call(lambda: None, "cpu", warmup=0, repeats=1) >= 0.0
    keep = []
    batches = [(torch.ones(1), None), (torch.zeros(2), None)]
    timed_pass(lambda x: x.sum(), batches, "cpu", keep)()
    assert [float(v) for v in keep] == [1.0, 0.0]


def test_every_measured_speedup_is_against_the_original_model_and_exits_off_is_its_own_figure(tmp_path):
    from mexify.data import build_dataset
    from mexify.tools import bench
    from mexify.tools.engines import time_policies

    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(tmp_path / "b.mex"))
    model = mexify.load(tmp_path / "b.mex")
    data = build_dataset("synthetic:scenes?size=32&classes=4&n=8&n_eval=4", split="val")
    pol = build_policy("maxprob").with_thresholds([0.0, 0.0])  # every image leaves at the first exit
    p = bench(model, data, policy=pol, limit=4, warmup=0, repeats=1, device="cpu").policy
    assert p["measured_speedup"] == pytest.approx(p["original_ms_per_image"] / p["ms_per_image"])
    assert p["exits_off_overhead"] == pytest.approx(p["exits_off_ms_per_image"] / p["original_ms_per_image"] - 1.0)
    notes = []
    ms = time_policies(model, data, {"maxprob": pol}, limit=4, repeats=1, notes=notes)
    assert set(ms) == {"original", "exits_off", "maxprob"} and all(v > 0 for v in ms.values())
    assert notes == ["original: original model rebuilt from the bundle's spec, run as the runtime runs (eager, float32)"]


def test_the_original_runs_without_autograd_wherever_it_is_called(tmp_path, monkeypatch):
    import importlib

    from mexify.runtime import EarlyExitRuntime
    from mexify.tools import original_runner

    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(tmp_path / "b.mex"))
    model = mexify.load(tmp_path / "b.mex")
    grad = []
    monkeypatch.setattr(importlib.import_module("mexify.tools.benchmark"), "adapt_output", lambda out: grad.append(torch.is_grad_enabled()) or out)
    run, _ = original_runner(model, EarlyExitRuntime(model, exit=-1))
    with torch.enable_grad():
        assert run(torch.randn(2, 3, 32, 32)).shape == (2, 32, 32)
    assert grad == [False]  # as the runtime runs: compare and the engine comparison time it outside no_grad

