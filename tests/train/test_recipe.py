"""Recipes: shipped files load, overrides parse and unknown keys name the nearest valid one."""
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from mexify.errors import ConfigError
from mexify.train.recipe import Recipe, available_recipes, load_recipe


def test_shipped_recipes_load_with_paper_settings():
    names = available_recipes()
    assert "quick-synthetic" in names
    for name in ("voc-deeplabv3-resnet50", "voc-fcn-resnet50", "cityscapes-deeplabv3-resnet50"):
        assert name in names
        r = load_recipe(name)
        assert r.name == name
        assert (r.optimizer, r.lr, r.lr_power, r.momentum, r.weight_decay, r.kd_weight) == ("sgd", 0.02, 0.9, 0.9, 1e-4, 0.5)
        assert r.distill == "pfd"
    for name in ("voc-deeplabv3-resnet50", "voc-fcn-resnet50"):
        r = load_recipe(name)
        assert r.crop_hw == (520, 520) and r.stage1_iters == 60000


def test_overrides_are_parsed_and_typed():
    r = load_recipe("quick-synthetic", {"lr": "0.5", "stage1_iters": "12", "exit_weights": "[1, 0.5]",
                                        "crop_size": "[64, 96]", "channels_last": "true", "grad_clip": "null"})
    assert r.lr == 0.5 and r.stage1_iters == 12 and r.exit_weights == (1.0, 0.5)
    assert r.crop_hw == (64, 96) and r.channels_last is True and r.grad_clip is None


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as e:
        load_recipe("quick-synthetic", {"kd_wieght": 1.0})
    assert "kd_wieght" in str(e.value) and "did you mean 'kd_weight'" in str(e.value)


@pytest.mark.parametrize("key,value", [("stage1_iters", "many"), ("distill", "self"), ("amp", "fp8"),
                                       ("batch_size", 0), ("stage1_iters", 1.5), ("nesterov", "maybe")])
def test_bad_values_are_config_errors(key, value):
    with pytest.raises(ConfigError) as e:
        load_recipe("quick-synthetic", {key: value})
    assert key in str(e.value)


def test_unknown_recipe_name_suggests():
    with pytest.raises(ConfigError, match="quick-synthetic"):
        load_recipe("quick-synth")


def test_yaml_round_trip_and_file_path(tmp_path):
    r = dataclasses.replace(load_recipe("quick-synthetic"), exit_weights=(1.0, 2.0), crop_size=(32, 48))
    p = tmp_path / "mine.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(str(p)) == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nmomentun: 0.9\n")
    with pytest.raises(ConfigError, match="momentum"):
        load_recipe(str(bad))


@pytest.mark.slow
def test_recipes_ship_in_the_wheel(tmp_path):
    """Build sdist and wheel (the wheel from the sdist), install the wheel into a directory, load a recipe from outside the checkout."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(wheels), str(repo)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("mexify-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import mexify.train.recipe as r; print(r.shipped_recipes_dir()); "
            "print(r.load_recipe('quick-synthetic').data)")
    env = {k: v for k, v in os.environ.items() if k not in ("MEXIFY_RECIPES", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    shipped, data = out.stdout.split("\n")[:2]
    assert Path(shipped).is_relative_to(target) and (Path(shipped) / "quick-synthetic.yaml").is_file()
    assert data.startswith("synthetic:scenes")
