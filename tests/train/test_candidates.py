"""Head candidates (`convert --heads`): every candidate trains in stage 2 on one backbone pass per batch."""
from pathlib import Path

import pytest
import torch

import mexify
from mexify.api import train

TINY_SPEC = str(Path(__file__).resolve().parent / "tiny_seg.py") + ":tiny"
TINY_DATA = "synthetic:scenes?classes=4&size=48&n=48&n_eval=16"


@pytest.fixture
def candidates_bundle(tmp_path):
    out = tmp_path / "cand.mex"
    mexify.api.convert(TINY_SPEC, args={"num_classes": 4, "width": 8}, exits=3, trace=mexify.api.TraceConfig((48, 48)), out=str(out), heads="mess")
    return out


def test_stage2_trains_every_candidate_with_one_backbone_pass_per_batch(candidates_bundle, quick, tmp_path, monkeypatch):
    model = mexify.load(candidates_bundle)
    assert {len(v) for v in model.candidates.values()} == {4}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"stage": [0] * model.num_exits, "candidate": {}}

    def count_stage(i):
        def hook(module, args, out):
            calls["stage"][i] += 1
        return hook

    def count_candidate(key):
        def hook(module, args, out):
            calls["candidate"][key] = calls["candidate"].get(key, 0) + 1
        return hook

    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(count_stage(i))
    for name, cands in model.candidates.items():
        for k, head in enumerate(cands):
            head.register_forward_hook(count_candidate((name, k)))
    monkeypatch.setattr(mexify.api, "load", lambda *a, **k: model)  # train this instance (its hooks count)
    iters = 3
    report = train(candidates_bundle, TINY_DATA, overrides=quick(stage1_iters=0, stage2_iters=iters, precise_bn_iters=0),
                   out=tmp_path / "out.mex",
                   device="cpu", run_dir=tmp_path / "run")  # no precise-BN passes: only training batches counted
    assert calls["stage"] == [iters] * model.num_exits  # the frozen backbone ran once per batch
    assert len(calls["candidate"]) == 12 and set(calls["candidate"].values()) == {iters}
    after = model.state_dict()
    for name, cands in model.candidates.items():
        for k in range(len(cands)):
            w = f"candidates.{name}.{k}.classifier.weight"
            assert not torch.equal(before[w], after[w]), f"candidate {k} of {name} did not train"
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("stages."))
    # one CE and one distillation loss per candidate
    losses = report.stages[0].final_losses
    assert sum(1 for k in losses if k.startswith("ce/") and "#" in k) == 12
    assert sum(1 for k in losses if k.startswith("kd/")) == 12
    # the trained candidates are in the written bundle
    again = mexify.load(tmp_path / "out.mex")
    for k, v in again.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_unknown_head_space_and_bad_yaml_are_refused(tmp_path):
    from mexify.errors import ConfigError

    with pytest.raises(ConfigError, match="mess-fcn"):
        mexify.api.convert(TINY_SPEC, args={"num_classes": 4}, exits=2, trace=mexify.api.TraceConfig((48, 48)), heads="mess-fnc")
    bad = tmp_path / "space.yaml"
    bad.write_text("- {template: mess, blockz: 2}\n")
    with pytest.raises(ConfigError, match="blocks"):
        mexify.api.convert(TINY_SPEC, args={"num_classes": 4}, exits=2, trace=mexify.api.TraceConfig((48, 48)), heads=str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("candidates:\n  - {template: fcn}\n  - {template: mess, blocks: 2, width: 16}\n")
    result = mexify.api.convert(TINY_SPEC, args={"num_classes": 4}, exits=2, trace=mexify.api.TraceConfig((48, 48)), heads=str(good))
    assert [c.template for c in result.config.exits[0].candidates] == ["fcn", "mess"]
    assert result.config.exits[0].candidates[1].width == 16


def test_stage1_trains_every_candidate_end_to_end(candidates_bundle, quick, tmp_path):
    before = mexify.load(candidates_bundle).state_dict()
    report = train(candidates_bundle, TINY_DATA, overrides=quick(stage1_iters=2, stage2_iters=0, precise_bn_iters=0),
                   out=tmp_path / "s1.mex", device="cpu", run_dir=tmp_path / "run")
    assert report.stages[0].stage == 1
    assert sum(1 for k in report.stages[0].final_losses if k.startswith("ce/") and "#" in k) == 12
    after = mexify.load(tmp_path / "s1.mex").state_dict()
    changed = [k for k in before if k.endswith("classifier.weight") and k.startswith("candidates.") and not torch.equal(before[k], after[k])]
    assert len(changed) == 12  # every candidate, not just the active heads
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("stages."))  # the backbone trains too
