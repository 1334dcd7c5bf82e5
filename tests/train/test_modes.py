"""Training runs the model's own train mode: dropout and stochastic depth active, BatchNorm statistics
updated in stage 1 and fixed in stage 2; where a trace cannot represent train mode, stage 1 is refused."""
from pathlib import Path

import pytest
import torch

import mexify
from mexify.api import train
from mexify.errors import TrainingError

FIXTURES = Path(__file__).resolve().parents[1] / "fixture_models.py"
DATA = "synthetic:scenes?classes=3&size=32&n=16&n_eval=4"
QUICK = {"batch_size": 4, "crop_size": 32, "checkpoint_every": 100, "log_every": 1, "precise_bn_iters": 0}


def _bn_stats(model):
    return {k: v.clone() for k, v in model.stages.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def _changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture
def bundle(tmp_path, request):
    out = tmp_path / "s.mex"
    mexify.convert(f"{FIXTURES}:StochasticNet", trace=mexify.TraceConfig((32, 32), method=request.param), exits=2, out=str(out))
    return out


@pytest.mark.parametrize("bundle", ["fx", "export"], indirect=True)
def test_bundle_trains_in_its_own_train_mode(bundle, tmp_path):
    model = mexify.load(bundle)
    assert model.train_issue == ""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x)), "dropout and stochastic depth are active in train mode"
        model.eval()
        assert torch.equal(model(x), model(x))
    before = _bn_stats(model)
    s1 = tmp_path / "s1.mex"
    train(bundle, DATA, overrides={**QUICK, "stage1_iters": 3, "stage2_iters": 0}, out=s1, device="cpu")
    after_s1 = _bn_stats(mexify.load(s1))
    assert len(_changed(before, after_s1)) == len(before) > 0, "stage 1 updates every BatchNorm's statistics"
    s2 = tmp_path / "s2.mex"
    train(s1, DATA, overrides={**QUICK, "stage1_iters": 0, "stage2_iters": 3}, out=s2, device="cpu")
    assert _changed(after_s1, _bn_stats(mexify.load(s2))) == [], "stage 2 keeps the frozen backbone's statistics"


@pytest.mark.parametrize("bundle", ["export"], indirect=True)
def test_a_bundle_without_a_train_mode_graph_refuses_stage_1_and_trains_stage_2(bundle, tmp_path, monkeypatch):
    from mexify import prepare

    monkeypatch.setattr(prepare, "_train_graph", lambda *a: (None, "the model cannot be traced in train mode: (test)"))
    assert "cannot be traced in train mode" in mexify.load(bundle).train_issue
    with pytest.raises(TrainingError, match="stage 1 .* cannot train this bundle: the model cannot be traced") as exc:
        train(bundle, DATA, overrides={**QUICK, "stage1_iters": 2, "stage2_iters": 1}, out=tmp_path / "x.mex", device="cpu")
    assert "stage1_iters=0" in exc.value.hint
    before = _bn_stats(mexify.load(bundle))
    out = tmp_path / "h.mex"
    train(bundle, DATA, overrides={**QUICK, "stage1_iters": 0, "stage2_iters": 3}, out=out, device="cpu")
    trained = mexify.load(out)
    assert _changed(before, _bn_stats(trained)) == []
    heads_before = mexify.load(bundle).heads.state_dict()
    assert any(not torch.equal(v, trained.heads.state_dict()[k]) for k, v in heads_before.items()), "heads trained"


def test_heads_survive_in_place_changes_of_their_features_by_later_stages():
    from mexify.prepare import check_train_mode

    result = mexify.convert(f"{FIXTURES}:InplaceAfterExitNet", trace=mexify.TraceConfig((32, 32)), at=["blocks_0_1", "blocks_1_1", "blocks_2_1"])
    model = result.model
    assert check_train_mode(model, (32, 32)) == "" and model.train_issue == ""
    model.train()
    sum(o.mean() for o in model.forward_all(torch.randn(2, 3, 32, 32))).backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_conversion_under_no_grad_still_checks_training_with_gradients():
    import mexify

    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            result = mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((32, 32)), exits=2)
        assert result.model.train_issue == "", mode.__name__
