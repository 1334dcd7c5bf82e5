"""Continuous batching across stages: many requests' rows share every stage's batches.

The batched runtime (:class:`~mexify.runtime.EarlyExitRuntime`) shrinks a batch as its images leave,
so its late stages run a few rows each: small, inefficient batches, and nothing refills them. A
service sees a stream of requests instead of fixed batches, so it can do what LLM servers do per
decoding step: :class:`StageScheduler` keeps one queue per stage. A request enters stage 0's queue;
after each stage the rows that leave at its exit are answered at once and the others wait in the
next stage's queue, where they are joined with the rows of other batches (``StageState.join``) into
the next batch of that stage. Every stage keeps running full batches while requests keep coming.

**Which stage runs next** (:func:`next_stage`, one worker thread runs one stage at a time):

1. a stage whose queue holds at least ``max_batch`` rows is *full*; among full stages, the one
   holding the oldest request (by arrival) runs;
2. otherwise a non-empty stage is *due* when its oldest row has waited ``max_wait_ms`` in that queue,
   or (after stage 0) when no earlier stage holds any row that could still join it; among due
   stages, the one holding the oldest request runs;
3. otherwise the worker sleeps until the first row becomes due or a request arrives.

Oldest-request-first finishes in-flight requests before starting new ones (deep stages hold older
requests), which bounds latency; a full batch never waits. A batch takes rows in queue order, up to
``max_batch``: the next batch gathered at a stage splits a group (``select``) where it must.

The stage arithmetic is the engine's, and it is the same call the batched runtime makes
(:meth:`EarlyExitRuntime.step <mexify.runtime.EarlyExitRuntime.step>`, :meth:`Runner.step
<mexify.deploy.Runner.step>`): each request gets the mask, exit and confidence the runtime gives
it. :class:`TorchStages` drives a torch runtime, :class:`OnnxStages` the onnxruntime runner.

Back-pressure: at most ``max_queue`` requests are in the scheduler; :meth:`StageScheduler.submit`
raises :class:`Busy` beyond it (HTTP 429). :meth:`StageScheduler.close` stops accepting (:class:`Closed`,
HTTP 503) and, with ``drain=True``, answers everything already accepted first (no waiting for full
batches then). Every accepted request is answered exactly once: with its result, or with the error
its batch raised.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mexify.errors import MexifyError

__all__ = ["StageScheduler", "Answer", "Busy", "Closed", "QueueView", "next_stage", "TorchStages", "OnnxStages",
           "SchedulerStats"]


class Busy(MexifyError):
    """The scheduler holds ``max_queue`` requests already (back-pressure: try again later)."""


class Closed(MexifyError):
    """The scheduler is shutting down and accepts no new request."""


@dataclasses.dataclass
class Answer:
    """One request's result.

    Attributes:
        mask: labels ``(H, W)`` at the model's input size (int64).
        exit_index: the exit the image left by; ``exit_name`` its name.
        confidence: the policy's confidence there (NaN at the final exit).
        queued_ms: time spent waiting in the stages' queues; ``run_ms``: time in the batches it ran in;
            ``total_ms``: from :meth:`StageScheduler.submit` to the answer.
        batches: the batch size of each stage it ran in (for insight into the batching).
    """

    mask: np.ndarray
    exit_index: int
    exit_name: str
    confidence: float
    queued_ms: float
    run_ms: float
    total_ms: float
    batches: List[int]


@dataclasses.dataclass(frozen=True)
class QueueView:
    """What :func:`next_stage` sees of one stage's queue."""

    rows: int
    oldest_arrival: float = math.inf  # arrival time of the oldest request queued here
    oldest_entered: float = math.inf  # when the row that entered this queue first did so


