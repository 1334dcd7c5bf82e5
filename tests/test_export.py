"""`mexify export`: pt2 programs that load without the model's code, ONNX graphs run by onnxruntime
without torch, and the two engines agreeing with the torch runtime."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mexify
from mexify.bundle import update_bundle
from mexify.cli import app
from mexify.data import build_dataset
from mexify.errors import BundleError
from mexify.policies import build_policy
from mexify.runtime import EarlyExitRuntime
from mexify.tools.export import export_bundle

FIXTURES = Path(__file__).parent / "fixture_models.py"
SCENES = "synthetic:scenes?size=64&classes=4&n=16&n_eval=24"
ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("onnxruntime")


def _images(n=24, split="test"):
    ds = build_dataset(SCENES, split=split)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def _calibrate_by_hand(path, policy="maxprob", **options):
    """A policy whose thresholds send about a third of the images out at each of the first two exits."""
    model = mexify.load(path)
    x = _images(split="val")
    with torch.no_grad():
        outs = model.forward_all(x, upsample=False)
    p = build_policy(policy, **options).with_thresholds([0.0] * (model.num_exits - 1))
    s0, s1 = p.scores(0, outs[0]), p.scores(1, outs[1])
    th = [float(s0.quantile(0.66)), float(s1.quantile(0.5))] + [float("inf")] * (model.num_exits - 3)
    p = p.with_thresholds(th)
    p.exit_names = list(model.exit_names)
    update_bundle(path, policy=p.to_dict())


def _run(code, cwd):
    """Run ``code`` in a fresh interpreter (the repository importable, nothing else preloaded), with one
    thread as these tests run (another thread count picks other CPU kernels, with other roundings)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEXIFY_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A TinyUNet bundle (skip tensors across every cut, heads below the input resolution) with a maxprob policy."""
    out = tmp_path_factory.mktemp("ex") / "unet.mex"
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=3, out=str(out))
    model = mexify.load(out)
    with torch.no_grad():  # random heads are nearly uniform; sharpened, their confidences spread as trained ones do
        for head in model.heads.values():
            convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
            convs[-1].weight.mul_(40.0)
    update_bundle(out, model=model)
    _calibrate_by_hand(out)
    return out


@pytest.fixture(scope="module")
def unet_onnx(unet, tmp_path_factory):
    out = tmp_path_factory.mktemp("ex") / "unet.onnx.mex"
    export_bundle(unet, out, "onnx")
    return out


# ------------------------------------------------------------------------------- pt2
@pytest.mark.slow
def test_torchvision_export_loads_without_torchvision_and_equals_the_bundle(tmp_path):
    src, out = tmp_path / "lraspp.mex", tmp_path / "lraspp.pt2.mex"
    mexify.api.convert("torchvision.models.segmentation:lraspp_mobilenet_v3_large",
                       args={"num_classes": 5, "weights": None, "weights_backbone": None}, trace=mexify.api.TraceConfig((96, 96)), out=str(src))
    result = export_bundle(src, out, "pt2")
    assert result.dynamic == {"batch": True, "spatial": True}
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    _run(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        import mexify
        model = mexify.load({str(out)!r})
        x = load_file({str(tmp_path / 'x.safetensors')!r})["x"]
        with torch.no_grad():
            outs = model.forward_all(x, upsample=False)
        assert "torchvision" not in sys.modules, "loading the export imported torchvision"
        save_file({{f"e{{i}}": o.contiguous() for i, o in enumerate(outs)}}, {str(tmp_path / 'outs.safetensors')!r})
    """, tmp_path)
    got = load_file(str(tmp_path / "outs.safetensors"))
    with torch.no_grad():
        ref = mexify.load(src).forward_all(x, upsample=False)
    for i, r in enumerate(ref):
        assert torch.equal(got[f"e{i}"], r), f"exit {i} differs"


