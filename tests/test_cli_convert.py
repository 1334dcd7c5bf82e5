"""`mexify convert` / `mexify inspect` from the command line: tables, JSON, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mexify
from mexify.cli import app

FIXTURES = Path(__file__).parent / "fixture_models.py"
UNET = f"{FIXTURES}:TinyUNet"
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_convert_writes_bundle_and_table(tmp_path):
    out = tmp_path / "bundle"
    res = _run("convert", UNET, "--arg", "num_classes=3", "--input-size", "64x64", "--exits", "3", "-o", out)
    assert res.exit_code == 0, res.output
    assert "final" in res.output and "% orig" in res.output
    assert (out / "config.yaml").is_file() and (out / "weights.safetensors").is_file()
    res = _run("convert", UNET, "--input-size", "64x64", "--exits", "2", "--head", "fcn", "--json")
    data = json.loads(res.stdout)
    assert [row["node"] for row in data["exits"]][-1] == "final" and len(data["exits"]) == 3
    assert all(row["head_flops"] > 0 for row in data["exits"][:-1])


def test_head_set_overrides_reach_the_bundle(tmp_path):
    out = tmp_path / "b"
    res = _run("convert", UNET, "--input-size", "64x64", "--exits", "2", "--head-set", "width=24,blocks=2", "-o", out)
    assert res.exit_code == 0, res.output
    import mexify

    cfg = mexify.bundle.read_config(out)
    assert all(e.head.width == 24 and e.head.blocks == 2 for e in cfg.exits)


def test_inspect_lists_candidates_as_json():
    res = _run("inspect", UNET, "--input-size", "64x64", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    want = mexify.inspect(UNET, trace=mexify.TraceConfig((64, 64))).candidates
    assert [(c["name"], c["fraction"], c["channels"]) for c in data["candidates"]] == [(c.name, c.fraction, c.channels) for c in want]
    assert 0 < want[0].fraction and want[-1].fraction < 1
    assert {"name", "channels", "stride", "live_tensors"} <= set(data["candidates"][0])


def _state_file(tmp_path, rename=None):
    import mexify

    model = mexify.spec.build_model(mexify.spec.parse_spec(UNET))
    state = model.state_dict()
    if rename:
        state[rename[1]] = state.pop(rename[0])
    path = tmp_path / "w.pt"
    torch.save(state, path)
    return path


BAD = {
    "unknown spec": (lambda t: ["convert", "no_such_pkg_xyz:factory"], "cannot import"),
    "unknown form": (lambda t: ["convert", "not a spec"], "unknown model spec"),
    "missing file": (lambda t: ["convert", str(t / "missing.pt2")], "not found"),
    "pickle without trust": (lambda t: ["convert", str(_pickle(t))], "--trust-pickle"),
    "a state_dict given as the model": (lambda t: ["convert", str(_state_file(t))], "holds weights only"),
    "not a PyTorch file": (lambda t: ["convert", str(_junk(t))], "is not a PyTorch file"),
    "wrong weight keys": (lambda t: ["convert", UNET, "--weights", str(_state_file(t, ("final.bias", "head.bias")))], "final.bias"),
    "unknown --at": (lambda t: ["convert", UNET, "--at", "enc1_0,nonexistent_node"], "nearest valid"),
    "--exits 0": (lambda t: ["convert", UNET, "--exits", "0"], "at least 1"),
    "too many exits": (lambda t: ["convert", UNET, "--exits", "999"], "candidate exit points"),
    "bad head setting": (lambda t: ["convert", UNET, "--head-set", "widht=3"], "did you mean 'width'"),
}


USAGE = {"--exits 0", "bad head setting"}


def _junk(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint")
    return path


def _pickle(tmp_path):
    import mexify

    path = tmp_path / "model.pt"
    torch.save(mexify.spec.build_model(mexify.spec.parse_spec(UNET)), path)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_no_bundle(case, tmp_path):
    make_args, expected = BAD[case]
    out = tmp_path / "out"
    res = _run(*make_args(tmp_path), "--input-size", "64x64", "-o", out)
    assert res.exit_code == (2 if case in USAGE else 1), res.output  # a bad option value is a usage error
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and expected in " ".join(lines).replace("\n", " "), res.output
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_console_script_exit_code_and_single_line(tmp_path):
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "mexify", "convert", "nope_pkg_abc:f", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[0].startswith("error: cannot import 'nope_pkg_abc'")
    assert "Traceback" not in proc.stderr
