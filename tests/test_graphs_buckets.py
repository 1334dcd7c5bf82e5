"""CUDA-graph buckets: keyed by batch bucket, input shape and dtype; only a failed capture turns graphs off.

The bookkeeping (which bucket a batch runs in, when one is captured, what the runtime does when
making one fails) runs here on the CPU: a stand-in "capture" records each stage's static outputs
and its "replay" reruns the stage into them, as a replayed CUDA graph writes its static outputs.
The real capture is checked by the tests marked ``cuda`` (they skip without a GPU).
"""
import logging

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mexify.config import HeadConfig
from mexify.graph.adapt import prepare_graph
from mexify.graph.batching import analyze_batch
from mexify.graph.split import split_stages
from mexify.nn import MultiExitModel, build_head
from mexify.runtime import EarlyExitRuntime
from mexify.runtime.graphs import BucketKey, BucketTable, GraphCaptureError, GraphedExits, _Bucket, bucket_of


# --------------------------------------------------------------------- the table alone
class _Maker:
    """Records every key it is asked to make a bucket for; raises ``error`` instead when given one."""

    def __init__(self, error=None):
        self.keys, self.error = [], error

    def __call__(self, key, like):
        self.keys.append(key)
        if self.error is not None:
            raise self.error
        return ("bucket", key)


def test_two_resolutions_get_two_buckets_each_captured_once():
    make = _Maker()
    table = BucketTable(make)
    small, large = torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 24, 32)
    a = table.get(4, small)
    b = table.get(4, large)
    assert a != b
    assert make.keys == [BucketKey(4, (3, 16, 16), torch.float32), BucketKey(4, (3, 24, 32), torch.float32)]
    assert table.get(4, small) is a and table.get(4, large) is b  # reused, not captured again
    assert len(make.keys) == 2 and len(table) == 2
    assert set(table) == set(make.keys) and BucketKey(4, (3, 16, 16), torch.float32) in table


def test_batch_sizes_share_a_bucket_as_bucket_of_says_and_dtypes_do_not():
    make = _Maker()
    table = BucketTable(make)
    x = torch.zeros(1, 3, 8, 8)
    for n in (9, 12, 16, 5, 5):
        table.get(n, x)
    assert [k.size for k in make.keys] == [16, 5]  # 9, 12 and 16 rows run in the bucket of 16
    table.get(5, x.half())
    assert make.keys[-1] == BucketKey(5, (3, 8, 8), torch.float16) and len(table) == 3
    assert BucketTable.key(bucket_of(3), x) == BucketTable.key(3, x)  # a bucket size is its own bucket


@pytest.mark.parametrize("error", [GraphCaptureError("stage 0 cannot be captured"), RuntimeError("shape mismatch")])
def test_a_bucket_that_fails_to_be_made_is_not_recorded_and_is_tried_again(error):
    make = _Maker(error)
    table = BucketTable(make)
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(type(error)) as raised:
        table.get(2, x)
    assert raised.value is error  # not wrapped: a plain RuntimeError stays one
    assert len(table) == 0
    make.error = None
    assert table.get(2, x) == ("bucket", BucketKey(2, (3, 8, 8), torch.float32))
    assert len(make.keys) == 2


