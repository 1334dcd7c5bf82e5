"""Every bad value a user can type or hand us: one clear line, a non-zero exit code, nothing written.

A bad option value, an unknown option, a missing argument or a bad choice is a usage error: exit
code 2 and one line (``error: ... (see `mexify CMD --help`)``). A bad file (a damaged bundle, an
image too large to decode) is exit code 1: the red line and the dim MEXIFY_DEBUG line. In every
case: no traceback, the bundle's files unchanged and no temporary litter beside it.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mexify
from mexify import api
from mexify.cli import app

FIXTURES = Path(__file__).parent / "fixture_models.py"
UNET = f"{FIXTURES}:TinyUNet"
DATA = "synthetic:scenes?size=32&classes=4&n=8&n_eval=8"
runner = CliRunner()


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """One small bundle (TinyUNet at 32x32, 2 exits), damaged copies of it, and image files."""
    root = tmp_path_factory.mktemp("bad")
    bundle = root / "b.mex"
    mexify.convert(UNET, args={"num_classes": 4}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(bundle), check=False)
    text = (bundle / "config.yaml").read_text()
    damaged = {
        "trunc": text[: len(text) // 2] + "\n  - [unclosed\n",
        "missing": "".join(line for line in text.splitlines(True) if not line.strip().startswith("in_channels:")),
        "wrongtype": text.replace("num_classes: 4", "num_classes: four"),
        "notmapping": "- just\n- a list\n",
        "badexits": text.replace("exits:\n", "exits: 3\nold_exits:\n", 1),
    }
    for name, body in damaged.items():
        shutil.copytree(bundle, root / name)
        (root / name / "config.yaml").write_text(body)
    img = root / "images"
    img.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(img / "big.png")  # a bomb below a lowered limit
    Image.fromarray(rng.randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(img / "warn.png")  # between the limit and twice it
    return root


CUDA = torch.cuda.is_available()

# name: (args, exit code, words the one line must hold); {B} is the bundle, {R} the module's folder
USAGE = {
    # convert / inspect
    "head setting not a number": (["convert", UNET, "--head-set", "width=abc"], "width is 'abc', expected an integer"),
    "head setting not an integer": (["convert", UNET, "--head-set", "blocks=1.5"], "blocks is '1.5'"),
    "head setting without =": (["convert", UNET, "--head-set", "width"], "is not key=value"),
    "head setting out of range": (["convert", UNET, "--head-set", "dropout=2"], "dropout=2.0 is out of range"),
    "head setting unknown": (["convert", UNET, "--head-set", "widht=3"], "did you mean 'width'"),
    "head ASPP rate 0": (["convert", UNET, "--head-set", "aspp_rates=0:6"], "ASPP rates must be >= 1"),
    "head template unknown": (["convert", UNET, "--head", "unet"], "unknown head template 'unet'"),
    "head fuse not a boolean": (["convert", UNET, "--head-set", "fuse=maybe"], "fuse is 'maybe'"),
    "head space unknown": (["convert", UNET, "--heads", "nosuchspace"], "unknown head space"),
    "tracer unknown": (["convert", UNET, "--trace", "foo"], "unknown tracer 'foo'"),
    "inspect tracer unknown": (["inspect", UNET, "--trace", "foo"], "unknown tracer 'foo'"),
    "input size too large": (["convert", UNET, "--input-size", "100000x100000"], "too large"),
    "input size garbage": (["convert", UNET, "--input-size", "abc"], "is not HxW or N"),
    "input size zero": (["convert", UNET, "--input-size", "0x0"], "is not HxW or N"),
    "input size too small": (["convert", UNET, "--input-size", "16x16"], "too small"),
    "input size three parts": (["convert", UNET, "--input-size", "32x32x3"], "is not HxW or N"),
    "inspect input size garbage": (["inspect", UNET, "--input-size", "12y"], "is not HxW or N"),
    "exits 0": (["convert", UNET, "--exits", "0"], "at least 1"),
    "exits negative": (["convert", UNET, "--exits", "-1"], "at least 1"),
    "exits not a number": (["convert", UNET, "--exits", "abc"], "is not an integer"),
    "factory argument without =": (["convert", UNET, "--arg", "num_classes"], "is not key=value"),
    "factory argument bad YAML": (["convert", UNET, "--arg", "x=[1"], "not valid YAML"),
    # calibrate
    "policy option not a number": (["calibrate", "{B}", "--data", DATA, "--option", "pixel_threshold=abc"], "expected a finite number"),
    "policy option unknown": (["calibrate", "{B}", "--data", DATA, "--option", "nosuch=1"], "has no option 'nosuch'"),
    "policy option without =": (["calibrate", "{B}", "--data", DATA, "--option", "pixel_threshold"], "is not key=value"),
    "policy option out of range": (["calibrate", "{B}", "--data", DATA, "--option", "pixel_threshold=2"], "must lie in [0, 1]"),
    "policy without options": (["calibrate", "{B}", "--data", DATA, "--policy", "maxprob", "--option", "alpha=1"], "takes no options"),
    "policy unknown": (["calibrate", "{B}", "--data", DATA, "--policy", "nope"], "unknown policy 'nope'"),
    "budget infx": (["calibrate", "{B}", "--data", DATA, "--budget", "infx"], "out of range"),
    "budget inf": (["calibrate", "{B}", "--data", DATA, "--budget", "inf"], "cannot read budget"),
    "budget nanx": (["calibrate", "{B}", "--data", DATA, "--budget", "nanx"], "out of range"),
    "budget 0x": (["calibrate", "{B}", "--data", DATA, "--budget", "0x"], "out of range"),
    "budget above 100%": (["calibrate", "{B}", "--data", DATA, "--budget", "150%"], "out of range"),
    "budget garbage": (["calibrate", "{B}", "--data", DATA, "--budget", "fast"], "cannot read budget"),
    "max-drop negative": (["calibrate", "{B}", "--data", DATA, "--max-drop", "-1"], "out of range"),
    "max-drop nan": (["calibrate", "{B}", "--data", DATA, "--max-drop", "nan"], "out of range"),
    "max-drop inf": (["calibrate", "{B}", "--data", DATA, "--max-drop", "inf"], "out of range"),
    "max-drop not a number": (["calibrate", "{B}", "--data", DATA, "--max-drop", "abc"], "not a number"),
    "cost model unknown": (["calibrate", "{B}", "--data", DATA, "--cost", "bogus"], "unknown cost model"),
    "calibrate batch size 0": (["calibrate", "{B}", "--data", DATA, "--batch-size", "0"], "at least 1"),
    "calibrate limit 0": (["calibrate", "{B}", "--data", DATA, "--limit", "0"], "at least 1"),
    "device garbage": (["calibrate", "{B}", "--data", DATA, "--device", "gpu"], "unknown device 'gpu'"),
    "device tpu": (["eval", "{B}", "--data", DATA, "--device", "tpu"], "unknown device 'tpu'"),
    "device cuda:99": (["eval", "{B}", "--data", DATA, "--device", "cuda:99"], "cuda:99"),
    "device meta": (["eval", "{B}", "--data", DATA, "--device", "meta"], "not supported"),
    # dataset specs
    "data without scheme": (["eval", "{B}", "--data", "nothing"], "has no scheme"),
    "data unknown scheme": (["eval", "{B}", "--data", "vocc:/x"], "did you mean voc:"),
    "data option not a number": (["eval", "{B}", "--data", "synthetic:scenes?size=abc"], "size='abc'"),
    "data option unknown": (["eval", "{B}", "--data", "synthetic:scenes?sise=3"], "did you mean 'size'"),
    "data without path": (["calibrate", "{B}", "--data", "voc:"], "has no path"),
    "data option not a boolean": (["bench", "{B}", "--data", "folder:/x?skip_bad=maybe"], "is not a boolean"),
    # eval / bench / predict / profile / export / compare / train
    "eval batch size 0": (["eval", "{B}", "--data", DATA, "--batch-size", "0"], "at least 1"),
    "eval limit 0": (["eval", "{B}", "--data", DATA, "--limit", "0"], "at least 1"),
    "eval workers negative": (["eval", "{B}", "--data", DATA, "--workers", "-1"], "at least 0"),
    "bench batch size 0": (["bench", "{B}", "--data", DATA, "--batch-size", "0"], "at least 1"),
    "bench repeats 0": (["bench", "{B}", "--data", DATA, "--repeats", "0"], "at least 1"),
    "bench threads 0": (["bench", "{B}", "--data", DATA, "--threads", "0"], "at least 1"),
    "bench threads negative": (["bench", "{B}", "--data", DATA, "--threads", "-2"], "at least 1"),
    "bench limit negative": (["bench", "{B}", "--data", DATA, "--limit", "-1"], "at least 1"),
    "bench dtype unknown": (["bench", "{B}", "--data", DATA, "--dtype", "float8"], "unknown dtype 'float8'"),
    "bench engine unknown": (["bench", "{B}", "--data", DATA, "--engine", "tf"], "unknown engine 'tf'"),
    "predict batch size 0": (["predict", "{B}", "{R}/images", "-o", "{R}/masks", "--batch-size", "0"], "at least 1"),
    "predict size garbage": (["predict", "{B}", "{R}/images", "-o", "{R}/masks", "--size", "foo"], "is not HxW or N"),
    "predict size too large": (["predict", "{B}", "{R}/images", "-o", "{R}/masks", "--size", "100000"], "too large"),
    "predict engine unknown": (["predict", "{B}", "{R}/images", "-o", "{R}/masks", "--engine", "tf"], "unknown engine"),
    "profile batch size 0": (["profile", "{B}", "--device", "cpu", "--batch-size", "0"], "integers >= 1"),
    "profile batch sizes garbage": (["profile", "{B}", "--device", "cpu", "--batch-size", "1,abc"], "integers >= 1"),
    "profile warmup negative": (["profile", "{B}", "--device", "cpu", "--warmup", "-1"], "at least 0"),
    "profile dtype unknown": (["profile", "{B}", "--device", "cpu", "--dtype", "float8"], "unknown dtype"),
    "profile device unknown": (["profile", "{B}", "--device", "tpu"], "unknown device"),
    "export format unknown": (["export", "{B}", "-o", "{R}/exp", "--format", "tflite"], "unknown export format"),
    "export opset too old": (["export", "{B}", "-o", "{R}/exp", "--format", "onnx", "--opset", "0"], "from 18 to"),
    "export opset too new": (["export", "{B}", "-o", "{R}/exp", "--format", "onnx", "--opset", "999"], "from 18 to"),
    "compare policy unknown": (["compare", "{B}", "--data", DATA, "--policies", "mess,nope"], "unknown policy 'nope'"),
    "max exits 0": (["calibrate", "{B}", "--data", DATA, "--search", "--max-exits", "0"], "at least 1"),
    "compare batch size 0": (["compare", "{B}", "--data", DATA, "--batch-size", "0"], "at least 1"),
    "train override without =": (["train", "{B}", "--set", "lr"], "is not key=value"),
    "train override not a number": (["train", "{B}", "--set", "lr=abc"], "cannot take 'abc'"),
    "train override unknown": (["train", "{B}", "--set", "lrr=1"], "did you mean 'lr'"),
    "train device unknown": (["train", "{B}", "--device", "tpu"], "unknown device"),
    # usage itself
    "unknown option": (["eval", "{B}", "--nosuch"], "No such option: --nosuch"),
    "missing argument": (["eval"], "Missing argument"),
    "unknown command": (["evl"], "No such command 'evl'"),
    "missing option value": (["eval", "{B}", "--data"], "requires an argument. (see `"),
}
if not CUDA:
    USAGE["device cuda without CUDA"] = (["eval", "{B}", "--data", DATA, "--device", "cuda"], "CUDA is not available")
    USAGE["device cuda:7 without CUDA"] = (["train", "{B}", "--device", "cuda:7"], "CUDA is not available")

FILES = {
    "config.yaml truncated": (["eval", "{R}/trunc", "--data", DATA], "is not valid YAML (line"),
    "config.yaml misses a field": (["eval", "{R}/missing", "--data", DATA], "misses the field 'in_channels'"),
    "config.yaml wrong type": (["calibrate", "{R}/wrongtype", "--data", DATA], "num_classes is 'four', expected an integer"),
    "config.yaml not a mapping": (["bench", "{R}/notmapping", "--data", DATA], "must be a mapping"),
    "config.yaml exits not a list": (["predict", "{R}/badexits", "{R}/images", "-o", "{R}/masks"], "exits is 3, expected a list"),
    "bundle missing": (["eval", "{R}/nowhere.mex", "--data", DATA], "bundle not found"),
    "decompression bomb": (["predict", "{B}", "{R}/images/big.png", "-o", "{R}/masks"], "too large to decode safely"),
    "decompression bomb warning": (["predict", "{B}", "{R}/images/warn.png", "-o", "{R}/masks"], "too large to decode safely"),
    "exit that does not exist": (["predict", "{B}", "{R}/images/warn.png", "-o", "{R}/masks", "--exit", "9"], "exit 9 does not exist"),
    "split unknown": (["calibrate", "{B}", "--data", DATA, "--split", "nope"], "unknown split 'nope'"),
    "image path missing": (["predict", "{B}", "{R}/images/none.png", "-o", "{R}/masks"], "does not exist"),
}
DAMAGED_HINT = "the bundle is damaged; convert again"
# options that parse alone but not together: refused in one line before any work (exit 1, as a bad value)
COMBINED = {
    "fcn head with mess settings": (["convert", UNET, "--head", "fcn", "--head-set", "blocks=2"], "fcn head is one 3x3 block"),
    "max exits without search": (["calibrate", "{B}", "--data", DATA, "--max-exits", "2"], "add --search"),
}
CASES = {**{k: (*v, 2) for k, v in USAGE.items()}, **{k: (*v, 1) for k, v in {**FILES, **COMBINED}.items()}}


def _state(root: Path) -> dict:
    """Every file under ``root`` by its hash, and every name in it, recursively."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, place, monkeypatch):
    args, words, code = CASES[case]
    args = [a.replace("{B}", str(place / "b.mex")).replace("{R}", str(place)) for a in args]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # big.png (4096 px) is a bomb, warn.png (1600 px) warns
    before = _state(place)
    res = runner.invoke(app, args)
    out = res.output
    lines = [line for line in out.splitlines() if line.strip()]
    assert res.exit_code == code, out
    assert "Traceback" not in out and not (res.exception and not isinstance(res.exception, SystemExit)), out
    assert 1 <= len(lines) <= 3, out
    error = next(line for line in lines if line.startswith("error:"))
    assert words in error, out
    if code == 2:
        assert len(lines) == 1 and "--help" in error
    if "config.yaml" in case:
        assert DAMAGED_HINT in error and "config.yaml" in error
    assert _state(place) == before  # nothing written: no bundle changed, no output, no temporary litter
    assert not [p for p in place.rglob("*") if ".tmp-" in p.name or p.name.startswith(".")]


