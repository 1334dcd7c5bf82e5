"""`mexify predict` and `mexify bench` on a tiny bundle: files written, clean errors, JSON output."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mexify
from mexify.bundle import update_bundle
from mexify.cli import app
from mexify.policies import build_policy
from mexify.api import bench

FIXTURES = Path(__file__).parent / "fixture_models.py"
SCENES = "synthetic:scenes?size=64&classes=4&n=16&n_eval=8"




@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A converted TinyUNet bundle without a policy."""
    out = tmp_path_factory.mktemp("pb") / "plain.mex"
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(out))
    return out


@pytest.fixture(scope="module")
def calibrated(plain, tmp_path_factory):
    """The same bundle with a maxprob policy that lets about half the images leave at exit 0."""
    out = tmp_path_factory.mktemp("pb") / "calibrated.mex"
    shutil.copytree(plain, out)
    model = mexify.load(out)
    from mexify.data import build_dataset

    ds = build_dataset(SCENES, split="val")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        s0 = build_policy("maxprob").scores(0, model.forward_all(x)[0])
    pol = build_policy("maxprob").with_thresholds([float(s0.median()), float("inf"), float("inf")])
    pol.exit_names = list(model.exit_names)
    update_bundle(out, policy=pol.to_dict())
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.RandomState(0)
    sub = d / "more"
    sub.mkdir()
    Image.fromarray(rng.randint(0, 255, (48, 80, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(sub / "b.jpg")
    Image.fromarray(rng.randint(0, 255, (30, 20, 3), dtype=np.uint8)).save(sub / "a.png")  # same stem as a.png
    (sub / "notes.txt").write_text("not an image, ignored in a directory")
    return d


def test_predict_writes_palette_pngs_and_jsonl(calibrated, images, tmp_path):
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", str(calibrated), str(images / "a.png"), str(images / "more"), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["images"] == 3
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["a.png", "a.png", "b.jpg"]
    assert [r["mask"] for r in lines] == ["a.png", "a-1.png", "b.png"]
    model = mexify.load(calibrated)
    for r in lines:
        assert set(r) >= {"file", "exit", "exit_name", "confidence", "flops"}
        assert r["exit_name"] == model.exit_names[r["exit"]]
        assert r["flops"] > 0 and 0.0 <= r["confidence"] <= 1.0
        with Image.open(out / r["mask"]) as m, Image.open(r["file"]) as src:
            assert m.mode == "P" and m.size == src.size  # original image size
            assert np.asarray(m).max() < model.num_classes
    assert sum(summary["exit_counts"].values()) == 3
    res = CliRunner().invoke(app, ["predict", str(calibrated), str(images / "a.png"), "-o", str(tmp_path / "table")])
    assert res.exit_code == 0, res.output
    assert "final" in res.stdout


def test_predict_matches_runtime_on_model_sized_image(calibrated, tmp_path):
    """A 64x64 image goes through unchanged in size: the PNG is the runtime's mask."""
    from mexify.tools.images import to_tensor
    from mexify.runtime import predict

    img = Image.fromarray(np.random.RandomState(3).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    img.save(tmp_path / "x.png")
    res = CliRunner().invoke(app, ["predict", str(calibrated), str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    model = mexify.load(calibrated)
    want = predict(model, to_tensor(img, (64, 64))[None])[0]
    got = np.asarray(Image.open(tmp_path / "o" / "x.png"))
    assert np.array_equal(got, want.mask.numpy())
    rec = json.loads((tmp_path / "o" / "predictions.jsonl").read_text())
    assert rec["exit"] == want.exit_index


def test_predict_bad_image_errors_cleanly(calibrated, images, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as exc:
        app(["predict", str(calibrated), str(images / "a.png"), str(bad), "-o", str(tmp_path / "o")], prog_name="mexify")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    res = CliRunner().invoke(app, ["predict", str(calibrated), str(images / "a.png"), str(bad), "-o", str(tmp_path / "o2"), "--skip-bad", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 1
    with pytest.raises(SystemExit) as exc:
        app(["predict", str(calibrated), str(tmp_path / "missing.png"), "-o", str(tmp_path / "o3")], prog_name="mexify")
    assert exc.value.code == 1


def test_predict_without_policy_warns_and_uses_final_exit(plain, images, tmp_path):
    res = CliRunner().invoke(app, ["predict", str(plain), str(images / "more"), "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    assert "no exit policy" in res.stderr
    lines = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert {r["exit_name"] for r in lines} == {"final"}
    res = CliRunner().invoke(app, ["predict", str(plain), str(images / "more"), "-o", str(tmp_path / "f"), "--exit", "0", "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "f" / "predictions.jsonl").read_text().splitlines()]
    assert {r["exit"] for r in lines} == {0}


def test_bench_cli_json(calibrated):
    res = CliRunner().invoke(
        app, ["bench", str(calibrated), "--data", SCENES, "--limit", "6", "--batch-size", "2", "--warmup", "1", "--repeats", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    model = mexify.load(calibrated)
    assert [r["name"] for r in rep["exits"]] == model.exit_names
    assert [r["flops"] for r in rep["exits"]] == [model.cost_to_exit(i) for i in range(model.num_exits)]
    assert all(r["latency_ms"] > 0 for r in rep["exits"])
    # the time to reach an exit is its stages plus every early head on the way
    for i, r in enumerate(rep["exits"]):
        on_the_way = rep["exits"][: i + 1]
        assert r["latency_ms"] == pytest.approx(sum(x["stage_ms"] for x in on_the_way) + sum(x["head_ms"] for x in on_the_way))
        assert r["stage_ms"] > 0 and (r["head_ms"] > 0) == (i < model.num_exits - 1)
    assert rep["original"]["latency_ms"] > 0 and "rebuilt" in rep["original"]["note"]
    p = rep["policy"]
    assert p["images"] == 6 and p["measured_speedup"] > 0
    assert abs(sum(p["exit_rates"].values()) - 1) < 1e-9
    assert 0 < p["exit_rates"][model.exit_names[0]] < 1
    assert p["flops_speedup"] == pytest.approx(model.original_flops / p["mean_flops"])
    assert "miou" in p and "final_miou" in p
    # like with like: the predicted speed-up is the timed cost of the observed exit mix
    thr = model.config.policy["thresholds"]
    active = [thr[n] is not None for n in model.exit_names[:-1]] + [True]
    graphs = rep["mode"] == "graphs"  # graphs make every row's masks at each active exit; eager, at the exit taken
    per_exit, total = [], 0.0
    for i, r in enumerate(rep["exits"]):
        early = i < model.num_exits - 1
        total += r["stage_ms"] + ((r["head_ms"] + r["policy_ms"] + (r["mask_ms"] if graphs else 0)) if early and active[i] else 0.0)
        per_exit.append(total + (r["mask_ms"] if not graphs or not early else 0.0))
    assert all(r["mask_ms"] > 0 for r in rep["exits"])
    mean = sum(p["exit_rates"][n] * per_exit[i] for i, n in enumerate(model.exit_names))
    base = sum(r["stage_ms"] for r in rep["exits"]) + rep["exits"][-1]["mask_ms"]  # every exit off
    assert p["predicted_speedup"] == pytest.approx(base / mean)
    assert rep["mode"] == ("graphs" if torch.cuda.is_available() else "eager") and rep["dtype"] == "float32"
    assert {"ms_per_image", "original_ms_per_image", "drop", "measured_speedup", "flops_speedup"} <= set(p)
    # one table: every exit row carries its own mIoU and the policy's exit rate
    assert sum(r["exit_rate"] for r in rep["exits"]) == pytest.approx(1.0)
    assert rep["exits"][-1]["miou"] == pytest.approx(p["final_miou"])
    res = CliRunner().invoke(app, ["bench", str(calibrated), "--data", SCENES, "--limit", "2", "--warmup", "0", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "policy maxprob" in res.stdout and "exit rate" in res.stdout and "speed-up" in res.stdout


def test_bench_without_policy_measures_exits_only(plain):
    model = mexify.load(plain)
    rep = bench(model, SCENES, limit=2, warmup=0, repeats=1)
    assert rep.policy is None and any("no exit policy" in n for n in rep.notes)
    assert len(rep.exits) == model.num_exits


def test_original_model_gets_the_bundle_weights(calibrated):
    from mexify.tools import original_model

    model = mexify.load(calibrated)
    with torch.no_grad():
        for p in model.stages.parameters():
            p.add_(0.01 * torch.randn_like(p))
    orig, note = original_model(model)
    assert orig is not model and "rebuilt" in note
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(orig(x), model(x), atol=1e-5)
