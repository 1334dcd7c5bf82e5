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
    assert res.exit_code == 2  # a bad option value: a usage error
    assert "unknown recipe key 'lrate'" in res.output and "did you mean 'lr'" in res.output


def test_recipe_names_its_dataset(tiny_bundle, tiny_data, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"data: '{tiny_data}'\nstage1_iters: 2\nstage2_iters: 1\nbatch_size: 4\ncrop_size: 48\n")
    out = tmp_path / "r.mex"
    res = CliRunner().invoke(app, ["train", str(tiny_bundle), "--recipe", str(recipe), "-o", str(out), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["recipe"]["data"] == tiny_data
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["data"] == tiny_data


def test_shipped_quick_recipe_names_synthetic_scenes():
    from mexify.train import load_recipe

    assert load_recipe("quick-synthetic").data.startswith("synthetic:scenes")


def test_no_dataset_anywhere_is_a_usage_error(tiny_bundle, tmp_path):
    recipe = tmp_path / "nodata.yaml"
    recipe.write_text("stage1_iters: 1\nstage2_iters: 0\n")
    res = CliRunner().invoke(app, ["train", str(tiny_bundle), "--recipe", str(recipe)])
    assert res.exit_code == 1
    assert "names no dataset" in res.output and "--data" in res.output
