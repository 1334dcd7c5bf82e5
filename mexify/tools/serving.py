"""``mexify serve``: an early-exit model behind HTTP, batched across stages by the stage scheduler.

:class:`Service` is the service without its web framework: it decodes an image body, queues it on a
:class:`~mexify.runtime.scheduler.StageScheduler` (continuous batching across stages), and encodes the
answer; it also renders ``/metrics`` in the Prometheus text format. :func:`asgi_app` puts it behind
Starlette (run by uvicorn on one machine); :mod:`mexify.tools.ray_serving` puts one inside each Ray Serve
replica. The endpoints:

* ``POST /predict``: the body is one image (PNG, JPEG, ...). The answer is the mask as a palette PNG at
  the image's own size (``?format=png``, the default), or JSON with the exit, confidence and timings
  (``?format=json``, or ``Accept: application/json``). Both carry ``X-Mexify-Exit``, ``X-Mexify-Exit-Index``,
  ``X-Mexify-Confidence``, ``X-Mexify-Latency-Ms`` (server side, body read to answer ready),
  ``X-Mexify-Queue-Ms`` and ``X-Mexify-Run-Ms``. A body that is not an image: 400 in one line; a body over
  ``max_body_mb``: 413; a full queue: 429 with ``Retry-After``; shutting down: 503.
* ``GET /healthz``: 200 with the service's settings while it serves, 503 while it drains.
* ``GET /metrics``: answers by exit, rejections, failures, rows queued per stage, batches and rows run
  per stage (the mean batch fill), latency quantiles of recent answers and, when the policy carries
  calibration's record (``policy.monitor``), drift: the mean confidence per exit beside calibration's, the
  exit mix calibration expects, and how many drift tests fail on the images served so far
  (:func:`mexify.runtime.drift_report`; the torch engine tests exit mix and confidence, onnxruntime the
  exit mix). ``/healthz`` lists the findings, and the service logs a warning when drift is first found.

Images are resized to the model's input size as ``mexify predict`` does (:func:`mexify.tools.images.to_tensor`);
masks come back at the image's own size by nearest neighbour.

``--original`` serves the original model the same way (one stage, the same batching and HTTP path):
the baseline a load test divides by. An ONNX export holds no graph of the original, so with the
onnxruntime engine the baseline is the export with every exit off (all stages back to back).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from mexify.bundle import load, read_config
from mexify.data.readers import read_rgb
from mexify.errors import ConfigError, DataError
from mexify.nn import resolve_device
from mexify.runtime import DriftReport, EarlyExitRuntime, StreamMonitor, StreamStats, drift_report
from mexify.runtime.scheduler import Busy, Closed, OnnxStages, StageScheduler, TorchStages
from mexify.tools.benchmark import original_runner
from mexify.tools.engines import ENGINES, OnnxEngine, is_onnx_export
from mexify.tools.images import palette, to_tensor
from mexify.trust import Trust

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "Service", "Reply", "OriginalStages", "build_service", "asgi_app", "run_server"]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How a service batches and what it runs.

    Attributes:
        engine: ``torch`` (a bundle or pt2 export) or ``onnxruntime`` (an ONNX export).
        max_batch: most rows a stage runs at once.
        max_wait_ms: how long a row may wait at a stage for its batch to fill.
        max_queue: most requests in the service; more are answered 429.
        original: serve the original model (the baseline) instead of the early-exit one.
        exit: send every image to this exit (index or name) instead of following the policy.
        size: ``(H, W)`` images are resized to (default: the bundle's input size).
        device: where the torch engine runs (default: cuda if available).
        threads: intra-op threads of the engine (torch's or onnxruntime's; default theirs). On a CPU that also
            decodes requests, one thread fewer than the cores often serves more.
        max_body_mb: largest request body accepted.
    """

    engine: str = "torch"
    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 64
    original: bool = False
    exit: Optional[str] = None
    size: Optional[Tuple[int, int]] = None
    device: Optional[str] = None
    threads: Optional[int] = None
    max_body_mb: float = 32.0

    def check(self) -> "ServeConfig":
        """Raises ConfigError on a value out of range (one line each)."""
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}", f"choose one of {', '.join(ENGINES)}")
        if int(self.max_batch) < 1 or int(self.max_queue) < 1:
            raise ConfigError("--max-batch and --max-queue must be at least 1")
        if not (float(self.max_wait_ms) >= 0 and math.isfinite(float(self.max_wait_ms))):
            raise ConfigError(f"--max-wait-ms must be a number of milliseconds >= 0, got {self.max_wait_ms}")
        if int(self.max_queue) < int(self.max_batch):
            raise ConfigError(f"--max-queue ({self.max_queue}) is below --max-batch ({self.max_batch})",
                              "a batch can never fill; raise --max-queue")
        return self


