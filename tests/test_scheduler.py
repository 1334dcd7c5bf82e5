"""The stage scheduler: each request gets the runtime's answer, whatever it was batched with; the
scheduling rule; no request lost or answered twice; back-pressure, errors and shutdown."""
import random
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest
import torch

import mexify
from mexify.bundle import update_bundle
from mexify.policies import build_policy
from mexify.runtime import EarlyExitRuntime
from mexify.runtime.scheduler import Busy, Closed, OnnxStages, QueueView, StageScheduler, TorchStages, next_stage

FIXTURES = Path(__file__).parent / "fixture_models.py"


# ------------------------------------------------------------------------------ the rule
def test_a_full_stage_runs_first_and_the_oldest_request_breaks_ties():
    qs = [QueueView(8, 5.0, 5.0), QueueView(3, 1.0, 5.0), QueueView(8, 2.0, 5.5)]
    assert next_stage(qs, now=5.6, max_batch=8, max_wait_s=1.0) == (2, None)  # full beats older-but-partial
    qs = [QueueView(8, 2.0, 5.0), QueueView(8, 1.0, 5.5)]
    assert next_stage(qs, now=5.6, max_batch=8, max_wait_s=1.0)[0] == 1


def test_a_partial_batch_waits_up_to_max_wait_unless_nothing_upstream_can_fill_it():
    # stage 0 has 2 rows that entered at t=10: not due before 10.005
    assert next_stage([QueueView(2, 10.0, 10.0), QueueView(0)], now=10.002, max_batch=8, max_wait_s=0.005) == (None, 10.005)
    assert next_stage([QueueView(2, 10.0, 10.0), QueueView(0)], now=10.006, max_batch=8, max_wait_s=0.005) == (0, None)
    # a deep stage with nothing upstream cannot fill by waiting: it runs at once
    assert next_stage([QueueView(0), QueueView(0), QueueView(3, 9.0, 10.0)], now=10.0, max_batch=8, max_wait_s=0.005) == (2, None)
    # ... but waits while an earlier stage still holds rows that will join it
    assert next_stage([QueueView(1, 9.9, 10.0), QueueView(0), QueueView(3, 9.0, 10.0)], now=10.001, max_batch=8,
                      max_wait_s=0.005) == (None, 10.005)
    # among due stages the oldest request goes first
    qs = [QueueView(2, 9.5, 9.0), QueueView(2, 9.0, 9.0)]
    assert next_stage(qs, now=10.0, max_batch=8, max_wait_s=0.005) == (1, None)
    assert next_stage([QueueView(0), QueueView(0)], now=1.0, max_batch=8, max_wait_s=0.005) == (None, None)


# ------------------------------------------------------------------------------ a stub engine
class Planned:
    """A numpy engine: an image is ``[id, exit]``; rows leave at their planned exit. Records every batch."""

    def __init__(self, num_exits=4, gate=None, fail_on=None):
        self.num_exits = num_exits
        self.exit_names = [f"e{i}" for i in range(num_exits - 1)] + ["final"]
        self.batches = []
        self.gate, self.fail_on = gate, fail_on

    def start(self, images):
        return np.stack([np.asarray(im) for im in images])

    def select(self, i, state, rows, n):
        assert len(state) == n
        return state[rows]

    def join(self, i, states, sizes):
        assert [len(s) for s in states] == list(sizes)
        return np.concatenate(states)

    def step(self, i, state, n):
        if self.gate is not None:
            self.gate.wait()
        self.batches.append((i, state[:, 0].tolist()))
        if self.fail_on is not None and self.fail_on in state[:, 0]:
            raise RuntimeError(f"bad row {self.fail_on}")
        go = (state[:, 1] == i) | (i == self.num_exits - 1)
        leave, stay = np.flatnonzero(go), np.flatnonzero(~go)
        masks = np.repeat(state[leave, :1, None], 2, axis=2)  # a 1x2 "mask" holding the id
        rest = state[stay] if stay.size else None
        return leave, masks, state[leave, 0].astype(np.float32) / 100, rest, (stay if leave.size and stay.size else None)


