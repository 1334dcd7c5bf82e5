"""``mexify loadtest``: an open-loop HTTP load tester for the ``mexify serve`` service.

Open loop against closed loop. A *closed-loop* tester keeps N clients, each sending its next
request only when its previous answer came back. When the service slows down the clients slow
down with it: fewer requests arrive exactly when the service is struggling, the queue the service
would really build never forms, and every request that *would* have been sent during a stall is
simply never timed. The latencies it reports are those of a service that was never overloaded
("coordinated omission": the tester coordinates with the system under test and omits the bad
samples). Real users do not wait for each other; they arrive on their own schedule.

An *open-loop* tester, this one, fixes the arrival times in advance (a Poisson process at
``rate`` requests per second: exponential gaps from ``numpy.random.default_rng(seed)``) and sends
each request at its scheduled time as its own task, however many are still outstanding. If the
service cannot keep up, its queue grows and latency grows with it, which is what this tool is
for: finding the arrival rate a service can sustain within a latency SLO (:func:`max_rate`).
Latency is measured from the request's *scheduled* send time to the full body received, so a
client that falls behind its own schedule (a busy event loop) cannot hide latency either.

The service contract: ``POST {base}/predict`` with the image bytes as body; a 200 answer carries
``X-Mexify-Exit`` (the exit taken) and ``X-Mexify-Latency-Ms`` (server-side time); 429 means the
queue is full, 400 a bad image, 503 shutting down; ``GET {base}/healthz`` answers 200 when up.
Answers other than 200 and failed requests are counted by kind in :attr:`LoadReport.errors`.

Only HTTP over ``httpx.AsyncClient``: proxies from the environment are ignored (a load test
through a proxy measures the proxy), and the client allows :data:`MAX_CONNECTIONS` connections so
that requests do not queue on the client side. :func:`run_load` and :func:`max_rate` are
synchronous (they run their own event loop with ``asyncio.run``): call them from plain code or a
worker thread, never from inside a running event loop. :func:`check_target` is the guard the CLI
applies first: traffic goes to this machine only unless the user says otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import math
import socket
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import httpx
import numpy as np

from mexify.errors import ConfigError

__all__ = ["LoadReport", "check_target", "run_load", "max_rate", "MAX_CONNECTIONS"]

#: connections the client may open at once (a request beyond them waits on the client, timed)
MAX_CONNECTIONS = 1000
#: doublings :func:`max_rate` tries before it stops (a service that passes start * 2**20 is fast enough)
_MAX_DOUBLINGS = 20


@dataclasses.dataclass
class LoadReport:
    """What one :func:`run_load` run measured. Times in milliseconds unless named ``_s``.

    Attributes:
        url: the service's base URL (without ``/predict``).
        rate: requested arrivals per second.
        sent: requests sent.
        ok: 200 answers.
        errors: failed requests by kind: ``"429"`` (queue full), ``"400"`` (bad image), ``"503"``
            (shutting down), ``"other-4xx"``, ``"other-5xx"``, ``"status-<code>"`` (anything else
            but 200), ``"timeout"`` (no full answer within ``timeout_s``), ``"connect"`` (no
            connection), ``"transport"`` (the connection broke), ``"other"``.
        duration_s: first send to last answer.
        throughput: ok answers per second over ``duration_s``.
        goodput: ok answers within ``slo_ms`` per second over ``duration_s`` (== throughput when
            ``slo_ms`` is None).
        latency_ms: p50, p95, p99, mean and max of the ok answers, client side: from the scheduled
            send time to the full body received; ``{}`` when nothing succeeded.
        server_ms: p50, p95, p99 of the ``X-Mexify-Latency-Ms`` headers, ``{}`` when none came.
        exit_mix: ``X-Mexify-Exit`` counts of the ok answers.
        slo_ms: the latency SLO goodput was counted against, or None.
        max_send_lag_ms: the most a request was sent after its scheduled time; large values mean
            the client could not keep up with ``rate`` (its latency is still counted from the schedule).
    """

    url: str
    rate: float
    sent: int
    ok: int
    errors: Dict[str, int]
    duration_s: float
    throughput: float
    goodput: float
    latency_ms: Dict[str, float]
    server_ms: Dict[str, float]
    exit_mix: Dict[str, int]
    slo_ms: Optional[float]
    max_send_lag_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        """Failed requests over sent requests (0.0 when nothing was sent)."""
        return sum(self.errors.values()) / self.sent if self.sent else 0.0

    def meets(self, slo_ms: float, max_error_rate: float = 0.01) -> bool:
        """Whether the run meets an SLO.

        Args:
            slo_ms: the most the client-side p99 latency may be.
            max_error_rate: the largest share of failed requests allowed.

        Returns:
            True when something was answered, p99 <= ``slo_ms`` and errors / sent <= ``max_error_rate``.
        """
        if not self.sent or "p99" not in self.latency_ms:
            return False
        return self.latency_ms["p99"] <= slo_ms and self.error_rate <= max_error_rate

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain JSON-safe values, with ``error_rate`` added."""
        out = dataclasses.asdict(self)
        out["error_rate"] = self.error_rate
        return out