def test_version_prints_and_exits_0():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == mexify.__version__


def test_usage_errors_name_the_command_whose_help_to_read(place):
    res = runner.invoke(app, ["eval", str(place / "b.mex"), "--data"])
    assert res.exit_code == 2 and res.output.strip().endswith("eval --help`)")


def test_the_opset_bound_is_the_exporters():
    constants = pytest.importorskip("torch.onnx._constants")
    assert api.MAX_OPSET == constants.ONNX_MAX_OPSET


def test_the_python_api_refuses_the_same_values_with_the_same_words(place):
    bundle = str(place / "b.mex")
    cases = [
        (lambda: api.calibrate(bundle, DATA, budget=api.Budget.parse("infx")), api.ConfigError, "budget 'infx' is out of range"),
        (lambda: api.calibrate(bundle, DATA, budget=api.Budget.max_drop(float("nan"))), api.ConfigError, "out of range"),
        (lambda: api.calibrate(bundle, DATA, budget=api.Budget.max_drop(-1.0)), api.ConfigError, "out of range"),
        (lambda: api.calibrate(bundle, DATA, policy_options={"pixel_threshold": "abc"}), api.ConfigError, "expected a finite number"),
        (lambda: api.calibrate(bundle, DATA, batch_size=0), api.ConfigError, "at least 1"),
        (lambda: api.evaluate(bundle, DATA, device="tpu"), api.ConfigError, "unknown device 'tpu'"),
        (lambda: api.evaluate(bundle, "synthetic:scenes?size=abc"), api.DataError, "size='abc'"),
        (lambda: api.convert(UNET, trace=api.TraceConfig("100000x100000")), api.ConfigError, "too large"),
        (lambda: api.convert(UNET, trace=api.TraceConfig((32, 32)), head_set={"width": "abc"}), api.ConfigError, "width is 'abc'"),
        (lambda: api.convert(UNET, trace=api.TraceConfig((32, 32), method="foo")), api.ConfigError, "unknown tracer"),
        (lambda: api.bench(bundle, DATA, batch_size=0), api.ConfigError, "at least 1"),
        (lambda: api.profile(bundle, batch_sizes=[0], device="cpu"), api.ConfigError, "integers >= 1"),
    ]
    before = _state(place)
    for call, error, words in cases:
        with pytest.raises(error, match=words.replace("(", r"\(").replace("?", r"\?")):
            call()
    assert _state(place) == before