def test_pt2_export_of_a_user_file_loads_after_the_file_is_deleted_and_unpickles_nothing(tmp_path):
    code = tmp_path / "my_model.py"
    shutil.copy(FIXTURES, code)
    src, out = tmp_path / "user.mex", tmp_path / "user.pt2.mex"
    mexify.api.convert(f"{code}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=3, out=str(src))
    own = mexify.Trust(code=True)  # the user's own file, outside the suite's trusted folder
    export_bundle(src, out, "pt2", trust=own)
    x = _images(6)
    with torch.no_grad():
        ref = mexify.load(src, trust=own).forward_all(x, upsample=False)
    code.unlink()
    with pytest.raises(BundleError):
        mexify.load(src, trust=own)  # the source bundle needs the file
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    _run(f"""
        import pickle, sys, torch
        from safetensors.torch import load_file, save_file
        import mexify, mexify.bundle, mexify.nn.programs
        from torch._export.serde import serialize  # imported before the guards below
        def refuse(*a, **k):
            raise AssertionError("something was unpickled")
        def audit(event, args):  # every unpickler looks up the classes it rebuilds
            if event == "pickle.find_class":
                raise AssertionError(f"unpickling {{args}}")
        pickle.load = pickle.loads = torch.load = refuse
        sys.addaudithook(audit)
        model = mexify.load({str(out)!r})
        with torch.no_grad():
            outs = model.forward_all(load_file({str(tmp_path / 'x.safetensors')!r})["x"], upsample=False)
        save_file({{f"e{{i}}": o.contiguous() for i, o in enumerate(outs)}}, {str(tmp_path / 'outs.safetensors')!r})
    """, tmp_path)
    got = load_file(str(tmp_path / "outs.safetensors"))
    for i, r in enumerate(ref):
        assert torch.equal(got[f"e{i}"], r), f"exit {i} differs"


def test_pt2_export_runs_the_policy_with_shrinking_like_the_bundle(unet, tmp_path):
    out = tmp_path / "unet.pt2.mex"
    export_bundle(unet, out, "pt2")
    exported, source = mexify.load(out), mexify.load(unet)
    assert exported.train_issue  # inference programs: training is refused
    res = CliRunner().invoke(app, ["train", str(out), "--data", SCENES, "--set", "stage1_iters=0"])
    assert res.exit_code == 1 and "is an export" in res.output
    x = _images()
    a, b = EarlyExitRuntime(exported).predict_batch(x), EarlyExitRuntime(source).predict_batch(x)
    assert len(set(b.exit_index.tolist())) >= 2  # the policy really splits the batch
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.masks, b.masks)
    torch.testing.assert_close(a.confidence, b.confidence, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():  # any batch and spatial size
        assert torch.equal(exported(torch.ones(5, 3, 48, 80)), source(torch.ones(5, 3, 48, 80)))


def test_a_pickled_model_bundle_needs_trust_and_its_export_does_not(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(mexify.spec.build_model(mexify.spec.parse_spec(f"{FIXTURES}:TinyUNet")), path)
    src, out = tmp_path / "pickled.mex", tmp_path / "pickled.pt2.mex"
    mexify.api.convert(str(path), trace=mexify.api.TraceConfig((64, 64)), exits=2, trust=mexify.Trust(pickle=True), out=str(src))
    with pytest.raises(BundleError, match="--trust-pickle") as e:
        mexify.load(src)
    assert "mexify export" in e.value.hint
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(src), "-o", str(out)])
    assert res.exit_code == 1 and "--trust-pickle" in res.output and not out.exists()
    res = runner.invoke(app, ["export", str(src), "-o", str(out), "--trust-pickle"])
    assert res.exit_code == 0, res.output
    path.unlink()  # the export carries its programs
    x = _images(4)
    with torch.no_grad():
        assert mexify.load(out)(x).shape == (4, 4, 64, 64)
    # every command that loads a bundle takes the flag
    for cmd in ("train", "calibrate", "eval", "predict", "bench", "profile", "export"):
        assert "--trust-pickle" in runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output, cmd


def test_batch_dependent_live_values_export_and_shrink(tmp_path):
    """``b = x.shape[0]`` and ``x.shape[-2:]`` cross the cuts as shape carriers; dropping rows keeps them in step."""
    src, out = tmp_path / "bs.mex", tmp_path / "bs.pt2.mex"
    mexify.api.convert(f"{FIXTURES}:BatchSizeNet", trace=mexify.api.TraceConfig((32, 32)), exits=3, out=str(src))
    export_bundle(src, out, "pt2")
    manifest = mexify.bundle.read_config(out).export
    kinds = {k for s in manifest["stages"] for k in s["output_kinds"]}
    assert "int" in kinds  # the batch size crosses a cut
    assert "dim:1" in {d for s in manifest["stages"] for d in s["batch_dims"].values()}
    exported, source = mexify.load(out), mexify.load(src)
    x = torch.randn(5, 3, 32, 32)
    for model in (exported, source):
        state = model.start(x)
        state = model.run_stage(0, state).select(torch.tensor([0, 3]))
        for i in range(1, model.num_exits):
            state = model.run_stage(i, state)
        with torch.no_grad():
            alone = model(x[[0, 3]])
        assert torch.allclose(model.exit_logits(model.num_exits - 1, state), alone, atol=1e-5)
    # the onnxruntime runner shrinks the carriers too: same exits and masks as the torch runtime
    from mexify.deploy import Runner

    _calibrate_by_hand(src)
    export_bundle(src, tmp_path / "bs.onnx", "onnx")
    x = _images(split="val")  # the images the thresholds were set on (quantiles of their scores)
    ref = EarlyExitRuntime(mexify.load(src)).predict_batch(x)
    got = Runner(tmp_path / "bs.onnx").predict(x.numpy())
    assert len(set(ref.exit_index.tolist())) >= 2
    assert (got.exit_index == ref.exit_index.numpy()).all() and (got.masks == ref.masks.numpy()).mean() >= 0.999