def _split_url(url: str) -> Tuple[urllib.parse.SplitResult, str]:
    """Parse ``url`` and return it with its normalised base (scheme, host, port, path without ``/predict``).

    Raises:
        ConfigError: not an http(s) URL with a host and a valid port.
    """
    try:
        parts = urllib.parse.urlsplit(str(url).strip())
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"loadtest target {url!r} is not a valid URL: {e}", "pass a base URL such as http://127.0.0.1:8000") from e
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"loadtest sends HTTP only: {url!r} has scheme {parts.scheme or 'none'!r}",
                          "pass a base URL such as http://127.0.0.1:8000")
    if not parts.hostname:
        raise ConfigError(f"loadtest target {url!r} has no host", "pass a base URL such as http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/predict"):
        path = path[: -len("/predict")].rstrip("/")
    return parts, f"{parts.scheme}://{parts.netloc}{path}"


def _own_addresses() -> Tuple[Set[str], Set[str]]:
    """This machine's names (lower case) and the addresses its host name resolves to."""
    names = {"localhost"}
    addresses: Set[str] = set()
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addresses.add(str(info[4][0]).split("%", 1)[0])
    except (OSError, UnicodeError):
        pass  # an unresolvable host name: loopback and the names above still count
    return names, addresses


def _is_local(host: str) -> bool:
    """Whether ``host`` (a name or an address, no brackets) is loopback or this machine."""
    host = host.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_loopback or ip.is_unspecified:  # 0.0.0.0 / :: connect to this machine
            return True
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None and mapped.is_loopback:
            return True
    names, addresses = _own_addresses()
    return host in names or (ip is not None and any(ip == ipaddress.ip_address(a) for a in addresses))


def check_target(url: str, allow_remote: bool = False) -> str:
    """Check where a load test may send traffic and return the normalised base URL.

    A load test floods its target, so by default it goes to this machine only: a loopback address
    (127.0.0.0/8, ::1, ``localhost``), an unspecified address (0.0.0.0, ::, which connect here),
    this machine's host name or an address it resolves to. Nothing is sent or resolved for the
    target itself.

    Args:
        url: the service's base URL; a URL ending in ``/predict`` is accepted and cut back to the base.
        allow_remote: allow any host (the user owns it).

    Returns:
        ``scheme://host[:port][/prefix]`` without ``/predict`` or a trailing slash.

    Raises:
        ConfigError: not http(s), no host, or a host that is not this machine while ``allow_remote`` is False.
    """
    parts, base = _split_url(url)
    if not allow_remote and not _is_local(parts.hostname or ""):
        raise ConfigError(f"loadtest sends traffic to loopback or this machine only: {parts.hostname} is neither",
                          "pass --allow-remote if you own that host")
    return base


