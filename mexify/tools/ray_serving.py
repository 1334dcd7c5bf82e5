"""``mexify serve --ray``: the same service as Ray Serve replicas, past one machine.

Each replica is one :class:`~mexify.tools.serving.Service` (its own model and stage scheduler: the
batching happens inside the replica, where the rows are); Ray Serve's proxy spreads requests over
the replicas and its autoscaler adds or removes them by the requests each one has in flight. A
replica lets up to ``max_queue`` requests in (``max_ongoing_requests``), so that its scheduler sees
enough of them to fill batches; past that Ray queues them at the proxy.

On one machine the embedded server (:func:`~mexify.tools.serving.run_server`) is lighter; Ray
pays off with several machines (``--ray-address`` of a running cluster) or several GPUs. The bundle
path must be readable on every node (a shared filesystem, or the same path copied to each).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from mexify.errors import ConfigError
from mexify.tools.serving import ServeConfig, Service, build_service, handle
from mexify.trust import Trust

log = logging.getLogger(__name__)

__all__ = ["RayConfig", "Replica", "ray_application", "run_ray"]


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """How many replicas, and where.

    Attributes:
        replicas: a fixed number of replicas (ignored with ``autoscale``).
        autoscale: ``(min, max)`` replicas, scaled by the requests in flight per replica.
        target_ongoing: the requests in flight per replica the autoscaler aims at (default ``max_batch``).
        address: a running Ray cluster's address (``auto``, ``ray://host:10001``); default a local one on loopback.
        cpus: CPUs per replica; ``gpus``: GPUs per replica.
    """

    replicas: int = 1
    autoscale: Optional[Tuple[int, int]] = None
    target_ongoing: Optional[int] = None
    address: Optional[str] = None
    cpus: float = 1.0
    gpus: float = 0.0


class Replica:
    """One Ray Serve replica: a :class:`Service` answering the proxy's requests (ASGI requests in, responses out)."""

    def __init__(self, bundle: str, config: Dict[str, Any], trust: Dict[str, bool]):
        self.service: Service = build_service(bundle, ServeConfig(**config), Trust(**trust))

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        what = {"predict": "predict", "healthz": "health", "metrics": "metrics"}.get(request.url.path.rstrip("/").rsplit("/", 1)[-1])
        if what is None:
            return Response(b'{"error": "not found: use /predict, /healthz or /metrics"}', status_code=404, media_type="application/json")
        reply = await handle(self.service, what, request)
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)

    def check_health(self) -> None:
        """Ray Serve's health probe: a draining replica is unhealthy (it takes no new requests)."""
        if self.service.scheduler.closed:
            raise RuntimeError("draining")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close(drain=True, timeout=30)


def ray_application(bundle: str, config: ServeConfig = ServeConfig(), ray: RayConfig = RayConfig(), trust: Trust = Trust()) -> Any:
    """The Ray Serve application of a bundle: ``serve.run(ray_application(...))`` deploys it.

    Raises:
        ConfigError: Ray Serve is not installed, or bad replica counts.
    """
    try:
        from ray import serve
    except ImportError as e:
        raise ConfigError("serving on Ray needs Ray Serve", "pip install 'mexify[ray]'") from e
    options: Dict[str, Any] = {"name": "mexify", "max_ongoing_requests": int(config.max_queue),
                               "ray_actor_options": {"num_cpus": float(ray.cpus), "num_gpus": float(ray.gpus)},
                               "graceful_shutdown_timeout_s": 30.0, "health_check_period_s": 2.0}
    if ray.autoscale:
        lo, hi = ray.autoscale
        if not 1 <= int(lo) <= int(hi):
            raise ConfigError(f"--autoscale {lo}:{hi} is not MIN:MAX with 1 <= MIN <= MAX")
        options["autoscaling_config"] = {"min_replicas": int(lo), "max_replicas": int(hi),
                                         "target_ongoing_requests": int(ray.target_ongoing or config.max_batch)}
    else:
        if int(ray.replicas) < 1:
            raise ConfigError(f"--replicas must be at least 1, got {ray.replicas}")
        options["num_replicas"] = int(ray.replicas)
    deployment = serve.deployment(**options)(Replica)
    return deployment.bind(str(bundle), dataclasses.asdict(config), dataclasses.asdict(trust))


def run_ray(bundle: str, config: ServeConfig = ServeConfig(), ray_config: RayConfig = RayConfig(), trust: Trust = Trust(),
            host: str = "127.0.0.1", port: int = 8000, on_ready: Optional[Callable[[str], None]] = None,
            stop: Optional[threading.Event] = None) -> None:
    """Deploy on Ray Serve (a local cluster on loopback unless ``ray_config.address``) and serve on ``host:port``
    until SIGINT/SIGTERM (or ``stop``), then shut the application down (replicas drain first)."""
    import ray
    from ray import serve

    app = ray_application(bundle, config, ray_config, trust)
    local = ray_config.address is None
    if not ray.is_initialized():
        ray.init(address=ray_config.address, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 **({"_node_ip_address": "127.0.0.1"} if local else {}))
    try:
        serve.start(http_options={"host": host, "port": int(port)})
        serve.run(app, name="mexify", route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        stop = stop or _stop_on_signals()
        stop.wait()
    finally:
        serve.shutdown()
        if local:
            ray.shutdown()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