def next_stage(queues: Sequence[QueueView], now: float, max_batch: int, max_wait_s: float) -> Tuple[Optional[int], Optional[float]]:
    """The scheduling rule (see the module docstring): the stage to run now, or None and when to look again
    (None: when a request arrives).

    Example::

        >>> next_stage([QueueView(2, 1.0, 1.0), QueueView(8, 0.5, 1.2)], now=1.3, max_batch=8, max_wait_s=0.01)
        (1, None)
    """
    full = [i for i, q in enumerate(queues) if q.rows >= max_batch]
    if full:
        return min(full, key=lambda i: queues[i].oldest_arrival), None
    due, wake = [], math.inf
    upstream = 0
    for i, q in enumerate(queues):
        if q.rows:
            if now - q.oldest_entered >= max_wait_s or (i > 0 and upstream == 0):
                due.append(i)
            else:
                wake = min(wake, q.oldest_entered + max_wait_s)
        upstream += q.rows
    if due:
        return min(due, key=lambda i: queues[i].oldest_arrival), None
    return None, (None if math.isinf(wake) else wake)


@dataclasses.dataclass
class _Request:
    image: Any
    future: Future
    arrival: float
    run_s: float = 0.0
    batches: List[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Group:
    """Rows waiting at one stage's queue: requests and (after stage 0) their joint state, in row order."""

    requests: List[_Request]
    state: Any
    entered: float


@dataclasses.dataclass
class SchedulerStats:
    """A snapshot of the scheduler (what ``/metrics`` reports).

    Attributes:
        queue_rows: rows waiting at each stage's queue.
        in_flight: requests accepted and not yet answered.
        answered: requests answered with a result, per exit name; ``failed``: answered with an error;
            ``rejected``: refused by back-pressure.
        batches: batches run per stage; ``rows``: rows run per stage (``rows / batches`` is the mean fill).
        latency_ms: recent answers' total latency (up to the last 4096).
    """

    queue_rows: List[int]
    in_flight: int
    answered: Dict[str, int]
    failed: int
    rejected: int
    batches: List[int]
    rows: List[int]
    latency_ms: List[float]

    def percentiles(self, qs: Sequence[float] = (50, 95, 99)) -> Dict[str, float]:
        if not self.latency_ms:
            return {}
        values = np.percentile(np.asarray(self.latency_ms), list(qs))
        return {f"p{q:g}": float(v) for q, v in zip(qs, values)}


class StageScheduler:
    """Continuous batching across the stages of an early-exit model (see the module docstring).

    Args:
        engine: :class:`TorchStages` or :class:`OnnxStages` (anything with their ``num_exits``,
            ``exit_names``, ``start``, ``step``, ``select`` and ``join``).
        max_batch: most rows a stage runs at once.
        max_wait_ms: how long a row may wait at a stage's queue for the batch to fill.
        max_queue: most requests accepted and not yet answered; :meth:`submit` raises :class:`Busy` beyond.
        clock: seconds, monotonic (tests pass their own).

    Example::

        with StageScheduler(TorchStages(EarlyExitRuntime(model)), max_batch=8, max_wait_ms=2) as s:
            answer = s.submit(image).result()   # image: normalised float32 (3, H, W)
    """

    def __init__(self, engine: Any, *, max_batch: int = 8, max_wait_ms: float = 2.0, max_queue: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        if int(max_batch) < 1 or int(max_queue) < 1 or not float(max_wait_ms) >= 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_ms at least 0")
        self.engine = engine
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self._clock = clock
        e = int(engine.num_exits)
        self._queues: List[Deque[_Group]] = [collections.deque() for _ in range(e)]
        self._cv = threading.Condition()
        self._closing = False
        self._in_flight = 0
        self._answered = [0] * e
        self._failed = self._rejected = 0
        self._batches, self._rows = [0] * e, [0] * e
        self._latency: Deque[float] = collections.deque(maxlen=4096)
        self._thread = threading.Thread(target=self._work, name="mexify-scheduler", daemon=True)
        self._thread.start()

    def __enter__(self) -> "StageScheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ clients
    def submit(self, image: Any) -> Future:
        """Queue one normalised image ``(3, H, W)`` (the model's input size); the future gives its :class:`Answer`.

        Raises:
            Busy: ``max_queue`` requests are in the scheduler already.
            Closed: the scheduler is shutting down.
        """
        future: Future = Future()
        with self._cv:
            if self._closing:
                raise Closed("the service is shutting down", "send the request to another replica or retry later")
            if self._in_flight >= self.max_queue:
                self._rejected += 1
                raise Busy(f"the queue is full ({self.max_queue} requests waiting)", "retry later, or raise --max-queue")
            now = self._clock()
            self._queues[0].append(_Group([_Request(image, future, now)], None, now))
            self._in_flight += 1
            self._cv.notify()
        return future

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting requests; with ``drain``, answer every accepted request first (else fail them with
        :class:`Closed`). Returns when the worker has stopped (or after ``timeout`` seconds)."""
        with self._cv:
            self._closing = True
            if not drain:
                dropped = [r for q in self._queues for g in q for r in g.requests]
                for q in self._queues:
                    q.clear()
                self._in_flight -= len(dropped)
                self._failed += len(dropped)
                for r in dropped:
                    if not r.future.cancelled():
                        r.future.set_exception(Closed("the service shut down before answering"))
            self._cv.notify_all()
        self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> SchedulerStats:
        """A snapshot of queues, counters and recent latencies."""
        with self._cv:
            names = list(self.engine.exit_names)
            return SchedulerStats([sum(len(g.requests) for g in q) for q in self._queues], self._in_flight,
                                  dict(zip(names, self._answered)), self._failed, self._rejected, list(self._batches),
                                  list(self._rows), list(self._latency))

    # ------------------------------------------------------------------ worker
    def _views(self) -> List[QueueView]:
        return [QueueView(sum(len(g.requests) for g in q), min(r.arrival for g in q for r in g.requests), q[0].entered)
                if q else QueueView(0) for q in self._queues]

    def _choose(self) -> Tuple[Optional[int], Optional[float]]:
        """The stage to run now (under the lock); when closing, no stage waits for its batch to fill."""
        views = self._views()
        i, wake = next_stage(views, self._clock(), self.max_batch, self.max_wait_s)
        if i is None and self._closing and any(v.rows for v in views):
            i = min((k for k, v in enumerate(views) if v.rows), key=lambda k: views[k].oldest_arrival)
        return i, wake

    def _take(self, i: int) -> List[_Group]:
        """Up to ``max_batch`` rows from the head of stage ``i``'s queue (splitting the last group if needed)."""
        q, out, rows = self._queues[i], [], 0
        while q and rows < self.max_batch:
            g = q[0]
            room = self.max_batch - rows
            if len(g.requests) <= room:
                out.append(q.popleft())
                rows += len(g.requests)
                continue
            n = len(g.requests)
            head = _Group(g.requests[:room], self.engine.select(i - 1, g.state, np.arange(room), n), g.entered)
            q[0] = _Group(g.requests[room:], self.engine.select(i - 1, g.state, np.arange(room, n), n), g.entered)
            out.append(head)
            rows += room
        return out

    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closing and self._in_flight == 0:
                        return
                    i, wake = self._choose()
                    if i is not None:
                        groups = self._take(i)
                        break
                    self._cv.wait(None if wake is None else max(0.0, wake - self._clock()))
            self._run(i, groups)

    def _run(self, i: int, groups: List[_Group]) -> None:
        """Run stage ``i`` on the joined groups; answer who leaves, queue the rest at stage ``i + 1``."""
        requests = [r for g in groups for r in g.requests]
        n = len(requests)
        t0 = self._clock()
        try:
            if i == 0:
                state = self.engine.start([r.image for r in requests])
            else:
                state = self.engine.join(i - 1, [g.state for g in groups], [len(g.requests) for g in groups])
            leave, masks, conf, rest, stay = self.engine.step(i, state, n)
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error; the service goes on
            self._finish([(r, e) for r in requests])
            return
        t1 = self._clock()
        for r in requests:
            r.run_s += t1 - t0
            r.batches.append(n)
        done = [(requests[int(k)], self._answer(requests[int(k)], i, masks[j], conf[j], t1)) for j, k in enumerate(leave)]
        with self._cv:
            self._batches[i] += 1
            self._rows[i] += n
            if rest is not None:
                kept = [requests[int(k)] for k in (stay if stay is not None else range(n))]
                self._queues[i + 1].append(_Group(kept, rest, t1))
        self._finish(done, exit_index=i)

    def _answer(self, r: _Request, i: int, mask: Any, conf: Any, now: float) -> Answer:
        total = now - r.arrival
        return Answer(np.asarray(mask), i, self.engine.exit_names[i], float(conf), 1000.0 * (total - r.run_s),
                      1000.0 * r.run_s, 1000.0 * total, list(r.batches))

    def _finish(self, done: List[Tuple[_Request, Any]], exit_index: Optional[int] = None) -> None:
        """Resolve futures (outside the lock) and count them."""
        with self._cv:
            self._in_flight -= len(done)
            for _, a in done:
                if isinstance(a, Answer):
                    self._answered[a.exit_index] += 1
                    self._latency.append(a.total_ms)
                else:
                    self._failed += 1
            self._cv.notify_all()
        for r, a in done:
            if r.future.cancelled():  # its client gave up (a cancelled await): nobody to answer
                continue
            if isinstance(a, Answer):
                r.future.set_result(a)
            else:
                r.future.set_exception(a)


class TorchStages:
    """The torch runtime as the scheduler's engine: :meth:`EarlyExitRuntime.step` on joined :class:`StageState` rows.

    CUDA graphs are not used here (a graphed bucket holds one batch's chain of stages; the scheduler
    joins rows of different batches at every stage): stages run eagerly, under the runtime's autocast.
    """

    def __init__(self, runtime: Any):
        import torch

        self._torch = torch
        self.runtime = runtime
        self.num_exits = int(runtime.model.num_exits)
        self.exit_names = list(runtime.model.exit_names)
        #: every row run is recorded in the runtime's stream statistics, as its batch loop records them
        self.stream = runtime.stream

    def start(self, images: Sequence[Any]) -> Any:
        torch = self._torch
        with torch.inference_mode():
            x = torch.stack([torch.as_tensor(im) for im in images]).to(self.runtime.device)
            return self.runtime.model.start(x.contiguous(memory_format=self.runtime.memory_format))

    def select(self, i: int, state: Any, rows: np.ndarray, n: int) -> Any:
        with self._torch.inference_mode():
            return state.select(self._torch.as_tensor(rows, dtype=self._torch.long))

    def join(self, i: int, states: Sequence[Any], sizes: Sequence[int]) -> Any:
        with self._torch.inference_mode():
            return type(states[0]).join(states)

    def step(self, i: int, state: Any, n: int) -> Tuple[np.ndarray, Any, np.ndarray, Any, Optional[np.ndarray]]:
        """Stage ``i`` on ``n`` rows: (rows that left, their masks, their confidence, the rest's state, its rows)."""
        torch, rt = self._torch, self.runtime
        with torch.inference_mode(), rt.autocast():
            s = rt.step(i, state, tuple(state.input_size))
            if s.scores is not None:
                self.stream.observe(i, s.scores)
        leave = s.leave.cpu().numpy()
        self.stream.count(np.full(len(leave), i))
        masks = s.masks.cpu().numpy() if s.masks is not None else None
        conf = s.confidence.float().cpu().numpy() if s.confidence is not None else np.full(len(leave), np.nan, np.float32)
        stay = s.stay.cpu().numpy() if s.stay is not None else None
        return leave, masks, conf, s.state, stay


class OnnxStages:
    """The onnxruntime runner (:class:`mexify.deploy.Runner`) as the scheduler's engine (numpy throughout).

    Args:
        runner: the runner.
        size: the input size every request has (masks are made at it); default the export's.
    """

    def __init__(self, runner: Any, size: Optional[Sequence[int]] = None):
        self.runner = runner
        self.size = tuple(int(s) for s in (size or runner.input_size))
        self.num_exits = len(runner.exit_names)
        self.exit_names = list(runner.exit_names)

    def start(self, images: Sequence[Any]) -> Any:
        return self.runner.start(np.stack([np.asarray(im, dtype=np.float32) for im in images]))

    def select(self, i: int, state: Any, rows: np.ndarray, n: int) -> Any:
        return self.runner.select(i, state, rows, n)

    def join(self, i: int, states: Sequence[Any], sizes: Sequence[int]) -> Any:
        return self.runner.join(i, states, sizes)

    def step(self, i: int, state: Any, n: int) -> Tuple[np.ndarray, Any, np.ndarray, Any, Optional[np.ndarray]]:
        s = self.runner.step(i, state, n, self.size)
        return s.leave, s.masks, s.confidence, s.state, s.stay