def _check_load_args(bodies: Sequence[bytes], rate: float, requests: Optional[int], duration_s: Optional[float],
                     timeout_s: float, slo_ms: Optional[float]) -> None:
    """Raise :class:`ConfigError` on arguments :func:`run_load` cannot run with."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ConfigError(f"loadtest rate must be a positive number of requests per second, got {rate!r}", "pass e.g. --rate 20")
    if len(bodies) == 0:
        raise ConfigError("loadtest has no request bodies to send", "pass at least one image")
    if requests is None and duration_s is None:
        raise ConfigError("loadtest needs a bound: neither requests nor duration_s was given", "pass --requests N or --duration SECONDS")
    if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int) or requests < 1):
        raise ConfigError(f"loadtest requests must be a whole number >= 1, got {requests!r}", "pass e.g. --requests 200")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"loadtest duration_s must be positive, got {duration_s!r}", "pass e.g. --duration 10")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"loadtest timeout_s must be positive, got {timeout_s!r}", "pass e.g. --timeout 30")
    if slo_ms is not None and not slo_ms > 0:
        raise ConfigError(f"loadtest slo_ms must be positive, got {slo_ms!r}", "pass e.g. --slo-ms 100")


def _arrival_offsets(rate: float, requests: Optional[int], duration_s: Optional[float], seed: int) -> np.ndarray:
    """Scheduled send times in seconds from the start: 0, then exponential gaps of mean ``1 / rate``.

    Bounded by ``requests`` and/or by ``duration_s`` (every send time < ``duration_s``).
    """
    rng = np.random.default_rng(seed)
    if duration_s is None:
        return np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, size=int(requests) - 1))])
    cap = math.inf if requests is None else requests
    offsets = np.zeros(1)
    while offsets[-1] < duration_s and len(offsets) < cap:
        gaps = rng.exponential(1.0 / rate, size=int(min(rate * duration_s, cap)) + 16)
        offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(gaps)])
    offsets = offsets[offsets < duration_s]
    return offsets if requests is None else offsets[:requests]


def _status_kind(status: int) -> Optional[str]:
    """The error kind of an HTTP status, None for 200."""
    if status == 200:
        return None
    if status in (400, 429, 503):
        return str(status)
    if 400 <= status < 500:
        return "other-4xx"
    if 500 <= status < 600:
        return "other-5xx"
    return f"status-{status}"


@dataclasses.dataclass
class _Outcome:
    """One request: its error kind (None when ok), times (perf_counter seconds) and headers."""

    kind: Optional[str]
    scheduled: float
    started: float
    done: float
    exit: Optional[str] = None
    server_ms: Optional[float] = None


async def _one(client: httpx.AsyncClient, url: str, body: bytes, content_type: str, scheduled: float, timeout_s: float) -> _Outcome:
    """Send one request and wait (at most ``timeout_s``) for its full answer."""
    started = time.perf_counter()
    try:
        response = await asyncio.wait_for(client.post(url, content=body, headers={"Content-Type": content_type}), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return _Outcome("timeout", scheduled, started, time.perf_counter())
    except httpx.ConnectError:
        return _Outcome("connect", scheduled, started, time.perf_counter())
    except httpx.TransportError:
        return _Outcome("transport", scheduled, started, time.perf_counter())
    except httpx.HTTPError:
        return _Outcome("other", scheduled, started, time.perf_counter())
    done = time.perf_counter()
    kind = _status_kind(response.status_code)
    if kind is not None:
        return _Outcome(kind, scheduled, started, done)
    server_ms = None
    try:
        server_ms = float(response.headers["X-Mexify-Latency-Ms"])
    except (KeyError, ValueError):
        pass
    return _Outcome(None, scheduled, started, done, response.headers.get("X-Mexify-Exit"), server_ms)


async def _drive(url: str, bodies: Sequence[bytes], offsets: np.ndarray, timeout_s: float, content_type: str) -> Tuple[float, List[_Outcome]]:
    """Send request ``i`` at ``start + offsets[i]`` as its own task (open loop); wait for every answer.

    Returns:
        The start time (perf_counter seconds) and the outcomes in send order.
    """
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
        tasks: List[asyncio.Task] = []
        start = time.perf_counter()
        for i, offset in enumerate(offsets.tolist()):
            scheduled = start + offset
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))  # always yields: due tasks start sending
            tasks.append(asyncio.create_task(_one(client, url, bodies[i % len(bodies)], content_type, scheduled, timeout_s)))
        outcomes = list(await asyncio.gather(*tasks))
    return start, outcomes


def _percentiles(values: Sequence[float], extra: bool) -> Dict[str, float]:
    """p50, p95, p99 (numpy's linear interpolation), with mean and max when ``extra``; ``{}`` when empty."""
    if len(values) == 0:
        return {}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
    out = {"p50": p50, "p95": p95, "p99": p99}
    if extra:
        out.update(mean=float(a.mean()), max=float(a.max()))
    return out


def _summarise(url: str, rate: float, start: float, outcomes: List[_Outcome], slo_ms: Optional[float]) -> LoadReport:
    """Fold the outcomes of one run into a :class:`LoadReport`."""
    errors: Dict[str, int] = {}
    exit_mix: Dict[str, int] = {}
    latencies: List[float] = []
    server: List[float] = []
    for o in outcomes:
        if o.kind is not None:
            errors[o.kind] = errors.get(o.kind, 0) + 1
            continue
        latencies.append((o.done - o.scheduled) * 1000.0)
        if o.server_ms is not None:
            server.append(o.server_ms)
        if o.exit is not None:
            exit_mix[o.exit] = exit_mix.get(o.exit, 0) + 1
    duration = max((o.done for o in outcomes), default=start) - start
    per_s = 1.0 / duration if duration > 0 else 0.0
    good = len(latencies) if slo_ms is None else sum(1 for ms in latencies if ms <= slo_ms)
    lag = max(((o.started - o.scheduled) * 1000.0 for o in outcomes), default=0.0)
    return LoadReport(url=url, rate=float(rate), sent=len(outcomes), ok=len(latencies), errors=dict(sorted(errors.items())),
                      duration_s=duration, throughput=len(latencies) * per_s, goodput=good * per_s,
                      latency_ms=_percentiles(latencies, extra=True), server_ms=_percentiles(server, extra=False),
                      exit_mix=dict(sorted(exit_mix.items())), slo_ms=slo_ms, max_send_lag_ms=max(0.0, lag))


def run_load(url: str, bodies: Sequence[bytes], rate: float, *, requests: Optional[int] = None, duration_s: Optional[float] = None,
             seed: int = 0, timeout_s: float = 30.0, slo_ms: Optional[float] = None, content_type: str = "image/png") -> LoadReport:
    """Send Poisson arrivals at ``rate`` to ``POST {url}/predict`` (open loop) and measure the answers.

    Each request is sent at its scheduled time as its own task, whatever is still outstanding
    (see the module docstring). Synchronous: it runs its own event loop with ``asyncio.run``, so
    it must not be called from inside a running event loop (use a worker thread there). The URL
    is normalised but not checked against :func:`check_target`: the caller does that.

    Args:
        url: the service's base URL (a URL ending in ``/predict`` is accepted).
        bodies: request bodies (encoded images), cycled.
        rate: arrivals per second (exponential gaps of mean ``1 / rate``).
        requests: send at most this many requests.
        duration_s: send only during the first ``duration_s`` seconds.
        seed: the seed of the arrival times.
        timeout_s: the most one request may take, connection included.
        slo_ms: count goodput against this latency; None: goodput == throughput.
        content_type: the ``Content-Type`` of every request.

    Returns:
        The :class:`LoadReport` of the run (after every answer came or timed out).

    Raises:
        ConfigError: a bad URL, ``rate <= 0``, no bodies, neither ``requests`` nor ``duration_s``,
            or another argument out of range.
        RuntimeError: called from inside a running event loop.
    """
    _, base = _split_url(url)
    bodies = list(bodies)
    _check_load_args(bodies, rate, requests, duration_s, timeout_s, slo_ms)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_load runs its own event loop: call it from a thread without a running loop (e.g. loop.run_in_executor)")
    offsets = _arrival_offsets(float(rate), requests, duration_s, seed)
    start, outcomes = asyncio.run(_drive(base + "/predict", bodies, offsets, float(timeout_s), content_type))
    return _summarise(base, rate, start, outcomes, slo_ms)


def warm_up(url: str, bodies: Sequence[bytes], requests: int = 32, timeout_s: float = 60.0) -> None:
    """Untimed requests before a measurement: ``requests`` one after another, then as many at once (so that
    the service has run its first batches of every size it will see: lazy initialisation, allocator growth,
    kernel selection). Their answers are not looked at; a service that is down fails later, in the runs."""
    if requests < 1:
        return
    _, base = _split_url(url)
    bodies = list(bodies)

    async def go() -> None:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False, limits=httpx.Limits(max_connections=MAX_CONNECTIONS)) as client:
            post = lambda k: client.post(base + "/predict", content=bodies[k % len(bodies)])  # noqa: E731
            for k in range(requests):
                with contextlib.suppress(httpx.HTTPError):
                    await post(k)
            await asyncio.gather(*(post(k) for k in range(requests)), return_exceptions=True)

    asyncio.run(go())


