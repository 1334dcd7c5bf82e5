"""The open-loop load tester against stub services on loopback (real HTTP, uvicorn in a thread).

Latency bounds are loose on purpose: the client and the stub share one process on a loaded 2-core
machine. What must hold exactly holds exactly: counts, exit mix, error kinds, the search sequence.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import threading
import time
from typing import Callable, Iterator, List, Optional

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mexify.errors import ConfigError
from mexify.tools.loadtest import LoadReport, _arrival_offsets, check_target, max_rate, run_load

BODIES = [b"\x89PNG-one", b"\x89PNG-two", b"\x89PNG-three"]


class Stub:
    """What a stub service saw and answered (touched only on the server's event loop)."""

    def __init__(self) -> None:
        self.count = 0
        self.exits: collections.Counter = collections.Counter()
        self.bodies: collections.Counter = collections.Counter()
        self.content_types: set = set()
        self.lock: Optional[asyncio.Lock] = None


def _app(handler: Callable) -> Starlette:
    async def healthz(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/predict", handler, methods=["POST"]), Route("/healthz", healthz)])


def latency_app(stub: Stub) -> Starlette:
    """Request n sleeps 150 ms when n % 10 == 0, else 20 ms; exits alternate layer3 / final."""

    async def predict(request: Request) -> Response:
        body = await request.body()
        stub.count += 1
        n = stub.count
        stub.bodies[body] += 1
        stub.content_types.add(request.headers.get("content-type"))
        t0 = time.perf_counter()
        await asyncio.sleep(0.150 if n % 10 == 0 else 0.020)
        ms = (time.perf_counter() - t0) * 1000.0
        name = "layer3" if n % 2 else "final"
        stub.exits[name] += 1
        return Response(b"{}", media_type="application/json", headers={"X-Mexify-Exit": name, "X-Mexify-Latency-Ms": f"{ms:.3f}"})

    return _app(predict)


def capacity_app(stub: Stub) -> Starlette:
    """One request at a time, 10 ms each: at most ~100 answers per second."""

    async def predict(request: Request) -> Response:
        await request.body()
        if stub.lock is None:
            stub.lock = asyncio.Lock()
        async with stub.lock:
            await asyncio.sleep(0.010)
        stub.count += 1
        return Response(b"{}", headers={"X-Mexify-Exit": "final"})

    return _app(predict)


def status_app(stub: Stub, statuses: List[int]) -> Starlette:
    """Request n (from 1) answers ``statuses[(n - 1) % len(statuses)]``."""

    async def predict(request: Request) -> Response:
        await request.body()
        stub.count += 1
        status = statuses[(stub.count - 1) % len(statuses)]
        return Response(b"{}", status_code=status, headers={"X-Mexify-Exit": "final"} if status == 200 else {})

    return _app(predict)


def stalled_app(stub: Stub) -> Starlette:
    """Answers after 1 s (far beyond the client's timeout in the test)."""

    async def predict(request: Request) -> Response:
        await request.body()
        stub.count += 1
        await asyncio.sleep(1.0)
        return Response(b"{}")

    return _app(predict)


@contextlib.contextmanager
def _serving(app: Starlette) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2, backlog=2048)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stub server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Starlette], str]]:
    """``serve(app)`` starts a stub service and returns its base URL; all are stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda app: stack.enter_context(_serving(app))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- HTTP


def test_latency_exit_mix_and_server_time(serve):
    stub = Stub()
    base = serve(latency_app(stub))
    report = run_load(base + "/predict", BODIES, rate=40, requests=100, seed=1, slo_ms=100)
    assert report.url == base
    assert report.sent == report.ok == 100 and report.errors == {}
    # every request reached the stub, bodies cycled, with the content type asked for
    assert stub.count == 100
    assert stub.bodies == {BODIES[0]: 34, BODIES[1]: 33, BODIES[2]: 33}
    assert stub.content_types == {"image/png"}
    assert report.exit_mix == dict(stub.exits) == {"layer3": 50, "final": 50}
    lat = report.latency_ms
    assert set(lat) == {"p50", "p95", "p99", "mean", "max"}
    assert 18 <= lat["p50"] <= 60, lat
    assert lat["p99"] >= 140 and lat["max"] >= 145, lat
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert set(report.server_ms) == {"p50", "p95", "p99"}
    assert 19.5 <= report.server_ms["p50"] <= 40 and report.server_ms["p99"] >= 145, report.server_ms
    # 100 Poisson arrivals at 40/s span ~2.5 s; throughput is ok answers over first send -> last answer
    assert 1.0 < report.duration_s < 10 and report.throughput == pytest.approx(100 / report.duration_s)
    # the 10 slow answers (~150 ms) miss a 100 ms SLO, the fast ones (~20 ms) should not
    assert report.goodput < report.throughput and report.goodput * report.duration_s >= 80
    assert not report.meets(100) and report.meets(1000)
    json.dumps(report.to_dict())


def test_duration_bound_sends_the_scheduled_arrivals(serve):
    stub = Stub()
    base = serve(latency_app(stub))
    report = run_load(base, BODIES[:1], rate=40, duration_s=0.5, seed=3)
    expected = len(_arrival_offsets(40, None, 0.5, 3))
    assert report.sent == report.ok == stub.count == expected
    assert report.goodput == report.throughput  # no SLO: every ok answer counts
    assert report.slo_ms is None


@pytest.mark.slow
def test_open_loop_shows_queueing_past_capacity(serve):
    stub = Stub()
    base = serve(capacity_app(stub))
    light = run_load(base, BODIES, rate=20, requests=20, seed=0)
    heavy = run_load(base, BODIES, rate=300, duration_s=1.5, seed=0, slo_ms=100)
    assert light.ok == light.sent == 20
    assert heavy.ok == heavy.sent and 300 <= heavy.sent <= 600, heavy.sent
    # a closed loop would show ~10 ms here; arrivals at 3x capacity queue up and latency grows with the queue
    assert heavy.latency_ms["p99"] > max(500.0, 10 * light.latency_ms["p99"]), (light.latency_ms, heavy.latency_ms)
    assert heavy.latency_ms["p50"] > 5 * light.latency_ms["p50"]
    assert heavy.throughput <= 110, heavy.throughput
    assert heavy.goodput < 0.5 * heavy.throughput
    assert not heavy.meets(100)


def test_errors_counted_by_kind(serve):
    stub = Stub()
    base = serve(status_app(stub, [200, 200, 429]))  # every third request: queue full
    report = run_load(base, BODIES, rate=100, requests=30, seed=0)
    assert report.sent == 30 and report.errors == {"429": 10} and report.ok == 20
    assert report.exit_mix == {"final": 20}
    assert report.error_rate == pytest.approx(1 / 3)
    assert report.meets(10_000, max_error_rate=0.34) and not report.meets(10_000)

    stub = Stub()
    base = serve(status_app(stub, [200, 400, 429, 503, 500, 502, 404]))
    report = run_load(base, BODIES, rate=100, requests=14, seed=0)
    assert report.ok == 2
    assert report.errors == {"400": 2, "429": 2, "503": 2, "other-5xx": 4, "other-4xx": 2}


def test_timeout_and_connect_errors(serve):
    stub = Stub()
    base = serve(stalled_app(stub))
    t0 = time.perf_counter()
    report = run_load(base, BODIES, rate=50, requests=3, timeout_s=0.2)
    assert time.perf_counter() - t0 < 0.95  # bounded by timeout_s, not by the 1 s answer
    assert report.sent == 3 and report.ok == 0 and report.errors == {"timeout": 3}
    assert report.latency_ms == {} and report.server_ms == {} and report.exit_mix == {}
    assert report.throughput == report.goodput == 0.0 and not report.meets(1e9, max_error_rate=1.0)

    report = run_load(f"http://127.0.0.1:{_free_port()}", BODIES, rate=50, requests=2, timeout_s=5)
    assert report.errors == {"connect": 2} and report.ok == 0


# ------------------------------------------------------------------------------------ no HTTP


def _fake_report(rate: float, p99: float, requests: int = 200) -> LoadReport:
    return LoadReport(url="http://127.0.0.1:1", rate=rate, sent=requests, ok=requests, errors={}, duration_s=requests / rate,
                      throughput=rate, goodput=rate, latency_ms={"p50": p99 / 2, "p95": p99, "p99": p99, "mean": p99 / 2, "max": p99},
                      server_ms={}, exit_mix={}, slo_ms=None)


def test_max_rate_doubles_then_bisects():
    calls = []

    def probe(url, bodies, rate, *, requests, seed, timeout_s, slo_ms):
        calls.append(dict(url=url, requests=requests, seed=seed, timeout_s=timeout_s, slo_ms=slo_ms))
        return _fake_report(rate, 10.0 if rate < 37 else 1000.0, requests)

    best, reports = max_rate("http://127.0.0.1:1", BODIES, slo_ms=50, start=1.0, requests=50, steps=6, seed=7, timeout_s=3, probe=probe)
    rates = [r.rate for r in reports]
    assert rates == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37, 36.5]
    resolution = (64 - 32) / 2**6
    assert best == 36.5 and 37 - resolution <= best < 37
    assert all(c == dict(url="http://127.0.0.1:1", requests=50, seed=7, timeout_s=3, slo_ms=50) for c in calls)


def test_max_rate_edges():
    # errors count too: a fast service that fails 5% of requests does not meet a 1% error budget
    def failing(url, bodies, rate, **kw):
        r = _fake_report(rate, 1.0)
        r.errors = {"429": 10}
        return r

    best, reports = max_rate("http://127.0.0.1:1", BODIES, slo_ms=50, start=5.0, probe=failing)
    assert best == 0.0 and [r.rate for r in reports] == [5.0]
    best, _ = max_rate("http://127.0.0.1:1", BODIES, slo_ms=50, start=5.0, max_error_rate=0.1, probe=failing)
    assert best == 5.0 * 2**20  # never fails: stops doubling
    with pytest.raises(ConfigError):
        max_rate("http://127.0.0.1:1", BODIES, slo_ms=0, probe=failing)
    with pytest.raises(ConfigError):
        max_rate("http://127.0.0.1:1", BODIES, slo_ms=10, start=-1, probe=failing)


def test_check_target_local_only(monkeypatch):
    assert check_target("http://127.0.0.1:1234") == "http://127.0.0.1:1234"
    assert check_target("http://localhost:1234/predict") == "http://localhost:1234"
    assert check_target("http://127.0.0.2:1234/predict/") == "http://127.0.0.2:1234"
    assert check_target("http://[::1]:80") == "http://[::1]:80"
    assert check_target("https://127.0.0.1:8443/mexify/predict") == "https://127.0.0.1:8443/mexify"
    assert check_target(f"http://{socket.gethostname()}:8000/") == f"http://{socket.gethostname()}:8000"
    for url in ("http://example.com", "http://example.com:8000/predict", "ftp://127.0.0.1", "127.0.0.1:8000", "http://:80",
                "http://127.0.0.1:notaport"):
        with pytest.raises(ConfigError) as err:
            check_target(url)
        assert "\n" not in str(err.value) and err.value.hint, url
    with pytest.raises(ConfigError, match="example.com is neither") as err:
        check_target("http://example.com")
    assert "--allow-remote" in err.value.hint

    def no_network(*args, **kwargs):
        raise AssertionError("check_target must not touch the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert check_target("http://example.com/predict", allow_remote=True) == "http://example.com"
    with pytest.raises(ConfigError):
        check_target("ftp://example.com", allow_remote=True)


def test_run_load_argument_errors():
    url = f"http://127.0.0.1:{_free_port()}"
    for kwargs in (dict(rate=0, requests=1), dict(rate=-3, requests=1), dict(rate=float("nan"), requests=1), dict(rate=10),
                   dict(rate=10, requests=0), dict(rate=10, duration_s=0), dict(rate=10, requests=1, timeout_s=0)):
        with pytest.raises(ConfigError):
            run_load(url, BODIES, **kwargs)
    with pytest.raises(ConfigError, match="no request bodies"):
        run_load(url, [], 10, requests=1)
    with pytest.raises(ConfigError):
        run_load("ftp://127.0.0.1:1", BODIES, 10, requests=1)

    async def inside_a_loop():
        run_load(url, BODIES, 10, requests=1)

    with pytest.raises(RuntimeError, match="event loop"):
        asyncio.run(inside_a_loop())


def test_arrivals_are_poisson_and_bounded():
    offsets = _arrival_offsets(100.0, 4000, None, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and len(offsets) == 4000 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.01, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential gaps: coefficient of variation 1
    np.testing.assert_array_equal(offsets, _arrival_offsets(100.0, 4000, None, seed=0))
    assert not np.array_equal(offsets, _arrival_offsets(100.0, 4000, None, seed=1))
    by_time = _arrival_offsets(100.0, None, 5.0, seed=0)
    assert np.all(by_time < 5.0) and 400 <= len(by_time) <= 600
    np.testing.assert_array_equal(by_time, offsets[: len(by_time)])  # the same stream, cut by time
    assert len(_arrival_offsets(100.0, 50, 5.0, seed=0)) == 50
    assert len(_arrival_offsets(1.0, 1, None, seed=0)) == 1