class OriginalStages:
    """The original model as a one-stage engine of the scheduler: the baseline, batched and served the same way."""

    def __init__(self, masks: Callable[[torch.Tensor], torch.Tensor], device: torch.device, size: Tuple[int, int]):
        self._masks, self._device, self.size = masks, device, tuple(size)
        self.num_exits = 1
        self.exit_names = ["original"]

    def start(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(im) for im in images]).to(self._device)

    def select(self, i: int, state: Any, rows: np.ndarray, n: int) -> Any:  # one stage: rows never wait
        raise AssertionError("a one-stage engine never splits a group")

    join = select

    def step(self, i: int, x: torch.Tensor, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, None, None]:
        masks = self._masks(x).cpu().numpy()
        return np.arange(n), masks, np.full(n, np.nan, np.float32), None, None


@dataclasses.dataclass
class Reply:
    """What the web layer sends back: status, body, media type and headers."""

    status: int
    body: bytes
    media_type: str
    headers: Dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> "Reply":
        return cls(status, json.dumps({"error": message}).encode(), "application/json", headers or {})


class Service:
    """Decode, schedule, encode; plus health and metrics. Framework-free (see the module docstring).

    Args:
        stages: the scheduler's engine (:class:`~mexify.runtime.scheduler.TorchStages`, ``OnnxStages`` or
            :class:`OriginalStages`).
        size: the model's input size ``(H, W)`` every image is resized to.
        config: the batching settings.
        info: what ``/healthz`` reports besides (bundle, engine, policy...).
        expected: calibration's record of the stream (``policy.monitor``) the served images are tested
            against for drift; None: not watched.
    """

    #: requests answered between two drift checks of the log (``/metrics`` and ``/healthz`` check at each call)
    DRIFT_EVERY = 64

    def __init__(self, stages: Any, size: Tuple[int, int], config: ServeConfig, info: Optional[Dict[str, Any]] = None,
                 expected: Optional[Mapping[str, Any]] = None):
        self.config = config
        self.stages = stages
        self.expected = dict(expected) if expected else None
        self._answered, self._drifted = 0, False
        self.size = (int(size[0]), int(size[1]))
        self.scheduler = StageScheduler(stages, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                        max_queue=config.max_queue)
        self.exit_names = list(stages.exit_names)
        self.info = dict(info or {})
        self._palette = palette()

    # ------------------------------------------------------------------ requests
    def decode(self, body: bytes) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """A request body -> the normalised model input and the image's own (width, height).

        Raises:
            DataError: not a readable image.
        """
        if not body:
            raise DataError("the request has no body: POST the image file's bytes")
        image = read_rgb(io.BytesIO(body), "send a PNG or JPEG file as the body", name="in the request body")
        return to_tensor(image, self.size), image.size

    def encode(self, mask: np.ndarray, size: Tuple[int, int]) -> bytes:
        """A mask as a palette PNG (16-bit grey past 256 classes) at ``size`` (width, height), nearest neighbour."""
        if int(mask.max(initial=0)) < 256:
            im = Image.fromarray(mask.astype(np.uint8), mode="P")
            im.putpalette(self._palette)
        else:
            im = Image.fromarray(mask.astype(np.uint16))
        if im.size != tuple(size):
            im = im.resize(tuple(size), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    async def predict(self, body: bytes, as_json: bool = False, with_mask: bool = False) -> Reply:
        """Answer one ``POST /predict`` (never raises for a bad request: it becomes its reply)."""
        t0 = time.perf_counter()  # not loop.time(): uvloop's clock ticks in whole milliseconds
        if len(body) > self.config.max_body_mb * 2**20:
            return Reply.error(413, f"the image is over {self.config.max_body_mb:g} MB")
        try:
            x, own = await asyncio.to_thread(self.decode, body)
            future = self.scheduler.submit(x)
        except DataError as e:
            return Reply.error(400, e.message + (f" ({e.hint})" if e.hint else ""))
        except Busy as e:
            return Reply.error(429, f"{e.message}: retry later", {"Retry-After": "1"})
        except Closed as e:
            return Reply.error(503, e.message)
        try:
            answer = await asyncio.wrap_future(future)
        except Closed as e:
            return Reply.error(503, e.message)
        except Exception as e:  # noqa: BLE001 - the model failed on this batch: a server error, one line
            log.error("a batch failed: %s", e)
            return Reply.error(500, f"the model failed on this request's batch: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self._answered += 1
        if self.expected is not None and self._answered % self.DRIFT_EVERY == 0:
            self._log_drift()
        png = await asyncio.to_thread(self.encode, answer.mask, own) if (with_mask or not as_json) else b""
        headers = self._headers(answer, 1000.0 * (time.perf_counter() - t0))
        if not as_json:
            return Reply(200, png, "image/png", headers)
        doc = {"exit": answer.exit_name, "exit_index": answer.exit_index,
               "confidence": answer.confidence if math.isfinite(answer.confidence) else None,
               "width": own[0], "height": own[1], "batches": answer.batches,
               "timings_ms": {"total": float(headers["X-Mexify-Latency-Ms"]), "queue": answer.queued_ms, "run": answer.run_ms}}
        if with_mask:
            doc["mask_png"] = base64.b64encode(png).decode()
        return Reply(200, json.dumps(doc).encode(), "application/json", headers)

    @staticmethod
    def _headers(answer: Any, total_ms: float) -> Dict[str, str]:
        return {"X-Mexify-Exit": answer.exit_name, "X-Mexify-Exit-Index": str(answer.exit_index),
                "X-Mexify-Confidence": "nan" if not math.isfinite(answer.confidence) else f"{answer.confidence:.6g}",
                "X-Mexify-Latency-Ms": f"{total_ms:.3f}", "X-Mexify-Queue-Ms": f"{answer.queued_ms:.3f}",
                "X-Mexify-Run-Ms": f"{answer.run_ms:.3f}"}

    # ------------------------------------------------------------------ drift
    def stream(self) -> StreamStats:
        """The images served so far: exit mix (and, on the torch engine, confidence per exit)."""
        stream = getattr(self.stages, "stream", None)
        if stream is not None:
            return stream.snapshot()
        answered = self.scheduler.stats().answered
        mon = StreamMonitor(self.exit_names)
        mon.count(np.repeat(np.arange(len(self.exit_names)), [int(answered.get(n, 0)) for n in self.exit_names]))
        return mon.snapshot()

    def drift(self) -> Optional[DriftReport]:
        """The images served so far against calibration's record (None when the policy carries none)."""
        return drift_report(self.stream(), self.expected) if self.expected is not None else None

    def _log_drift(self) -> None:
        report = self.drift()
        if report is None or report.drifted == self._drifted:
            return
        self._drifted = report.drifted
        if report.drifted:
            log.warning("drift: the images served are not like the calibration images (%d served): %s",
                        report.images, "; ".join(report.warnings))
        else:
            log.warning("drift: the images served are like the calibration images again (%d served)", report.images)

    # ------------------------------------------------------------------ health, metrics, shutdown
    def health(self) -> Reply:
        draining = self.scheduler.closed
        doc = {"status": "draining" if draining else "ok", "exits": self.exit_names, "input_size": list(self.size),
               "max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms, "max_queue": self.config.max_queue,
               **self.info}
        report = self.drift()
        if report is not None:
            doc["drift"] = {"images": report.images, "warnings": list(report.warnings), "note": report.note}
        return Reply(503 if draining else 200, json.dumps(doc).encode(), "application/json")

    def metrics(self) -> Reply:
        """The Prometheus text exposition of the scheduler's counters (prometheus_client)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return Reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting; with ``drain``, answer what was accepted first."""
        self.scheduler.close(drain=drain, timeout=timeout)


class _Collector:
    """Reads the scheduler's stats at each scrape."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        st = self.service.scheduler.stats()
        answered = CounterMetricFamily("mexify_answers", "Requests answered, by the exit they left at", labels=["exit"])
        for name, c in st.answered.items():
            answered.add_metric([name], c)
        refused = CounterMetricFamily("mexify_refused", "Requests not answered with a mask, by reason", labels=["reason"])
        refused.add_metric(["queue_full"], st.rejected)
        refused.add_metric(["failed"], st.failed)
        queued = GaugeMetricFamily("mexify_queue_rows", "Rows waiting at each stage's queue", labels=["stage"])
        batches = CounterMetricFamily("mexify_stage_batches", "Batches run per stage", labels=["stage"])
        rows = CounterMetricFamily("mexify_stage_rows", "Rows run per stage (rows / batches = mean batch fill)", labels=["stage"])
        for i, (q, b, r) in enumerate(zip(st.queue_rows, st.batches, st.rows)):
            queued.add_metric([str(i)], q)
            batches.add_metric([str(i)], b)
            rows.add_metric([str(i)], r)
        yield from (answered, refused, queued, batches, rows,
                    GaugeMetricFamily("mexify_in_flight", "Requests accepted and not yet answered", value=st.in_flight))
        latency = Metric("mexify_latency_seconds", "Scheduler latency (submit to answer) of recent answers", "summary")
        for q, v in st.percentiles((50, 95, 99)).items():
            latency.add_sample("mexify_latency_seconds", {"quantile": f"{float(q[1:]) / 100:g}"}, v / 1000.0)
        latency.add_sample("mexify_latency_seconds_count", {}, float(sum(st.answered.values())))
        latency.add_sample("mexify_latency_seconds_sum", {}, sum(st.latency_ms) / 1000.0)
        yield latency
        yield from _drift_metrics(self.service)


def _drift_metrics(service: Service) -> Iterator[Any]:
    """Served images against calibration's record: confidence and exit mix on both sides, failed tests."""
    from prometheus_client.core import GaugeMetricFamily

    report = service.drift()
    if report is None:
        return
    stats, expected = service.stream(), service.expected or {}
    confidence = GaugeMetricFamily("mexify_exit_confidence_mean", "Mean policy confidence of the images that reached an "
                                   "early exit: served, and what calibration saw", labels=["exit", "source"])
    for name, c in stats.confidence.items():
        confidence.add_metric([name, "served"], c["mean"])
    for name, c in (expected.get("confidence") or {}).items():
        confidence.add_metric([name, "calibration"], float(c["mean"]))
    rates = GaugeMetricFamily("mexify_exit_rate_expected", "Share of images calibration sent to each exit", labels=["exit"])
    for name, r in (expected.get("exit_rates") or {}).items():
        rates.add_metric([name], float(r))
    yield confidence
    yield rates
    yield GaugeMetricFamily("mexify_drift_findings", "Drift tests failed on the images served so far (1% family-wise; "
                            "0 also while too few were served, see /healthz)", value=len(report.warnings))


# ---------------------------------------------------------------------- building
def build_service(bundle: Any, config: ServeConfig = ServeConfig(), trust: Trust = Trust(),
                  warn: Callable[[str], None] = log.warning) -> Service:
    """A :class:`Service` over a bundle (or pt2 export) for the torch engine, an ONNX export for onnxruntime.

    Raises:
        ConfigError: a bad setting, or a directory the engine cannot run.
        BundleError: a bundle that cannot be loaded.
    """
    config.check()
    path = Path(bundle)
    if config.engine == "onnxruntime":
        return _onnx_service(path, config, warn)
    if is_onnx_export(path):
        raise ConfigError(f"{path} is an ONNX export", "serve it with --engine onnxruntime, or pass the bundle")
    if config.threads:
        torch.set_num_threads(int(config.threads))
    model = load(path, device=resolve_device(config.device), trust=trust)
    forced: Any = _forced(config.exit)
    if forced is None and model.config.policy is None and not config.original:
        warn("the bundle has no exit policy: every image uses the final exit (run `mexify calibrate` first, or pass --exit N)")
        forced = -1
    rt = EarlyExitRuntime(model, exit=forced)
    size = _check_size(config.size, tuple(model.input_size), model.static_size)
    info = {"bundle": str(path), "engine": "torch", "device": str(rt.device)}
    if config.original:
        masks, note = original_runner(model, rt)
        return Service(OriginalStages(masks, rt.device, size), size, config, {**info, "model": "original", "note": note})
    return Service(TorchStages(rt), size, config, {**info, "model": "multi-exit", "policy": getattr(rt.policy, "name", None)},
                   expected=_drift_record(getattr(rt.policy, "monitor", None), forced, rt.exit_names, warn))


def _drift_record(record: Optional[Mapping[str, Any]], forced: Any, exit_names: Sequence[str],
                  warn: Callable[[str], None]) -> Optional[Mapping[str, Any]]:
    """Calibration's record to watch the served images against: none with a forced exit, and a malformed one is said once."""
    if not record or forced is not None:
        return None
    try:
        drift_report(StreamMonitor(exit_names).snapshot(), record)
    except ConfigError as e:
        warn(f"drift not watched: {e.message}")
        return None
    return record


def _check_size(size: Optional[Tuple[int, int]], default: Tuple[int, int], static: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The size images are resized to: ``--size`` or the bundle's; refused when the graph accepts one size only."""
    size = tuple(int(v) for v in (size or default))
    if static is not None and size != tuple(static):
        h, w = static
        raise ConfigError(f"this bundle's graph accepts {h}x{w} inputs only, not --size {size[0]}x{size[1]}", f"serve it with --size {h}x{w}")
    return size


def _forced(exit: Optional[str]) -> Any:
    return int(exit) if isinstance(exit, str) and exit.lstrip("-").isdigit() else exit


def _onnx_service(path: Path, config: ServeConfig, warn: Callable[[str], None]) -> Service:
    if not is_onnx_export(path):
        raise ConfigError(f"{path} is not an ONNX export", f"run `mexify export {path} -o OUT --format onnx` and serve OUT")
    forced = -1 if config.original else _forced(config.exit)
    if forced is None and not (read_config(path).policy or {}):
        warn("the export has no exit policy: every image uses the final exit (pass --exit N, or calibrate and export again)")
        forced = -1
    runner = OnnxEngine(path, exit=forced, threads=config.threads).runner  # (its one-line error without onnxruntime)
    size = _check_size(config.size, tuple(runner.input_size), runner.static_size)
    info = {"bundle": str(path), "engine": "onnxruntime", "model": "every exit off" if config.original else "multi-exit",
            "policy": runner.policy}
    record = (read_config(path).policy or {}).get("monitor")
    return Service(OnnxStages(runner, size), size, config, info, expected=_drift_record(record, forced, runner.exit_names, warn))


# ---------------------------------------------------------------------- web
def asgi_app(service: Service, drain_timeout: Optional[float] = 30.0) -> Any:
    """The service as a Starlette ASGI app; its shutdown drains the scheduler."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        await asyncio.to_thread(service.close, True, drain_timeout)

    routes = [Route("/predict", _endpoint(service, "predict"), methods=["POST"]),
              Route("/healthz", _endpoint(service, "health"), methods=["GET"]),
              Route("/metrics", _endpoint(service, "metrics"), methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


def _endpoint(service: Service, what: str) -> Callable[[Any], Any]:
    from starlette.responses import Response

    async def endpoint(request: Any) -> Response:
        reply = await handle(service, what, request)
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
    return endpoint


async def handle(service: Service, what: str, request: Any) -> Reply:
    """One request (a Starlette request: the embedded app and Ray Serve replicas both call this)."""
    if what == "health":
        return service.health()
    if what == "metrics":
        return service.metrics()
    fmt = request.query_params.get("format") or ("json" if "application/json" in request.headers.get("accept", "") else "png")
    if fmt not in ("png", "json"):
        return Reply.error(400, f"unknown format {fmt!r}: use format=png or format=json")
    with_mask = request.query_params.get("mask", "0").lower() in ("1", "true", "yes")
    return await service.predict(await request.body(), as_json=fmt == "json", with_mask=with_mask)


def run_server(service: Service, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
               on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve on ``host:port`` with uvicorn until SIGINT/SIGTERM, then drain: no new connection, every request
    accepted is answered (up to ``drain_timeout`` seconds), then the scheduler stops."""
    import uvicorn

    config = uvicorn.Config(asgi_app(service, drain_timeout), host=host, port=int(port), log_level="warning",
                            timeout_graceful_shutdown=int(math.ceil(drain_timeout)), access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    with _stopped_by_signals():
        server.run()


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """uvicorn drains on SIGINT/SIGTERM, then raises the signal again for the handler it found: with this one
    there, a drained server returns normally (exit code 0) instead of dying of the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def bodies_of(images: Sequence[Any]) -> List[bytes]:
    """Encoded images (PNG) from uint8 RGB arrays ``(H, W, 3)`` (what a load test sends)."""
    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(a, dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