def max_rate(url: str, bodies: Sequence[bytes], slo_ms: float, *, start: float = 1.0, requests: int = 200, max_error_rate: float = 0.01,
             steps: int = 6, seed: int = 0, timeout_s: float = 30.0,
             probe: Callable[..., LoadReport] = run_load) -> Tuple[float, List[LoadReport]]:
    """The highest arrival rate whose run meets the SLO (p99 <= ``slo_ms``, errors <= ``max_error_rate``).

    Doubles the rate from ``start`` until a run fails, then bisects ``steps`` times between the
    last passing and the first failing rate; the answer is within ``(fail - pass) / 2**steps`` of
    the true limit (for a service whose pass/fail is monotone in rate). Stops doubling after
    ``start * 2**20`` still passes and returns that. Every run uses the same ``seed`` and ``requests``.

    Args:
        url: the service's base URL.
        bodies: request bodies, cycled.
        slo_ms: the p99 latency a run must stay within.
        start: the first rate tried.
        requests: requests per run.
        max_error_rate: the largest share of failed requests a passing run may have.
        steps: bisection steps after the first failure.
        seed: the arrival-time seed of every run.
        timeout_s: the most one request may take.
        probe: the function that runs one load test, called as ``probe(url, bodies, rate,
            requests=, seed=, timeout_s=, slo_ms=)``; :func:`run_load` (injectable for tests).

    Returns:
        The best passing rate (0.0 when even ``start`` fails) and every run's report, in order.

    Raises:
        ConfigError: ``slo_ms``, ``start``, ``requests`` or ``steps`` out of range (and whatever ``probe`` raises).
    """
    if not (math.isfinite(slo_ms) and slo_ms > 0) or not (math.isfinite(start) and start > 0):
        raise ConfigError(f"max_rate needs a positive slo_ms and start rate, got slo_ms={slo_ms!r}, start={start!r}", "pass e.g. --slo-ms 100")
    if requests < 1 or steps < 0:
        raise ConfigError(f"max_rate needs requests >= 1 and steps >= 0, got requests={requests!r}, steps={steps!r}", "pass e.g. --requests 200")
    reports: List[LoadReport] = []

    def passes(rate: float) -> bool:
        report = probe(url, bodies, rate, requests=requests, seed=seed, timeout_s=timeout_s, slo_ms=slo_ms)
        reports.append(report)
        return report.meets(slo_ms, max_error_rate)

    if not passes(start):
        return 0.0, reports
    good, bad = start, None
    for _ in range(_MAX_DOUBLINGS):
        if not passes(good * 2):
            bad = good * 2
            break
        good *= 2
    if bad is None:
        return good, reports
    for _ in range(steps):
        mid = (good + bad) / 2
        if passes(mid):
            good = mid
        else:
            bad = mid
    return good, reports


