"""The trust policy: a bundle from someone else runs no code it names unless the user trusts it.

Each crafted bundle carries a payload that would create a sentinel file; the sentinel must not
appear, and the refusal must name the target and the flag that would allow it.
"""
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mexify
import mexify.trust
from mexify.cli import app
from mexify.errors import BundleError, SpecError
from mexify.spec import build_model, parse_spec
from mexify.trust import TRUST_ENV, Trust, check_factory, check_import

FIXTURES = Path(__file__).parent / "fixture_models.py"
runner = CliRunner()


@pytest.fixture
def stranger(monkeypatch):
    """Trust nothing beyond the defaults: no suite-wide trusted folder, no registered builders."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.setattr(mexify.trust, "_REGISTERED", set())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "tiny.mex"
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 3}, trace=mexify.TraceConfig((32, 32)), exits=2, out=str(out))
    return out


def _craft(bundle: Path, dest: Path, **spec) -> Path:
    """A copy of ``bundle`` whose config's spec (and trace) fields are replaced."""
    dest.mkdir()
    for f in bundle.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    trace = spec.pop("trace", None)
    config["spec"].update(spec)
    if trace:
        config["trace"].update(trace)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _lines(output: str) -> list:
    return [line for line in output.splitlines() if line.strip()]


def test_a_bundle_naming_os_system_runs_nothing(bundle, tmp_path, stranger):
    sentinel = tmp_path / "PWNED"
    evil = _craft(bundle, tmp_path / "evil.mex", kind="factory", target="os:system", args={"command": f"touch {sentinel}"})
    with pytest.raises(BundleError, match=r"'os:system'.*not a known model builder.*--trust-code"):
        mexify.load(evil)
    for cmd in (["eval", str(evil), "--data", "synthetic:scenes?n=2&size=32&classes=3"], ["export", str(evil), "-o", str(tmp_path / "x")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert "os:system" in res.output and "--trust-code" in res.output and len(_lines(res.output)) <= 3, res.output
    assert not sentinel.exists()
    # the flag widens trust exactly as documented: the command now runs (and the result is no model)
    with pytest.raises(BundleError, match="not a torch.nn.Module"):
        mexify.load(evil, trust=Trust(code=True))
    assert sentinel.exists()


def test_a_file_target_is_not_imported_without_trust(bundle, tmp_path, stranger, monkeypatch):
    sentinel = tmp_path / "IMPORTED"
    code = tmp_path / "evil.py"
    code.write_text(f"open({str(sentinel)!r}, 'w').close()\n" + FIXTURES.read_text())
    evil = _craft(bundle, tmp_path / "evil.mex", kind="file", target=f"{code}:TinyUNet")
    with pytest.raises(BundleError, match=r"evil\.py:TinyUNet.*a Python file.*--trust-code"):
        mexify.load(evil)
    assert not sentinel.exists()
    monkeypatch.setenv(TRUST_ENV, str(code))  # the user trusts this one file
    model = mexify.load(evil)
    assert sentinel.exists() and isinstance(model, mexify.MultiExitModel)


def test_an_autowrap_function_of_an_unknown_module_is_not_imported(bundle, tmp_path, stranger, monkeypatch):
    sentinel = tmp_path / "AUTOWRAP"
    (tmp_path / "evil_wrap.py").write_text(f"open({str(sentinel)!r}, 'w').close()\ndef fn(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = _craft(bundle, tmp_path / "evil.mex", trace={"autowrap_functions": ["evil_wrap.fn"]})
    monkeypatch.setenv(TRUST_ENV, str(FIXTURES))  # the model itself is trusted, the function is not
    with pytest.raises(BundleError, match=r"evil_wrap\.fn.*--trust-code"):
        mexify.load(evil)
    assert not sentinel.exists()


def test_the_refusal_comes_before_the_import_of_an_unknown_package(tmp_path, stranger, monkeypatch):
    sentinel = tmp_path / "PKG"
    (tmp_path / "evil_pkg.py").write_text(f"open({str(sentinel)!r}, 'w').close()\ndef build():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match="evil_pkg:build"):
        build_model(parse_spec("evil_pkg:build"), named_by="config.yaml")
    assert not sentinel.exists()
    monkeypatch.setenv(TRUST_ENV, "evil_pkg")  # a module prefix the user trusts
    with pytest.raises(SpecError, match="not a torch.nn.Module"):
        build_model(parse_spec("evil_pkg:build"), named_by="config.yaml")
    assert sentinel.exists()


@pytest.mark.parametrize("target, args", [
    ("torchvision.models.segmentation:lraspp_mobilenet_v3_large", {"num_classes": 3, "weights": None}),
    ("torchvision.models.segmentation.deeplabv3:deeplabv3_resnet50", {}),
    ("torchvision.models:resnet18", {}),
    ("segmentation_models_pytorch:Unet", {"encoder_weights": None}),
    ("segmentation_models_pytorch:create_model", {"arch": "fpn"}),
    ("timm:create_model", {"model_name": "resnet18"}),
    ("transformers:SegformerForSemanticSegmentation", {"num_labels": 3}),
])
def test_known_model_builders_need_no_flag(target, args, stranger):
    check_factory("factory", target, args, Trust(), where="config.yaml")


@pytest.mark.parametrize("target, args, why", [
    ("torchvision.models:get_weight", {}, "not one of torchvision's model builders"),
    ("torchvision.io:read_file", {}, "not one of torchvision's model builders"),
    ("transformers:pipeline", {}, "not one of transformers's model builders"),
    ("transformers:PreTrainedModel", {}, "not one of transformers's model builders"),
    ("timm:create_model", {"model_name": "resnet18", "checkpoint_path": "/tmp/x.pth"}, "read other files"),
    ("torch:load", {}, "not a known model builder"),
    ("builtins:exec", {}, "not a known model builder"),
    ("subprocess:run", {}, "not a known model builder"),
])
def test_everything_else_needs_trust_code(target, args, why, stranger):
    with pytest.raises(SpecError, match=why) as e:
        check_factory("factory", target, args, Trust(), where="config.yaml")
    assert "--trust-code" in e.value.hint
    check_factory("factory", target, args, Trust(code=True), where="config.yaml")


def test_pickled_specs_need_trust_pickle_and_code_trust_does_not_give_it(stranger):
    with pytest.raises(SpecError, match="--trust-pickle"):
        check_factory("pickle", "/x/model.pt", {}, Trust(code=True))
    check_factory("pickle", "/x/model.pt", {}, Trust(pickle=True))


def test_register_builder_trusts_a_callable_a_target_or_a_prefix(stranger):
    def build_segmenter():  # pragma: no cover - never called
        pass

    with pytest.raises(SpecError):
        check_factory("factory", f"{__name__}:build_segmenter", {}, Trust())
    mexify.register_builder(build_segmenter)
    assert f"{build_segmenter.__module__}:{build_segmenter.__qualname__}" in mexify.trust.registered_builders()
    mexify.register_builder("mypkg.models")
    check_factory("factory", "mypkg.models.unet:build", {}, Trust())
    with pytest.raises(SpecError):
        check_factory("factory", "mypkg.modelsx:build", {}, Trust())  # a prefix is a whole module name
    check_import("mypkg.models.ops.roi_align", Trust())


def test_a_torchvision_bundle_loads_from_a_stranger_without_flags(tmp_path, stranger):
    out = tmp_path / "tv.mex"
    mexify.convert("torchvision.models.segmentation:lraspp_mobilenet_v3_large",
                   args={"num_classes": 3, "weights": None, "weights_backbone": None}, trace=mexify.TraceConfig((64, 64)), exits=2, out=str(out))
    model = mexify.load(out)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert model.forward_all(x)[-1].shape == (1, 3, 64, 64)


def test_a_transformers_class_builds_from_its_config(stranger):
    model = build_model(parse_spec("transformers:SegformerForSemanticSegmentation", {"num_labels": 3}), named_by="config.yaml")
    assert model.config.num_labels == 3


@pytest.mark.parametrize("cmd", ["train", "calibrate", "compare", "eval", "predict", "bench", "profile", "export"])
def test_every_command_that_loads_a_bundle_offers_both_trust_flags(cmd):
    text = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output
    assert "--trust-code" in text and "--trust-pickle" in text, cmd
