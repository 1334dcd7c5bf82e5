"""Early-exit runtime: same masks as choosing offline, batch shrinking in input order, real skipping."""
from pathlib import Path

import pytest
import torch

import mexify
from mexify.errors import ConfigError
from mexify.policies import build_policy
from mexify.api import evaluate_policy
from mexify.runtime import EarlyExitRuntime, FixedExit, predict

FIXTURES = Path(__file__).parent / "fixture_models.py"
SCENES = "synthetic:scenes?size=64&classes=4&n=16&n_eval=8"




@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """TinyUNet at 64x64 with 3 early exits (4 in all); skip tensors cross every cut."""
    out = tmp_path_factory.mktemp("rt") / "tiny.mex"
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.TraceConfig((64, 64)), exits=3, out=str(out))
    return out


@pytest.fixture()
def model(bundle):
    return mexify.load(bundle)


def _images(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    # per-image scale spreads the heads' confidence so thresholds split the batch
    scale = torch.linspace(0.2, 4.0, n).view(n, 1, 1, 1)
    return torch.randn(n, 3, 64, 64, generator=g) * scale


class Counter:
    """Counts forward calls and the batch sizes seen by a module (a forward hook)."""

    def __init__(self, module):
        self.sizes = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.sizes.append(int(args[0].shape[0])))

    @property
    def calls(self):
        return len(self.sizes)


class Planned:
    """A policy that sends input row r to exit ``plan[r]``; it follows the rows still in the batch
    itself, which holds only if the runtime shrinks the batch keeping input order."""

    name = "planned"
    needs_features = False

    def __init__(self, plan):
        self.plan = list(plan)
        self.alive = list(range(len(plan)))
        self.seen = []

    def decide(self, i, logits, features=None):
        assert logits.shape[0] == len(self.alive)
        self.seen.append((i, logits.shape[0]))
        go = torch.tensor([self.plan[r] == i for r in self.alive])
        self.alive = [r for r, g in zip(self.alive, go.tolist()) if not g]
        return go, torch.arange(len(go), dtype=torch.float32)


def _midpoints(scores, q):
    """A threshold halfway between two neighbouring scores, so no image sits on it."""
    s = torch.sort(scores).values
    k = min(max(int(q * len(s)), 1), len(s) - 1)
    return float((s[k - 1] + s[k]) / 2)


def test_runtime_matches_offline_choice_with_same_policy(model, monkeypatch):
    x = _images()
    with torch.no_grad():
        native = model.forward_all(x, upsample=False)
        logits = model.forward_all(x)
    # heads answer at their features' resolution; the policy scores there
    assert [tuple(z.shape[-2:]) for z in native[:-1]] != [(64, 64)] * 3
    pol = build_policy("maxprob")
    scores = [pol.scores(i, z) for i, z in enumerate(native)]
    # exit 1 disabled: its head must not even be evaluated
    pol = pol.with_thresholds([_midpoints(scores[0], 0.6), float("inf"), _midpoints(scores[2], 0.5)])
    pol.exit_names = list(model.exit_names)

    # offline: every exit on the whole batch, first exit whose decide says yes
    first = torch.full((x.shape[0],), model.num_exits - 1)
    for i in reversed(range(model.num_exits)):
        go, _ = pol.decide(i, native[i])
        first[go] = i
    want = torch.stack([logits[int(e)][r].argmax(0) for r, e in enumerate(first)])
    assert len(set(first.tolist())) >= 3, "thresholds should spread the images over exits"

    counters = {n: Counter(model.heads[n]) for n in model.exit_names[:-1]}
    import mexify.runtime.engine as engine

    resized = []
    real_resize = engine.resize_logits
    monkeypatch.setattr(engine, "resize_logits", lambda z, size: resized.append(int(z.shape[0])) or real_resize(z, size))
    res = EarlyExitRuntime(model, pol).predict_batch(x)
    # only the images that leave are upsampled, once each
    assert sum(resized) == 8 and len(resized) == len(set(first.tolist()))
    assert torch.equal(res.exit_index, first)
    assert torch.equal(res.masks, want)
    assert counters[model.exit_names[1]].calls == 0
    # heads only see the images still in the batch
    assert counters[model.exit_names[0]].sizes == [8]
    assert counters[model.exit_names[2]].sizes == [int((first >= 2).sum())]
    # confidences are the policy's at the exit taken; FLOPs skip the disabled head
    # (the final exit decides nothing: it is scored only when asked)
    scored = EarlyExitRuntime(model, pol, final_confidence=True).predict_batch(x)
    assert torch.equal(scored.masks, res.masks)
    for r, e in enumerate(first.tolist()):
        assert scored.confidence[r] == pytest.approx(float(scores[e][r]), rel=1e-5, abs=1e-6)
        if e < model.num_exits - 1:
            assert res.confidence[r] == scored.confidence[r]
        else:
            assert torch.isnan(res.confidence[r])
    full = [model.cost_to_exit(i) for i in range(model.num_exits)]
    assert res.flops[first == 0].tolist() == [full[0]] * int((first == 0).sum())
    assert all(f == full[int(e)] - model.head_flops[1] for f, e in zip(res.flops.tolist(), first.tolist()) if e >= 2)


