"""Files a user may have received from anyone never run code when mexify reads them: ``.pt2``
archives (pickled entries, symbolic expressions, names pasted into generated code), exported
bundles (graph JSON, manifest paths, truncated weights) and ONNX exports (manifest paths, garbage
graphs).

Every payload creates a sentinel file when it runs; the tests check that it does not appear, and
(where torch's own loader is at hand) that the same file does run the payload through torch, so
that a refusal is not a payload that would have failed anyway.
"""
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mexify
from mexify.cli import app
from mexify.errors import BundleError, SpecError
from mexify.graph.serde import check_program_json, check_sym_expr, load_pt2
from mexify.spec import build_model, parse_spec

FIXTURES = Path(__file__).parent / "fixture_models.py"
ROOT = "model"  # the archive's top folder as torch.export.save names it after the file
runner = CliRunner()


class _Touch:
    """A pickle that creates ``path`` when it is unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_bytes(sentinel) -> bytes:
    buf = io.BytesIO()
    torch.save(_Touch(sentinel), buf)
    return buf.getvalue()


def _touch_code(sentinel) -> str:
    return f"__import__('pathlib').Path({str(sentinel)!r}).touch()"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A clean ``.pt2`` of a tiny conv model with dynamic batch and spatial sizes, its module and an input."""
    model = _Tiny().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    auto = torch.export.Dim.AUTO
    program = torch.export.export(model, (x,), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    path = tmp_path_factory.mktemp("pt2") / f"{ROOT}.pt2"
    torch.export.save(program, str(path))
    with torch.no_grad():
        ref = model(x)
    return path, model, x, ref


def _entries(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def _rewrite(src, dst, edit):
    """Copy the archive ``src`` to ``dst``, entry by entry through ``edit(name, data) -> data``."""
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in _entries(src).items():
            z.writestr(name, edit(name, data))
    return dst


def _model_json(path):
    return json.loads(_entries(path)[f"{ROOT}/models/model.json"])


def _edit_json(edit):
    def apply(name, data):
        if name == f"{ROOT}/models/model.json":
            program = json.loads(data)
            edit(program)
            return json.dumps(program).encode()
        return data
    return apply


def _set_first(obj, key, value):
    """Set the first ``key`` found in ``obj`` (depth first) to ``value``; returns whether one was found."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                obj[k] = value
                return True
            if _set_first(v, key, value):
                return True
    elif isinstance(obj, list):
        return any(_set_first(v, key, value) for v in obj)
    return False


def _refused(path, *words):
    with pytest.raises(SpecError) as e:
        build_model(parse_spec(str(path)))
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    for word in words:
        assert word in text, text
    return text


# --- .pt2 archives ---------------------------------------------------------------------------------


def test_a_clean_archive_converts_and_computes_what_the_module_does(tiny):
    path, model, x, ref = tiny
    built = build_model(parse_spec(str(path)))
    with torch.no_grad():
        out = built(x)
        other = torch.randn(3, 3, 20, 24)
        assert torch.allclose(built(other), model(other), atol=1e-6)
    assert torch.allclose(out, ref, atol=1e-6)


def test_a_pickled_weight_is_refused_without_trust(tiny, tmp_path):
    path, *_ = tiny
    sentinel = tmp_path / "sentinel"
    cfg_name = f"{ROOT}/data/weights/model_weights_config.json"
    config = json.loads(_entries(path)[cfg_name])
    entry = config["config"]["conv.weight"]
    entry["use_pickle"] = True
    payload = f"{ROOT}/data/weights/{entry['path_name']}"
    replaced = {cfg_name: json.dumps(config).encode(), payload: _pickle_bytes(sentinel)}
    crafted = _rewrite(path, tmp_path / "crafted.pt2", lambda n, d: replaced.get(n, d))
    _refused(crafted, "conv.weight", "--trust-pickle", "refusing to unpickle")
    assert not sentinel.exists()
    res = runner.invoke(app, ["convert", str(crafted), "--input-size", "32x32", "-o", str(tmp_path / "out")])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "--trust-pickle" in res.output, res.output
    assert not sentinel.exists() and not (tmp_path / "out").exists()
    try:  # the payload is live: trusting the file unpickles it
        load_pt2(crafted, trust_pickle=True)
    except SpecError:
        pass
    assert sentinel.exists()


@pytest.mark.parametrize("prefix", ["custom_obj_", "opaque_obj_"])
def test_a_pickled_constant_object_is_refused_without_trust(tiny, tmp_path, prefix):
    path, *_ = tiny
    sentinel = tmp_path / "sentinel"
    cfg_name = f"{ROOT}/data/constants/model_constants_config.json"

    def edit(name, data):
        if name == cfg_name:
            return json.dumps({"config": {"obj": {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True,
                                                  "tensor_meta": None}}}).encode()
        return data

    crafted = _rewrite(path, tmp_path / "crafted.pt2", edit)
    with zipfile.ZipFile(crafted, "a") as z:
        z.writestr(f"{ROOT}/data/constants/{prefix}0", _pickle_bytes(sentinel))
    _refused(crafted, "'obj'", "--trust-pickle")
    assert not sentinel.exists()


def test_a_legacy_pickled_weights_file_is_refused_without_trust(tiny, tmp_path):
    path, *_ = tiny
    sentinel = tmp_path / "sentinel"
    crafted = _rewrite(path, tmp_path / "crafted.pt2", lambda n, d: d)
    with zipfile.ZipFile(crafted, "a") as z:
        z.writestr(f"{ROOT}/data/weights/model.pt", _pickle_bytes(sentinel))
    _refused(crafted, "data/weights/model.pt", "--trust-pickle")
    assert not sentinel.exists()


def test_pickled_sample_inputs_are_never_read(tiny, tmp_path):
    path, model, x, ref = tiny
    sentinel = tmp_path / "sentinel"
    crafted = _rewrite(path, tmp_path / "crafted.pt2",
                       lambda n, d: _pickle_bytes(sentinel) if n == f"{ROOT}/data/sample_inputs/model.pt" else d)
    built = build_model(parse_spec(str(crafted)))
    assert not sentinel.exists()
    with torch.no_grad():
        assert torch.allclose(built(x), ref, atol=1e-6)
    try:  # the payload is live: torch.export.load unpickles the sample inputs
        torch.export.load(str(crafted))
    except Exception:  # noqa: BLE001
        pass
    assert sentinel.exists()


def test_an_expression_payload_is_refused(tiny, tmp_path):
    path, *_ = tiny
    sentinel = tmp_path / "sentinel"
    assert _set_first(_model_json(path), "expr_str", "s0")  # the archive has symbolic shapes
    crafted = _rewrite(path, tmp_path / "crafted.pt2", _edit_json(lambda p: _set_first(p, "expr_str", _touch_code(sentinel))))
    text = _refused(crafted, "symbolic expression", "models/model.json", "__import__")
    assert not sentinel.exists()
    res = runner.invoke(app, ["convert", str(crafted), "--input-size", "32x32", "-o", str(tmp_path / "out")])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert res.output.strip().splitlines()[0].startswith("error:"), res.output
    assert not sentinel.exists()
    with pytest.raises(Exception):  # the payload is live: torch's deserialiser sympifies it
        torch.export.load(str(crafted))
    assert sentinel.exists(), text


def test_a_name_payload_is_refused(tiny, tmp_path):
    """Node and input names are pasted into the code torch.fx generates and execs."""
    path, *_ = tiny
    sentinel = tmp_path / "sentinel"
    program = _model_json(path)
    old = program["graph_module"]["signature"]["input_specs"][-1]["user_input"]["arg"]["as_tensor"]["name"]
    new = f"{old}={_touch_code(sentinel)}"

    def rename(obj):
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                if k in ("as_tensor", "arg") and v == {"name": old}:
                    obj[k] = {"name": new}
                else:
                    rename(v)
        elif isinstance(obj, list):
            for v in obj:
                rename(v)

    def edit(p):
        rename(p)
        values = p["graph_module"]["graph"]["tensor_values"]
        values[new] = values.pop(old)

    crafted = _rewrite(path, tmp_path / "crafted.pt2", _edit_json(edit))
    _refused(crafted, "not a Python identifier")
    assert not sentinel.exists()
    try:  # the payload is live: torch.export.load runs it while it builds the graph module
        torch.export.load(str(crafted))
    except Exception:  # noqa: BLE001
        pass
    assert sentinel.exists()


def test_forward_argument_names_and_input_spec_imports_are_refused(tiny, tmp_path):
    path, *_ = tiny
    sentinel = tmp_path / "sentinel"
    crafted = _rewrite(path, tmp_path / "args.pt2", _edit_json(
        lambda p: _set_first(p, "forward_arg_names", [f"x={_touch_code(sentinel)}"])))
    _refused(crafted, "forward argument name")
    enum = {"__enum__": True, "fqn": "antigravity:X", "name": "A"}
    spec = json.dumps([1, {"type": "builtins.tuple", "context": json.dumps([enum]), "children_spec": []}])
    crafted = _rewrite(path, tmp_path / "enum.pt2", _edit_json(lambda p: _set_first(p, "in_spec", spec)))
    _refused(crafted, "enum")
    assert not sentinel.exists()


def test_check_program_json_refuses_operators_that_are_not_operators():
    program = {"graph_module": {"graph": {"nodes": [
        {"target": "torch.ops.higher_order.wrap_with_set_grad_enabled", "name": "n",
         "inputs": [{"name": "fn", "arg": {"as_operator": "torch.os.system"}}], "outputs": [], "metadata": {}}]}}}
    with pytest.raises(BundleError, match="operator argument 'torch.os.system'"):
        check_program_json(json.dumps(program).encode(), "g.json")
    program["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"]["as_operator"] = "torch.ops.aten.add.Tensor"
    check_program_json(json.dumps(program).encode(), "g.json")
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.__builtins__.eval"
    with pytest.raises(BundleError, match="node target"):
        check_program_json(json.dumps(program).encode(), "g.json")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "s0.__class__", "S('1')", "sympify('1')", "eval('1')", "lambda: 1", "[s0][0]",
    "Symbol('a b')", "Float('1; 2')", "2**2**2**2**2", "LShift(1, 10**20)", "open", "f'{s0}'", "Symbol('s0', **{})",
    "Max(s0, key=print)", "s0 if s0 else s1", "\uff45\uff56\uff41\uff4c('1')", "Function('f')(s0)", "Mul(*[s0])",
])
def test_check_sym_expr_refuses_python(expr):
    with pytest.raises(ValueError):
        check_sym_expr(expr)


@pytest.mark.parametrize("expr", [
    "Mul(Integer(4), Symbol('s16', positive=True, integer=True), Symbol('s31', positive=True, integer=True))",
    "Max(Integer(1), FloorDiv(Symbol('s0', positive=True, integer=True), Integer(2)))",
    "Piecewise(ExprCondPair(Integer(1), StrictGreaterThan(Symbol('s0', integer=True), Integer(2))), ExprCondPair(Integer(0), true))",
    "Mul(Float('0.5', precision=53), Pow(Symbol('s0', integer=True), Rational(1, 2)))",
    "s0*s1", "Max(1, s1//2)", "s0 < 8", "Eq(s0, 2)", "(s0 > 1) & (s0 < 2)", "Piecewise((1, s0 > 2), (0, True))", "-oo", "u0 + 1",
    "ToFloat(s0)/2.5", "OpaqueUnaryFn_sqrt(s0)", "Ne(Mod(s0, 2), 0)", "1/s0", "s0**2", "2**s0",
])
def test_check_sym_expr_accepts_what_torch_writes(expr):
    check_sym_expr(expr)


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04" + b"\x00" * 200])
def test_garbage_is_one_clear_line(tmp_path, data):
    path = tmp_path / "bad.pt2"
    path.write_bytes(data)
    _refused(path, "cannot read torch.export archive", "torch.export.save")


def test_a_truncated_archive_is_one_clear_line(tiny, tmp_path):
    path, *_ = tiny
    data = path.read_bytes()
    for n, cut in enumerate((len(data) // 2, len(data) - 30)):
        bad = tmp_path / f"cut{n}.pt2"
        bad.write_bytes(data[:cut])
        _refused(bad, "cannot read torch.export archive")


def test_a_wrong_version_or_a_missing_model_is_one_clear_line(tiny, tmp_path):
    path, *_ = tiny
    crafted = _rewrite(path, tmp_path / "v.pt2", lambda n, d: b"99" if n == f"{ROOT}/archive_version" else d)
    _refused(crafted, "archive version '99'")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "nomodel.pt2", "w") as z:
        for i in src.infolist():
            if not i.filename.endswith("models/model.json"):
                z.writestr(i.filename, src.read(i.filename))
    _refused(tmp_path / "nomodel.pt2", "models/model.json")


def test_the_old_zip_format_needs_trust(tmp_path):
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("version", "1.0")
        z.writestr("serialized_exported_program.json", "{}")
        z.writestr("serialized_state_dict.pt", b"")
    _refused(path, "old zip format", "--trust-pickle")


@pytest.mark.parametrize("name", ["TinyUNet", "BatchSizeNet", "MixedBatchNet"])
def test_real_exports_with_dynamic_shapes_pass_the_checks(name, tmp_path):
    model = build_model(parse_spec(f"{FIXTURES}:{name}")).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    path = tmp_path / f"{ROOT}.pt2"
    torch.export.save(program, str(path))
    data = _entries(path)[f"{ROOT}/models/model.json"]
    assert b"expr_str" in data
    check_program_json(data, str(path))
    x = torch.randn(3, 3, 24, 40)
    with torch.no_grad():
        assert torch.allclose(load_pt2(path).module()(x), model(x), atol=1e-5)


# --- exported bundles ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mexify.tools.export import export_bundle

    root = tmp_path_factory.mktemp("bundle")
    src, out = root / "src.mex", root / "out.mex"
    mexify.api.convert(f"{FIXTURES}:LowResSegmenter", trace=mexify.api.TraceConfig((32, 32)), exits=2, out=str(src))
    export_bundle(src, out, "pt2")
    return out


def _copy(exported, tmp_path):
    out = tmp_path / "copy.mex"
    shutil.copytree(exported, out)
    return out


def test_the_exported_bundle_loads_and_its_graphs_pass_the_checks(exported):
    for f in exported.glob("*.json"):
        check_program_json(f.read_bytes(), str(f))
    model = mexify.load(exported)
    with torch.no_grad():
        assert len(model.forward_all(torch.randn(2, 3, 32, 32))) == model.num_exits


def test_an_expression_payload_in_a_bundle_graph_is_refused(exported, tmp_path):
    out = _copy(exported, tmp_path)
    sentinel = tmp_path / "sentinel"
    graph = out / "stage0.json"
    program = json.loads(graph.read_bytes())
    assert _set_first(program, "expr_str", _touch_code(sentinel))
    graph.write_text(json.dumps(program))
    with pytest.raises(BundleError) as e:
        mexify.load(out)
    assert "stage0.json" in str(e.value) and "symbolic expression" in str(e.value) and "\n" not in str(e.value)
    assert not sentinel.exists()
    # the payload is live: torch's deserialiser (what load_program called) sympifies it
    from safetensors.torch import load_file
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    tensors = load_file(str(out / "stage0.safetensors"))
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}
    consts = {k[6:]: v for k, v in tensors.items() if k.startswith("const.")}
    with pytest.raises(Exception):
        deserialize(SerializedArtifact(graph.read_bytes(), state, consts, b""))
    assert sentinel.exists()


def _manifest_edit(out, edit):
    cfg = out / "config.yaml"
    data = yaml.safe_load(cfg.read_text())
    edit(data["export"])
    cfg.write_text(yaml.safe_dump(data))


def test_a_bundle_graph_path_outside_the_bundle_is_refused(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _manifest_edit(out, lambda m: m["stages"][0]["program"].update(graph="../../../../etc/passwd"))
    with pytest.raises(BundleError, match="points outside"):
        mexify.load(out)
    out2 = tmp_path / "abs.mex"
    shutil.copytree(exported, out2)
    _manifest_edit(out2, lambda m: m["heads"][0]["program"].update(weights="/etc/passwd"))
    with pytest.raises(BundleError, match="points outside"):
        mexify.load(out2)


@pytest.mark.parametrize("what", ["safetensors", "json"])
def test_a_truncated_bundle_file_is_one_line(exported, tmp_path, what):
    out = _copy(exported, tmp_path)
    f = out / f"stage0.{what}"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as e:
        mexify.load(out)
    assert "stage0" in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- ONNX exports (the onnxruntime runner) ---------------------------------------------------------


def _onnx_export(tmp_path, stage_file):
    out = tmp_path / "onnx.mex"
    out.mkdir(parents=True)
    manifest = {
        "format": "onnx", "schema": 1, "input_size": [32, 32], "static_size": None,
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "stages": [{"onnx": stage_file, "inputs": ["x"], "outputs": ["y"]}],
        "heads": [], "mask": {"onnx": "mask.onnx"}, "policy": None,
    }
    (out / "config.yaml").write_text(yaml.safe_dump({"num_classes": 3, "exits": [], "export": manifest}))
    return out


def test_the_runner_refuses_paths_outside_the_export_and_garbage_graphs(tmp_path):
    pytest.importorskip("onnxruntime")
    from mexify.deploy import Runner

    with pytest.raises(BundleError, match="points outside"):
        Runner(_onnx_export(tmp_path / "a", "../../../../etc/passwd"))
    with pytest.raises(BundleError, match="points outside"):
        Runner(_onnx_export(tmp_path / "b", "/etc/passwd"))
    out = _onnx_export(tmp_path / "c", "stage0.onnx")
    (out / "stage0.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(BundleError) as e:
        Runner(out)
    assert "cannot read the ONNX graph" in str(e.value) and "\n" not in str(e.value), str(e.value)