def test_every_request_is_answered_once_with_its_own_result_under_mixed_arrivals():
    eng = Planned()
    rng = random.Random(0)
    plan = [(k, rng.randrange(4)) for k in range(120)]
    futures = {}
    with StageScheduler(eng, max_batch=8, max_wait_ms=1, max_queue=200) as s:
        def client(part):
            for k, e in part:
                futures[k] = s.submit(np.array([k, e]))
                time.sleep(rng.random() * 0.002)
        threads = [threading.Thread(target=client, args=(plan[j::4],)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait(list(futures.values()), timeout=30)
        stats = s.stats()
    for k, e in plan:
        a = futures[k].result(timeout=0)
        assert a.exit_index == e and int(a.mask[0, 0]) == k and a.confidence == pytest.approx(k / 100)
        assert len(a.batches) == e + 1 and a.total_ms >= a.run_ms >= 0
    # each row ran once per stage up to its exit, never twice, in batches of at most max_batch
    runs = [(i, k) for i, ids in eng.batches for k in ids]
    assert len(runs) == len(set(runs)) == sum(e + 1 for _, e in plan)
    assert max(len(ids) for _, ids in eng.batches) <= 8
    assert sum(stats.answered.values()) == 120 and stats.in_flight == 0 and stats.failed == 0


def test_rows_of_different_batches_are_joined_and_partial_groups_split():
    gate = threading.Event()
    eng = Planned(gate=gate)
    with StageScheduler(eng, max_batch=4, max_wait_ms=50, max_queue=64) as s:
        futures = [s.submit(np.array([k, 0 if k % 4 == 0 else 2])) for k in range(12)]
        gate.set()
        wait(futures, timeout=30)
    # stage 0 ran full batches of 4, each leaving 3 survivors; stage 1 filled its batches of 4 from them,
    # splitting the second group, and ran the last row alone once nothing upstream could join it
    stage0 = [ids for i, ids in eng.batches if i == 0]
    assert stage0 == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    stage1 = [ids for i, ids in eng.batches if i == 1]
    assert stage1 == [[1, 2, 3, 5], [6, 7, 9, 10], [11]]
    assert all(f.result().exit_index == (0 if k % 4 == 0 else 2) for k, f in enumerate(futures))


def test_a_full_queue_answers_busy_and_shutdown_drains():
    gate = threading.Event()
    eng = Planned(gate=gate)
    s = StageScheduler(eng, max_batch=2, max_wait_ms=0, max_queue=5)
    futures = [s.submit(np.array([k, 2])) for k in range(5)]
    with pytest.raises(Busy, match="queue is full"):
        s.submit(np.array([99, 0]))
    assert s.stats().rejected == 1
    threading.Timer(0.2, gate.set).start()
    s.close(drain=True, timeout=30)  # waits for the gate, then answers everything accepted
    assert all(f.done() and f.result().exit_index == 2 for f in futures)
    with pytest.raises(Closed):
        s.submit(np.array([100, 0]))


def test_shutdown_without_draining_fails_what_is_queued():
    gate = threading.Event()
    eng = Planned(gate=gate)
    s = StageScheduler(eng, max_batch=1, max_wait_ms=0, max_queue=10)
    futures = [s.submit(np.array([k, 3])) for k in range(4)]
    time.sleep(0.1)  # the worker holds the first row at the gate
    threading.Timer(0.2, gate.set).start()
    s.close(drain=False, timeout=30)
    outcomes = [f.exception(timeout=5) for f in futures]
    assert sum(isinstance(o, Closed) for o in outcomes) >= 3  # only the row in flight may finish


def test_a_request_its_client_gave_up_on_does_not_stop_the_service():
    gate = threading.Event()
    eng = Planned(gate=gate)
    with StageScheduler(eng, max_batch=2, max_wait_ms=0) as s:
        futures = [s.submit(np.array([k, 1])) for k in range(4)]
        assert futures[1].cancel()  # what asyncio.wrap_future does when the awaiting request is cancelled
        gate.set()
        wait([f for k, f in enumerate(futures) if k != 1], timeout=30)
        later = s.submit(np.array([9, 0])).result(timeout=30)
        assert s.stats().in_flight == 0
    assert [f.result().exit_index for k, f in enumerate(futures) if k != 1] == [1, 1, 1] and later.exit_index == 0


def test_a_failing_batch_answers_its_requests_with_the_error_and_the_service_goes_on():
    eng = Planned(fail_on=3)
    with StageScheduler(eng, max_batch=1, max_wait_ms=0) as s:
        futures = [s.submit(np.array([k, 1])) for k in range(6)]
        wait(futures, timeout=30)
        assert s.stats().failed == 1
    assert isinstance(futures[3].exception(), RuntimeError)
    assert [f.result().exit_index for k, f in enumerate(futures) if k != 3] == [1] * 5


# ------------------------------------------------------------------------------ real engines
def _images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g) * torch.linspace(0.2, 4.0, n).view(n, 1, 1, 1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """TinyUNet (skips across every cut) with sharpened heads and thresholds sending images out at two exits."""
    out = tmp_path_factory.mktemp("sched") / "unet.mex"
    torch.manual_seed(0)
    mexify.api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=mexify.api.TraceConfig((64, 64)), exits=3, out=str(out))
    model = mexify.load(out)
    with torch.no_grad():
        for head in model.heads.values():
            list(m for m in head.modules() if isinstance(m, torch.nn.Conv2d))[-1].weight.mul_(40.0)
        outs = model.forward_all(_images(32), upsample=False)
    p = build_policy("maxprob").with_thresholds([0.0] * (model.num_exits - 1))
    th = [float(p.scores(0, outs[0]).quantile(0.66)), float(p.scores(1, outs[1]).quantile(0.5))] + [float("inf")]
    p = p.with_thresholds(th)
    p.exit_names = list(model.exit_names)
    update_bundle(out, model=model, policy=p.to_dict())
    return out


def _burst_and_trickle(scheduler, x):
    """Half the images in one burst, the rest one by one at random moments from two threads."""
    futures = [None] * len(x)
    half = len(x) // 2
    for k in range(half):
        futures[k] = scheduler.submit(x[k])
    rng = random.Random(1)

    def trickle(ks):
        for k in ks:
            time.sleep(rng.random() * 0.003)
            futures[k] = scheduler.submit(x[k])

    threads = [threading.Thread(target=trickle, args=(range(half + j, len(x), 2),)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f.result(timeout=60) for f in futures]


def test_torch_engine_answers_as_the_runtime_does_on_each_image_alone(bundle):
    rt = EarlyExitRuntime(mexify.load(bundle))
    x = _images(32)
    alone = [rt.predict_batch(x[k:k + 1]) for k in range(len(x))]
    with StageScheduler(TorchStages(rt), max_batch=4, max_wait_ms=2) as s:
        answers = _burst_and_trickle(s, x)
    exits = [a.exit_index for a in answers]
    assert exits == [int(r.exit_index[0]) for r in alone]
    assert len(set(exits)) >= 3  # early exits really taken
    for a, r in zip(answers, alone):
        assert np.array_equal(a.mask, r.masks[0].numpy())
        if a.exit_index < rt.model.num_exits - 1:
            assert a.confidence == pytest.approx(float(r.confidence[0]), abs=1e-6)
    assert max(max(a.batches) for a in answers) > 1  # rows really ran together


def test_onnxruntime_engine_answers_as_the_runner_does_on_each_image_alone(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    from mexify.deploy import Runner
    from mexify.tools.export import export_bundle

    export_bundle(bundle, tmp_path / "onnx", "onnx")
    runner = Runner(tmp_path / "onnx")
    x = _images(24, seed=2).numpy()
    alone = [runner.predict(x[k:k + 1]) for k in range(len(x))]
    with StageScheduler(OnnxStages(runner), max_batch=4, max_wait_ms=2) as s:
        answers = _burst_and_trickle(s, x)
    assert [a.exit_index for a in answers] == [int(r.exit_index[0]) for r in alone]
    assert len({a.exit_index for a in answers}) >= 2
    for a, r in zip(answers, alone):
        assert np.array_equal(a.mask, r.masks[0])
    assert max(max(a.batches) for a in answers) > 1