def test_batch_shrinking_returns_results_in_input_order(model):
    x = _images(seed=2)
    plan = [3, 0, 2, 0, 1, 3, 1, 2]
    with torch.no_grad():
        logits = model.forward_all(x)
    pol = Planned(plan)
    stages = [Counter(s) for s in model.stages]
    preds = predict(model, x, policy=pol)
    assert [p.exit_index for p in preds] == plan
    assert [p.exit_name for p in preds] == [model.exit_names[e] for e in plan]
    for r, p in enumerate(preds):
        assert torch.equal(p.mask, logits[plan[r]][r].argmax(0)), f"row {r} got another image's mask"
    # each stage ran once, on the images that had not left yet
    assert [c.sizes for c in stages] == [[8], [6], [4], [2]]
    assert pol.seen == [(0, 8), (1, 6), (2, 4)]  # the final exit takes the rest without asking


def test_stages_after_the_exit_point_are_not_run(model):
    x = _images(4)
    stages = [Counter(s) for s in model.stages]
    heads = [Counter(model.heads[n]) for n in model.exit_names[:-1]]
    preds = predict(model, x, policy=Planned([0, 1, 0, 1]))
    assert [p.exit_index for p in preds] == [0, 1, 0, 1]
    assert [c.calls for c in stages] == [1, 1, 0, 0]
    assert [c.sizes for c in heads] == [[4], [2], []]