# --------------------------------------------------------------------- through the runtime
class _SkipNet(nn.Module):
    """A skip tensor crosses both cuts, so every bucket carries two values per stage."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.a(x)
        y = self.c(self.b(s).relu())
        return self.cls(F.interpolate(y, size=s.shape[-2:]) + s)


def _model():
    torch.manual_seed(0)
    gm = prepare_graph(fx.symbolic_trace(_SkipNet().eval()))
    analyze_batch(gm, (16, 16))
    stages = split_stages(gm, ["a", "relu"])
    heads = {name: build_head(HeadConfig(width=4, blocks=0), 4, 2) for name in ("a", "relu")}
    return MultiExitModel(stages, heads, 2, (16, 16), [1, 1, 1], [1, 1], 3).eval()


class _MeanPolicy:
    """Leaves at exit ``i`` when the mean logit reaches ``thresholds[i]``; tensors only, as a graph needs."""

    name = "mean"
    needs_features = False

    def __init__(self, thresholds):
        self.thresholds = list(thresholds)

    def decide(self, i, logits, features=None):
        score = logits.float().mean((1, 2, 3))
        return score >= self.thresholds[i] if i < len(self.thresholds) else torch.ones_like(score, dtype=torch.bool), score


class _Replay:
    """A captured graph on the CPU: ``replay()`` reruns the step and writes into the static outputs."""

    def __init__(self, run, static):
        self.run, self.static = run, static

    def replay(self):
        for target, value in zip(self.static, self.run()):
            target.copy_(value)


def _tensors(state, mask, decision):
    return [v for v in [*state.values.values(), mask, decision] if isinstance(v, torch.Tensor)]


class _CpuGraphedExits(GraphedExits):
    """GraphedExits whose capture records static outputs on the CPU (see the module docstring)."""

    error = None

    def _capture_bucket(self, key, like):
        if self.error is not None:
            raise self.error
        b = _Bucket(key.size)
        b.x = torch.zeros((key.size, *key.image), dtype=key.dtype)
        b.x.copy_(like[:1].expand_as(b.x))
        for i in range(self.model.num_exits):
            before = b.states[i - 1] if i else self.model.start(b.x)
            state, mask, decision = self._step(i, before)
            b.graphs.append(_Replay(lambda i=i, before=before: _tensors(*self._step(i, before)), _tensors(state, mask, decision)))
            b.states.append(state)
            b.masks.append(mask)
            b.decision.append(decision)
        return b


def _runtimes(error=None):
    """A runtime on the CPU stand-in for graphs and an eager one, with thresholds that split a batch."""
    model = _model()
    x = _images(6, 16)
    with torch.no_grad():
        scores = [z.float().mean((1, 2, 3)) for z in model.forward_all(x, upsample=False)]
    policy = _MeanPolicy([float(scores[0].median()), float(scores[1].median())])
    graphed = EarlyExitRuntime(model, policy, cuda_graphs=False)
    graphed._graphs = _CpuGraphedExits(model, graphed.policy, graphed.active, False, graphed.autocast,
                                       graphed.memory_format, False, graphed._masks)
    graphed._graphs.error = error
    graphed.cuda_graphs = True
    return graphed, EarlyExitRuntime(model, policy, cuda_graphs=False)


def _images(n, side, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g) * torch.linspace(0.2, 4.0, n).view(n, 1, 1, 1)


def _same(a, b):
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.masks, b.masks)
    assert torch.allclose(a.confidence, b.confidence, equal_nan=True)


def test_a_second_resolution_runs_in_its_own_buckets_and_keeps_graphs_on():
    graphed, eager = _runtimes()
    first = graphed.predict_batch(_images(6, 16))
    _same(first, eager.predict_batch(_images(6, 16)))
    assert len(set(first.exit_index.tolist())) >= 2  # rows left early: smaller buckets were used
    second = graphed.predict_batch(_images(6, 24, seed=2))
    _same(second, eager.predict_batch(_images(6, 24, seed=2)))
    _same(graphed.predict_batch(_images(6, 16)), first)  # back to the first size: its buckets again
    assert graphed.cuda_graphs and graphed._graphs is not None
    keys = set(graphed._graphs.buckets)
    assert {k.image for k in keys} == {(3, 16, 16), (3, 24, 24)}
    assert BucketKey(6, (3, 16, 16), torch.float32) in keys and BucketKey(6, (3, 24, 24), torch.float32) in keys


def test_a_failed_capture_switches_graphs_off_once_and_runs_eagerly(caplog):
    graphed, eager = _runtimes(GraphCaptureError("stage 0 cannot be captured: operation not permitted"))
    x = _images(6, 16)
    with caplog.at_level(logging.WARNING, logger="mexify.runtime.engine"):
        result = graphed.predict_batch(x)
    _same(result, eager.predict_batch(x))
    assert graphed._graphs is None and graphed.cuda_graphs is False
    assert "CUDA graphs unavailable" in caplog.text and "operation not permitted" in caplog.text


def test_an_error_that_is_not_a_capture_failure_is_raised_and_graphs_stay_on():
    graphed, _ = _runtimes(RuntimeError("The size of tensor a (24) must match the size of tensor b (16)"))
    graphs = graphed._graphs
    with pytest.raises(RuntimeError, match="must match the size") as raised:
        graphed.predict_batch(_images(2, 16))
    assert not isinstance(raised.value, GraphCaptureError)
    assert graphed._graphs is graphs and graphed.cuda_graphs is True


# --------------------------------------------------------------------- real CUDA graphs
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_serve_two_resolutions():
    model = _model().cuda()
    x16, x24 = _images(6, 16).cuda(), _images(6, 24, seed=2).cuda()
    with torch.no_grad():
        scores = [z.float().mean((1, 2, 3)) for z in model.forward_all(x16, upsample=False)]
    policy = _MeanPolicy([float(scores[0].median()), float(scores[1].median())])
    graphed, eager = EarlyExitRuntime(model, policy), EarlyExitRuntime(model, policy, cuda_graphs=False)
    assert graphed.cuda_graphs
    for x in (x16, x24, x16[:3], x24[:5]):
        g, e = graphed.predict_batch(x), eager.predict_batch(x)
        assert torch.equal(g.exit_index, e.exit_index) and torch.equal(g.masks, e.masks)
    assert graphed.cuda_graphs and {k.image[1:] for k in graphed._graphs.buckets} == {(16, 16), (24, 24)}