# ------------------------------------------------------------------------------- bad input
def test_a_stage_that_cannot_be_exported_is_named_with_its_operation(tmp_path):
    src, out = tmp_path / "branchy.mex", tmp_path / "branchy.pt2.mex"
    mexify.api.convert(f"{FIXTURES}:BranchyNet", trace=mexify.api.TraceConfig((32, 32), leaf_modules=["DataDependentGate"]), exits=3, out=str(src))
    res = CliRunner().invoke(app, ["export", str(src), "-o", str(out)])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "stage 2" in text and "self.gate" in text and "if x.mean() > 0" in text
    assert "Traceback" not in res.output and not out.exists()


def test_an_export_from_a_newer_schema_is_refused(unet, unet_onnx, tmp_path):
    from mexify.deploy import Runner

    for src in (unet_onnx,):
        newer = tmp_path / "newer"
        shutil.copytree(src, newer)
        cfg = yaml.safe_load((newer / "config.yaml").read_text())
        cfg["export"]["schema"] = 99
        (newer / "config.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(BundleError, match="newer"):
            mexify.load(newer)
        with pytest.raises(BundleError, match="newer"):
            Runner(newer)
    with pytest.raises(BundleError, match="onnxruntime"):
        mexify.load(unet_onnx)  # an ONNX export is not a torch model


# ------------------------------------------------------------------------------- ONNX
def test_onnx_exits_match_torch_within_1e_4(unet, unet_onnx):
    from mexify.deploy import Runner

    x = _images()
    outs = Runner(unet_onnx).exit_outputs(x.numpy())
    with torch.no_grad():
        ref = mexify.load(unet).forward_all(x, upsample=False)
    assert len(outs) == len(ref)
    for o, r in zip(outs, ref):
        assert o.shape == tuple(r.shape)
        assert np.abs(o - r.numpy()).max() <= 1e-4


@pytest.mark.parametrize("policy, options", [("maxprob", {}), ("entropy", {}), ("mess", {"pixel_threshold": 0.3, "edge_weight": 0.5}),
                                             ("fft", {"band": 2})])
def test_onnxruntime_runner_agrees_with_the_torch_runtime(unet, policy, options, tmp_path):
    from mexify.deploy import Runner

    src = tmp_path / "src.mex"
    shutil.copytree(unet, src)
    _calibrate_by_hand(src, policy, **options)
    out = tmp_path / "onnx"
    export_bundle(src, out, "onnx")
    x = _images()
    ref = EarlyExitRuntime(mexify.load(src)).predict_batch(x)
    got = Runner(out).predict(x.numpy())
    assert len(set(ref.exit_index.tolist())) >= 2  # early exits really taken
    assert (got.exit_index == ref.exit_index.numpy()).mean() >= 0.99
    assert (got.masks == ref.masks.numpy()).mean() >= 0.999
    leave = ref.exit_index.numpy() < len(got.exit_names) - 1
    np.testing.assert_allclose(got.confidence[leave], ref.confidence.numpy()[leave], atol=1e-5)


def test_the_runner_imports_no_torch(unet_onnx, tmp_path):
    np.save(tmp_path / "x.npy", _images(4).numpy())
    out = _run(f"""
        import sys, numpy as np
        from mexify.deploy import Runner
        r = Runner({str(unet_onnx)!r})
        res = r.predict(np.load({str(tmp_path / 'x.npy')!r}))
        img = (np.random.RandomState(0).rand(2, 64, 64, 3) * 255).astype(np.uint8)
        assert r.normalize(img).shape == (2, 3, 64, 64)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        print(res.masks.shape, res.exit_counts())
    """, tmp_path)
    assert "(4, 64, 64)" in out


def test_runner_fixed_exit_and_bad_input(unet_onnx):
    from mexify.deploy import Runner
    from mexify.errors import ConfigError, DataError

    x = _images(4).numpy()
    res = Runner(unet_onnx, exit=1).predict(x)
    assert (res.exit_index == 1).all()
    with pytest.raises(ConfigError, match="exits 0..3"):
        Runner(unet_onnx, exit=7)
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        Runner(unet_onnx).predict(x[:, :1])


def test_predict_and_bench_with_the_onnxruntime_engine(unet, unet_onnx, tmp_path):
    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(unet_onnx), str(img_dir), "-o", str(tmp_path / "masks"), "--engine", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["images"] == 3 and len(list((tmp_path / "masks").glob("*.png"))) == 3
    res = runner.invoke(app, ["bench", str(unet_onnx), "--data", SCENES, "--split", "test", "--limit", "12", "--batch-size", "4",
                              "--repeats", "1", "--warmup", "0", "--engine", "torch", "--engine", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["engine"] for r in rows] == ["torch", "onnxruntime"]
    assert rows[1]["same_exit"] >= 0.99 and rows[1]["same_pixels"] >= 0.999
    assert sum(rows[1]["exit_counts"].values()) == 12 and rows[1]["measured_speedup"] > 0
    res = runner.invoke(app, ["predict", str(unet), str(img_dir), "-o", str(tmp_path / "m2"), "--engine", "onnxruntime"])
    assert res.exit_code == 1 and "not an ONNX export" in res.output