def test_forced_exit(model):
    x = _images(4)
    with torch.no_grad():
        logits = model.forward_all(x)
    stages = [Counter(s) for s in model.stages]
    heads = [Counter(model.heads[n]) for n in model.exit_names[:-1]]
    preds = predict(model, x, exit=1)
    assert [p.exit_index for p in preds] == [1] * 4
    assert all(torch.equal(p.mask, logits[1][r].argmax(0)) for r, p in enumerate(preds))
    assert [c.calls for c in stages] == [1, 1, 0, 0]
    assert [c.calls for c in heads] == [0, 1, 0], "only the forced exit's head runs"
    assert preds[0].flops == sum(model.stage_flops[:2]) + model.head_flops[1]
    by_name = predict(model, x, exit=model.exit_names[2])
    assert {p.exit_index for p in by_name} == {2}
    final = predict(model, x, exit=-1)
    assert all(torch.equal(p.mask, logits[-1][r].argmax(0)) for r, p in enumerate(final))
    assert final[0].flops == sum(model.stage_flops)
    with pytest.raises(ConfigError, match="no exit named"):
        predict(model, x, exit="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        FixedExit(7, model.num_exits)


def test_policy_from_the_bundle_and_missing_policy(bundle, tmp_path):
    import shutil

    from mexify.bundle import update_bundle

    model = mexify.load(bundle)
    with pytest.raises(ConfigError, match="no exit policy") as exc:
        EarlyExitRuntime(model)
    assert "mexify calibrate" in exc.value.hint
    copy = tmp_path / "with_policy.mex"
    shutil.copytree(bundle, copy)
    pol = build_policy("maxprob").with_thresholds([0.0, 0.0, 0.0])  # everything leaves at exit 0
    pol.exit_names = list(model.exit_names)
    update_bundle(copy, policy=pol.to_dict())
    m2 = mexify.load(copy)
    preds = EarlyExitRuntime(m2).predict(_images(3))
    assert [p.exit_index for p in preds] == [0, 0, 0]
    wrong = build_policy("maxprob").with_thresholds([0.5, 0.5])
    with pytest.raises(ConfigError, match="thresholds"):
        EarlyExitRuntime(m2, wrong)
    with pytest.raises(ConfigError, match="cannot run at inference"):
        EarlyExitRuntime(m2, build_policy("oracle"))


def test_class_means_masks_come_from_the_class_means(model):
    x = _images(6, seed=3)
    y = torch.randint(0, 4, (6, 64, 64))
    pol = build_policy("class-means").collect_means(model, [(x, y)], 4)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_all(x)
    s0 = pol.scores(0, logits[0], feats[0])
    pol = pol.with_thresholds([_midpoints(s0, 0.5), float("inf"), float("inf")])
    res = EarlyExitRuntime(model, pol).predict_batch(x)
    early = res.exit_index == 0
    assert 0 < int(early.sum()) < 6
    want = pol.probabilities(0, logits[0], feats[0]).argmax(1)
    assert torch.equal(res.masks[early], want[early])
    assert torch.equal(res.masks[~early], logits[-1][~early].argmax(1))


def test_evaluate_policy_final_exit_matches_evaluate(model):
    from mexify.data import build_dataset
    from mexify.tools.evaluation import evaluate

    ds = build_dataset(SCENES, split="val")
    rep = evaluate(model, ds, batch_size=4, num_workers=0)
    res = evaluate_policy(model, ds, policy=FixedExit(-1, model.num_exits), batch_size=3)
    assert res.miou == pytest.approx(rep.final.miou, abs=1e-9)
    assert res.exit_rates == (0.0, 0.0, 0.0, 1.0)
    assert res.mean_flops == pytest.approx(sum(model.stage_flops))
    pol = build_policy("maxprob").with_thresholds([0.0, 0.0, 0.0])
    res0 = evaluate_policy(model, ds, policy=pol, batch_size=3, limit=5)
    assert res0.exit_rates[0] == 1.0 and res0.num_images == 5
    assert res0.miou == pytest.approx(evaluate(model, ds, batch_size=5, limit=5, num_workers=0).exits[0].miou, abs=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runtime_on_cuda(model):
    x = _images(4)
    with torch.no_grad():
        logits = model.forward_all(x)
    model.cuda()
    # a policy with Python-side state cannot be captured in a CUDA graph: the eager CUDA path
    preds = EarlyExitRuntime(model, Planned([0, 3, 1, 3]), cuda_graphs=False).predict(x)
    assert preds[0].mask.is_cuda
    for r, e in enumerate([0, 3, 1, 3]):
        assert preds[r].exit_index == e
        agree = (preds[r].mask.cpu() == logits[e][r].argmax(0)).float().mean()
        assert agree > 0.99


def _spread_policy(model, x, name="maxprob"):
    """A fitted-looking policy whose thresholds spread ``x`` over the exits (midpoints of their scores)."""
    with torch.no_grad():
        native = model.forward_all(x, upsample=False)
    pol = build_policy(name, **({"pixel_threshold": 0.3} if name == "mess" else {}))  # random heads are unsure
    scores = [pol.scores(i, z) for i, z in enumerate(native)]
    pol = pol.with_thresholds([_midpoints(scores[0], 0.3), float("inf"), _midpoints(scores[2], 0.5)][: model.num_exits - 1])
    pol.exit_names = list(model.exit_names)
    return pol


def _same_result(a, b):
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.masks.cpu(), b.masks.cpu())
    assert torch.allclose(a.confidence, b.confidence, atol=1e-6, equal_nan=True)


def test_graph_options_are_checked_on_the_cpu(model):
    with pytest.raises(ConfigError, match="CUDA graphs need"):
        EarlyExitRuntime(model, exit=0, cuda_graphs=True)
    with pytest.raises(ConfigError, match="unknown dtype"):
        EarlyExitRuntime(model, exit=0, dtype="int8")
    rt = EarlyExitRuntime(model, exit=0)
    assert rt.cuda_graphs is False and rt.dtype == "float32"
    # bfloat16 autocast and channels_last run on the CPU too, and mostly agree with float32
    x = _images(4)
    ref = EarlyExitRuntime(model, exit=-1).predict_batch(x)
    fast = EarlyExitRuntime(model, exit=-1, dtype="bfloat16", channels_last=True).predict_batch(x)
    assert (fast.masks == ref.masks).float().mean() > 0.9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["maxprob", "mess"])