@dataclasses.dataclass
class LoadtestReport:
    """``mexify loadtest``: the service's runs, and the baseline's (the original model served the same way).

    Attributes:
        url: the service's base URL; ``baseline_url``: the baseline's, or None.
        slo_ms: the p99 target of a rate search, or None (one run at ``rate``).
        runs: the service's runs (one, or every step of the search); ``baseline_runs``: the baseline's.
        best_rate: the highest rate meeting ``slo_ms`` (a search), else None; ``baseline_best_rate`` likewise.
        ratio: service over baseline: the best rates' ratio (a search), or the p50 latencies'
            (baseline over service) at the same rate; None without a baseline.
    """

    url: str
    baseline_url: Optional[str]
    slo_ms: Optional[float]
    runs: List[LoadReport]
    baseline_runs: List[LoadReport]
    best_rate: Optional[float] = None
    baseline_best_rate: Optional[float] = None
    ratio: Optional[float] = None

    @property
    def final(self) -> LoadReport:
        """The service's run that answers the question: the best passing run of a search, else the only run."""
        return _best_run(self.runs, self.best_rate)

    @property
    def baseline_final(self) -> Optional[LoadReport]:
        return _best_run(self.baseline_runs, self.baseline_best_rate) if self.baseline_runs else None

    def to_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("runs", "baseline_runs")}
        out["runs"] = [r.to_dict() for r in self.runs]
        out["baseline_runs"] = [r.to_dict() for r in self.baseline_runs]
        return out


