"""The common real flow, from the command line: a user's already-trained model converted with its
weights, the exit heads trained with the backbone frozen (stage 2 only), calibrated and evaluated."""
import importlib.util
import json

import torch
from typer.testing import CliRunner

import mexify
from mexify import api
from mexify.cli import app


def _user_model(tiny_spec):
    path, _, factory = tiny_spec.rpartition(":")
    spec = importlib.util.spec_from_file_location("tiny_seg_user_flow", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(3)
    return getattr(mod, factory)(num_classes=4, width=8).eval()


def test_trained_model_converted_heads_trained_and_calibrated(tmp_path, tiny_spec, tiny_data):
    user = _user_model(tiny_spec)  # stands for a model the user trained: its weights must survive
    weights = tmp_path / "trained.pth"
    torch.save(user.state_dict(), weights)
    bundle = tmp_path / "b.mex"
    run = CliRunner()
    res = run.invoke(app, ["convert", tiny_spec, "--arg", "num_classes=4", "--arg", "width=8", "--weights", str(weights),
                           "--input-size", "48x48", "--exits", "3", "-o", str(bundle)])
    assert res.exit_code == 0, res.output
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(mexify.load(bundle)(x), user(x), atol=1e-5)  # the final exit is the user's model
        heads_before = {k: v.clone() for k, v in mexify.load(bundle).heads.state_dict().items()}

    res = run.invoke(app, ["train", str(bundle), "--data", tiny_data, "--recipe", "quick-synthetic", "--set", "stage1_iters=0",
                           "--set", "stage2_iters=6", "--set", "batch_size=4", "--set", "crop_size=48", "--set", "num_workers=0",
                           "--set", "precise_bn_iters=0"])
    assert res.exit_code == 0, res.output
    trained = mexify.load(bundle)
    with torch.no_grad():
        assert torch.allclose(trained(x), user(x), atol=1e-5)  # stage 2 left the backbone as it was
    changed = [k for k, v in trained.heads.state_dict().items() if not torch.equal(v, heads_before[k])]
    assert changed, "the exit heads were not trained"
    assert trained.config.training["iterations"] == {"stage1": 0, "stage2": 6}

    res = run.invoke(app, ["calibrate", str(bundle), "--data", tiny_data, "--policy", "maxprob", "--max-drop", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["figures"]["drop"] <= 2.0 + 1e-9
    assert mexify.load(bundle).config.policy["name"] == "maxprob"
    res = run.invoke(app, ["eval", str(bundle), "--data", tiny_data, "--split", "test", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["policies"][0]["name"] == "maxprob"


def test_stage_one_on_a_trained_backbone_is_announced_unless_chosen(tmp_path, tiny_spec, tiny_data, caplog):
    weights = tmp_path / "trained.pth"
    torch.save(_user_model(tiny_spec).state_dict(), weights)
    bundle = tmp_path / "b.mex"
    mexify.convert(tiny_spec, args={"num_classes": 4, "width": 8}, weights=str(weights), exits=3,
                   trace=mexify.TraceConfig((48, 48)), out=str(bundle))
    recipe = {"stage1_iters": 2, "stage2_iters": 0, "batch_size": 4, "crop_size": 48, "num_workers": 0, "precise_bn_iters": 0}
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = mexify.load(bundle)(x)
    with caplog.at_level("WARNING", logger="mexify"):
        api.train(bundle, tiny_data, recipe=recipe)
    assert "retrains it: the final exit will no longer be your model" in caplog.text
    assert "--set stage1_iters=0" in caplog.text
    with torch.no_grad():
        assert not torch.allclose(mexify.load(bundle)(x), before, atol=1e-5)  # what the warning says happened
    caplog.clear()
    with caplog.at_level("WARNING", logger="mexify"):
        api.train(bundle, tiny_data, recipe=recipe, overrides={"stage1_iters": 2})  # chosen: no warning
    assert "retrains it" not in caplog.text