def test_cuda_graphs_give_the_eager_masks(bundle, policy):
    model = mexify.load(bundle, device="cuda")
    x = _images(8).cuda()
    pol = _spread_policy(model, x, policy)
    graphed = EarlyExitRuntime(model, pol)
    assert graphed.cuda_graphs
    eager = EarlyExitRuntime(model, pol, cuda_graphs=False)
    for n in (8, 5, 3, 1, 8):  # several buckets, padded rows, shrinking into smaller buckets, reuse
        g, e = graphed.predict_batch(x[:n]), eager.predict_batch(x[:n])
        _same_result(g, e)
    assert len(set(eager.predict_batch(x).exit_index.tolist())) >= 2
    assert graphed._graphs is not None and {1, 3, 5, 8} <= {key.size for key in graphed._graphs.buckets}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["BatchSizeNet", "TokenNet", "SequenceFirstNet"])
def test_cuda_graphs_follow_batch_dependent_values(name, tmp_path):
    torch.manual_seed(0)
    mexify.convert(f"{FIXTURES}:{name}", trace=mexify.TraceConfig((32, 32)), exits=3, out=str(tmp_path / "b"))
    model = mexify.load(tmp_path / "b", device="cuda")
    x = torch.randn(6, 3, 32, 32, device="cuda") * torch.linspace(0.2, 4.0, 6, device="cuda").view(6, 1, 1, 1)
    pol = _spread_policy(model, x)
    _same_result(EarlyExitRuntime(model, pol).predict_batch(x), EarlyExitRuntime(model, pol, cuda_graphs=False).predict_batch(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_and_channels_last_agree_with_float32(bundle):
    model = mexify.load(bundle, device="cuda")
    x = _images(8).cuda()
    pol = _spread_policy(model, x)
    ref = EarlyExitRuntime(model, pol, cuda_graphs=False).predict_batch(x)
    fast = EarlyExitRuntime(mexify.load(bundle, device="cuda"), pol, dtype="bfloat16", channels_last=True).predict_batch(x)
    same_exit = fast.exit_index == ref.exit_index
    assert same_exit.float().mean() >= 0.75
    assert (fast.masks[same_exit.cuda()] == ref.masks[same_exit.cuda()]).float().mean() > 0.95


def test_batch_buckets():
    from mexify.runtime.graphs import bucket_of

    assert [bucket_of(n) for n in (0, 1, 5, 8, 9, 16, 17, 33)] == [1, 1, 5, 8, 16, 16, 24, 40]


def test_what_each_graph_holds_runs_on_the_cpu(model):
    """The step a CUDA graph captures (stage, head, decision, every row's mask) gives the eager
    runtime's decisions and masks; checked here without a GPU, on the eager step itself."""
    x = _images(8)
    pol = _spread_policy(model, x)
    rt = EarlyExitRuntime(model, pol, final_confidence=True)
    from mexify.runtime.graphs import GraphedExits

    step = GraphedExits(model, rt.policy, rt.active, False, rt.autocast, rt.memory_format, True, rt._masks)
    with torch.inference_mode():
        state = model.start(x)
        outs = []
        for i in range(model.num_exits):
            state, mask, decision = step._step(i, state)
            outs.append((mask, decision))
    assert outs[1] == (None, None)  # switched-off exit: its head and decision are not in the graph
    first = torch.full((8,), model.num_exits - 1)
    for i in reversed(range(model.num_exits - 1)):
        if outs[i][1] is not None:
            first[outs[i][1][0] > 0.5] = i
    res = rt.predict_batch(x)
    assert torch.equal(res.exit_index, first)
    for r, e in enumerate(first.tolist()):
        assert torch.equal(res.masks[r], outs[e][0][r])
        assert res.confidence[r] == pytest.approx(float(outs[e][1][1][r]), abs=1e-6)