def _best_run(runs: List[LoadReport], best: Optional[float]) -> LoadReport:
    if best is None:
        return runs[-1]
    passing = [r for r in runs if r.rate == best]
    return passing[-1] if passing else runs[0]


def loadtest(url: str, bodies: Sequence[bytes], *, rate: Optional[float] = None, slo_ms: Optional[float] = None,
             baseline: Optional[str] = None, requests: Optional[int] = 200, duration_s: Optional[float] = None,
             seed: int = 0, timeout_s: float = 30.0, steps: int = 5, max_error_rate: float = 0.01, warmup: int = 32) -> LoadtestReport:
    """One run at ``rate`` (or, with ``slo_ms``, the highest rate whose p99 meets it, searched from ``rate``),
    against ``url`` and, the same way, against ``baseline``, each after ``warmup`` untimed requests (:func:`warm_up`).
    Targets are not checked here (:func:`check_target`).

    Raises:
        ConfigError: neither ``rate`` nor ``slo_ms``, and the errors of :func:`run_load` / :func:`max_rate`.
    """
    if rate is None and slo_ms is None:
        raise ConfigError("loadtest needs --rate (one run) or --slo-ms (search the highest rate within it)", "pass e.g. --rate 20")
    targets = [url] + ([baseline] if baseline else [])
    results: List[Tuple[Optional[float], List[LoadReport]]] = []
    for target in targets:
        warm_up(target, bodies, warmup, timeout_s)
        if slo_ms is None:
            results.append((None, [run_load(target, bodies, float(rate), requests=requests, duration_s=duration_s, seed=seed,
                                            timeout_s=timeout_s)]))
        else:
            results.append(max_rate(target, bodies, float(slo_ms), start=float(rate or 1.0), requests=int(requests or 200),
                                    steps=steps, seed=seed, timeout_s=timeout_s, max_error_rate=max_error_rate))
    report = LoadtestReport(url, baseline, slo_ms, results[0][1], results[1][1] if baseline else [], results[0][0],
                            results[1][0] if baseline else None)
    report.ratio = _ratio(report)
    return report


def _ratio(report: LoadtestReport) -> Optional[float]:
    if report.baseline_url is None:
        return None
    if report.slo_ms is not None:
        return report.best_rate / report.baseline_best_rate if report.baseline_best_rate else None
    ours, theirs = report.final.latency_ms.get("p50"), report.baseline_final.latency_ms.get("p50")
    return theirs / ours if ours and theirs else None
