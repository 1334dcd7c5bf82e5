"""`mexify serve`: the early-exit model over HTTP, batched across stages; `--ray` for Ray Serve replicas."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import typer

from mexify import api
from mexify.cli._common import (Annotated, DeviceOpt, TrustCodeOpt, TrustOpt, choice, console, count, err_console, lib_parser,
                                trust_of, warn)

_number = functools.partial(api.parse_number)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        bundle: Annotated[Path, typer.Argument(help="A calibrated bundle or pt2 export (torch), or an ONNX export (onnxruntime).")],
        host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", parser=count("--port", lo=1, hi=65535), metavar="N", help="Port to listen on.")] = 8000,
        engine: Annotated[str, typer.Option("--engine", parser=choice(api.ENGINES, "engine"), metavar="ENGINE",
                                            help="torch (a bundle or pt2 export) or onnxruntime (an ONNX export).")] = "torch",
        max_batch: Annotated[int, typer.Option("--max-batch", parser=count("--max-batch"), metavar="N",
                                               help="Most rows a stage runs at once.")] = 8,
        max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", parser=lib_parser(lambda t: _number(t, "--max-wait-ms", zero=True)),
                                                   metavar="MS", help="How long a row may wait at a stage for its batch to fill.")] = 2.0,
        max_queue: Annotated[int, typer.Option("--max-queue", parser=count("--max-queue"), metavar="N",
                                               help="Most requests in the service; more are answered 429.")] = 64,
        original: Annotated[bool, typer.Option("--original", help="Serve the original model the same way (the baseline of a load test).")] = False,
        exit_: Annotated[Optional[str], typer.Option("--exit", help="Send every image to this exit (index or name).")] = None,
        size: Annotated[Optional[Any], typer.Option("--size", parser=lib_parser(api.parse_image_size), metavar="HxW",
                                                    help="Resize images to HxW (default: the bundle's input size).")] = None,
        device: DeviceOpt = None,
        threads: Annotated[Optional[int], typer.Option("--threads", parser=count("--threads"), metavar="N",
                                                       help="Intra-op threads of the engine (torch or onnxruntime; default theirs).")] = None,
        ray: Annotated[bool, typer.Option("--ray", help="Serve as Ray Serve replicas (a local cluster on loopback unless --ray-address).")] = False,
        replicas: Annotated[int, typer.Option("--replicas", parser=count("--replicas"), metavar="N", help="Ray replicas.")] = 1,
        autoscale: Annotated[Optional[Any], typer.Option("--autoscale", parser=lib_parser(lambda t: api.parse_range(t, "--autoscale")),
                                                         metavar="MIN:MAX", help="Ray: scale replicas between MIN and MAX.")] = None,
        ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="A running Ray cluster (auto, ray://HOST:10001).")] = None,
        trust_code: TrustCodeOpt = False,
        trust_pickle: TrustOpt = False,
    ) -> None:
        """Serve early-exit segmentation over HTTP: POST /predict, GET /healthz, GET /metrics (Prometheus).

        Requests are batched across stages: images that leave at an exit are answered at once, the rest
        join other requests' rows at the next stage. Ctrl-C (or SIGTERM) stops accepting and drains.
        """
        settings = api.ServeConfig(engine=engine, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, original=original,
                                   exit=exit_, size=size, device=device, threads=threads)
        ray_config = api.RayConfig(replicas=replicas, autoscale=autoscale, address=ray_address) if ray else None

        def ready(url: str) -> None:
            what = "the original model" if original else "early exits"
            err_console.print(f"serving {bundle} ({what}, {engine}, max batch {max_batch}, max wait {max_wait_ms:g} ms) on {url}: "
                              f"POST {url}/predict, GET {url}/healthz, GET {url}/metrics; Ctrl-C drains and stops")

        api.serve(bundle, host=host, port=port, settings=settings, ray=ray_config, trust=trust_of(trust_code, trust_pickle), warn=warn,
                  on_ready=ready)
        console.print("stopped: every accepted request was answered")
