"""`mexify train` through typer's CliRunner: JSON report, --set errors with exit code 1."""
import json

from typer.testing import CliRunner

from mexify.cli import app


def test_cli_json_and_overrides(tiny_bundle, tiny_data, tmp_path):
    out = tmp_path / "cli.mex"
    args = ["train", str(tiny_bundle), "--data", tiny_data, "--recipe", "quick-synthetic", "-o", str(out),
            "--device", "cpu", "--json"]
    for kv in ("stage1_iters=2", "stage2_iters=2", "batch_size=4", "crop_size=48", "checkpoint_every=2"):
        args += ["--set", kv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [s["stage"] for s in rep["stages"]] == [1, 2] and rep["recipe"]["stage1_iters"] == 2
    assert (out / "config.yaml").is_file()
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0 and json.loads(res.stdout)["resumed_from"] == {"stage": 2, "iteration": 2}


def test_cli_unknown_key_is_one_line_error(tiny_bundle, tiny_data):
    res = CliRunner().invoke(app, ["train", str(tiny_bundle), "--data", tiny_data, "--set", "lrate=0.1"])
    assert res.exit_code == 1
    assert "unknown recipe key 'lrate'" in res.output and "did you mean 'lr'" in res.output