def test_16_bit_grayscale_images_keep_their_range(tmp_path):
    from mexify.data.readers import read_image as read_dataset_image
    from mexify.tools.images import read_image as read_predict_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = read_dataset_image(tmp_path / "g16.png")  # (3, H, W) in [0, 1]
    assert x.shape == (3, 64, 64) and torch.equal(x[0], x[2])
    want = torch.from_numpy(np.rint(ramp / 65535.0 * 255.0) / 255.0).float()
    assert torch.allclose(x[0], want, atol=1e-6)
    assert 0.3 < float(x.mean()) < 0.7  # not saturated white, as PIL's convert("RGB") reads it
    rgb = np.asarray(read_predict_image(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    Image.fromarray((np.arange(16).reshape(4, 4) * 70000).astype(np.int32), "I").save(tmp_path / "wide.tif")
    wide = np.asarray(read_predict_image(tmp_path / "wide.tif"))[..., 0]  # beyond 16 bits: the image's own range
    assert wide.min() == 0 and wide.max() == 255


def test_calibrate_reads_no_train_split_unless_the_policy_needs_class_means(place, tmp_path):
    root = tmp_path / "heldout"
    rng = np.random.RandomState(0)
    for sub in ("images", "masks"):
        (root / "calib" / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "calib" / "images" / f"{i}.png")
        Image.fromarray(rng.randint(0, 4, (32, 32), dtype=np.uint8)).save(root / "calib" / "masks" / f"{i}.png")
    bundle = tmp_path / "b.mex"
    shutil.copytree(place / "b.mex", bundle)
    spec = f"folder:{root}?classes=4"
    report = api.calibrate(bundle, spec, policy="maxprob", split="calib", write=False)
    assert report.policy.name == "maxprob"
    with pytest.raises(api.DataError, match="train"):
        api.calibrate(bundle, spec, policy="class-means", split="calib", write=False)


def test_a_small_calibration_set_warns_once_and_in_the_notes(place, tmp_path):
    bundle = tmp_path / "b.mex"
    shutil.copytree(place / "b.mex", bundle)
    res = runner.invoke(app, ["calibrate", str(bundle), "--data", DATA, "--limit", "2", "--budget", "2x", "--json"])
    assert res.exit_code in (0, 3), res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "only 2 calibration images" in warnings[0]
    if res.exit_code == 0:
        assert any("only 2 calibration images" in n for n in json.loads(res.stdout)["notes"])


def test_heads_costing_more_than_the_model_are_named(tmp_path):
    res = runner.invoke(app, ["convert", UNET, "--input-size", "32x32", "--exits", "12", "--no-check", "--json"])
    assert res.exit_code == 0, res.output
    notes = json.loads(res.stdout)["notes"]
    assert len(notes) == 1 and "of the original model's FLOPs" in notes[0] and "fewer exits" in notes[0]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: " + notes[0]]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ctrl_c_says_resume_only_when_there_is_a_checkpoint(place, tmp_path, monkeypatch, checkpoint):
    def interrupted(model, dataset, rec, run_dir, **kw):
        if checkpoint:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "checkpoint.pt").write_bytes(b"state")
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "train_model", interrupted)
    bundle = tmp_path / "b.mex"
    shutil.copytree(place / "b.mex", bundle)
    res = runner.invoke(app, ["train", str(bundle), "--data", DATA, "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 130, res.output
    if checkpoint:
        assert "continue with --resume" in res.output
    else:
        assert "nothing to resume" in res.output and "continue with --resume" not in res.output


@pytest.mark.parametrize("error, words", [
    (OSError(28, "No space left on device", "/data/out/weights.safetensors"), "No space left on device (/data/out/weights.safetensors)"),
    (PermissionError(13, "Permission denied", "/data/in"), "Permission denied (/data/in)"),
    (MemoryError(), "out of memory"),
])
def test_errors_the_system_raises_are_one_line(error, words, monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "export", fail)
    res = runner.invoke(app, ["export", str(tmp_path / "b"), "-o", str(tmp_path / "out")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 2 and words in lines[0] and "Traceback" not in res.output, res.output
