"""Throughput under load: ``mexify serve`` (continuous batching across stages) against the original model
served the same way, measured by ``mexify loadtest`` (open-loop Poisson arrivals) on the CPU.

For each bundle and engine (torch on the bundle, onnxruntime on its ONNX export):

1. **Batch 1 and batch 8, no service** (``api.compare_engines``): the batched runtime's measured speed-up
   against the original model run the same way (torch, eager), at batch 1 and at batch 8: how much of the
   saving a fixed batch loses as it shrinks.
2. **Batched runtime vs scheduler at equal load, no HTTP**: the same images, all at once; the batched
   runtime runs them in batches of 8, the stage scheduler (``max_batch=8``) refills every stage from its
   queue; images per second of each, and of the original model in batches of 8.
3. **The services**: ``mexify serve BUNDLE`` (``--engine onnxruntime`` on the export) and ``mexify serve
   BUNDLE --original`` (the baseline: the original model, batched by the same scheduler behind the same
   HTTP path), each in its own process with the same settings. ``mexify loadtest --slo-ms`` finds each
   one's highest Poisson arrival rate whose p99 latency stays within the target, three times the original
   model's batch-1 latency; the ratio of the two rates is the served speed-up, compared with the batch-1
   speed-up (goal: at least 0.9 of it). Then each at half its best rate: latency percentiles.
4. **Correctness**: every test image posted to the multi-exit service in bursts (concurrent requests,
   so rows share batches): its exit and mask against the engine run on that image alone.

The load generator runs on the same machine as the services (two cores here): its own CPU time is part of
what each service competes with, the same for both; run it from another machine for absolute figures.
Writes ``benchmarks/results/serve-<name>.md`` and ``.json``.

    python benchmarks/bench_serve.py [--bundle out/demo/lraspp.mex] [--data SPEC] [--name demo] [--images 48]
    python benchmarks/bench_serve.py --user      # the user-trained lraspp (fused heads), calibrated for 2x by FLOPs
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import numpy as np
import torch
from PIL import Image
from _machine import cpu_name  # noqa: E402 - sibling module of this script

from mexify import api
from mexify.data import build_dataset, to_rgb
from mexify.deploy import Runner
from mexify.runtime import EarlyExitRuntime
from mexify.runtime.scheduler import OnnxStages, StageScheduler, TorchStages
from mexify.tools.benchmark import original_runner
from mexify.tools.images import to_tensor
from mexify.tools.loadtest import loadtest, run_load, warm_up

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = "synthetic:scenes?classes=8&size=128&n=400&n_eval=300"
USER_SOURCE = Path("out/bench-exits/fused.mex")  # benchmarks/bench_exits.py: the user's lraspp with fused heads, stage 2
USER_DATA = "folder:out/user-model/scenes"


def _mexify(*args: str) -> None:
    print("$ mexify " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mexify", *args], check=True, env={**os.environ, "MEXIFY_NO_PROGRESS": "1"})


def prepare(args: argparse.Namespace) -> None:
    """The user bundle calibrated for 2x by FLOPs (once), and each bundle's ONNX export (once)."""
    bundle = Path(args.bundle)
    if args.user and not (bundle / "config.yaml").is_file():
        shutil.copytree(USER_SOURCE, bundle)
        _mexify("calibrate", str(bundle), "--data", args.data, "--budget", "2x", "--cost", "flops")
    if not (Path(args.onnx) / "config.yaml").is_file():
        _mexify("export", str(bundle), "-o", str(args.onnx), "--format", "onnx")


def images_of(data: str, n: int) -> List[np.ndarray]:
    """The first ``n`` test images as uint8 RGB arrays (what a camera would send)."""
    ds = build_dataset(data, split="val")
    ds = [ds[i] for i in range(min(n, len(ds)))]
    return [to_rgb(image) for image, _ in ds]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ 1 and 2: no service
def engines_at(args: argparse.Namespace, batch: int) -> Dict[str, Dict[str, Any]]:
    report = api.compare_engines(args.onnx, args.data, batch_size=batch, limit=args.images, repeats=args.repeats)
    return {row["engine"]: row for row in report.rows}


def _per_second(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def equal_load(args: argparse.Namespace, images: List[np.ndarray]) -> Dict[str, Any]:
    """Images per second of the batched runtime (batches of 8) and of the scheduler (max batch 8), all images at once."""
    model = api.load(args.bundle, device="cpu")
    rt = EarlyExitRuntime(model)
    x = torch.stack([to_tensor(Image.fromarray(a), tuple(model.input_size)) for a in images])
    chunks = list(torch.split(x, 8))
    orig, _ = original_runner(model, EarlyExitRuntime(model, exit=-1))
    runner = Runner(args.onnx)
    out: Dict[str, Any] = {"images": len(images), "original_b8": _per_second(lambda: [orig(c) for c in chunks], len(x), args.repeats)}
    out["torch_batched_b8"] = _per_second(lambda: [rt.predict_batch(c) for c in chunks], len(x), args.repeats)
    out["onnxruntime_batched_b8"] = _per_second(lambda: [runner.predict(c.numpy()) for c in chunks], len(x), args.repeats)
    for name, stages, feed in (("torch", TorchStages(rt), list(x)), ("onnxruntime", OnnxStages(runner), [t.numpy() for t in x])):
        with StageScheduler(stages, max_batch=8, max_wait_ms=args.max_wait_ms, max_queue=len(x)) as s:
            out[f"{name}_scheduler_b8"] = _per_second(lambda: [f.result() for f in [s.submit(im) for im in feed]], len(x), args.repeats)
            fill = s.stats()
        out[f"{name}_scheduler_fill"] = [r / b if b else None for r, b in zip(fill.rows, fill.batches)]
    return out


# ------------------------------------------------------------------------------ 3 and 4: services
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(bundle: str, *flags: str) -> Iterator[str]:
    """``mexify serve`` in its own process on a free loopback port; drained and stopped afterwards."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mexify", "serve", bundle, "--port", str(port), *flags]
    print("$ mexify " + " ".join(cmd[3:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield _wait_up(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(60)


def correctness(url: str, engine: str, args: argparse.Namespace, images: List[np.ndarray]) -> Dict[str, Any]:
    """Every image posted in concurrent bursts; its exit and mask against the engine on that image alone."""
    if engine == "torch":
        rt = EarlyExitRuntime(api.load(args.bundle, device="cpu"))
        alone = [rt.predict_batch(to_tensor(Image.fromarray(a), tuple(rt.model.input_size))[None]) for a in images]
        ref = [(int(r.exit_index[0]), r.masks[0].numpy()) for r in alone]
    else:
        runner = Runner(args.onnx)
        alone = [runner.predict(to_tensor(Image.fromarray(a), tuple(runner.input_size))[None].numpy()) for a in images]
        ref = [(int(r.exit_index[0]), r.masks[0]) for r in alone]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda a: httpx.post(f"{url}/predict", content=_png(a), timeout=120, trust_env=False), images))
    masks = [np.asarray(Image.open(io.BytesIO(r.content))) for r in answers]
    wrong_exit = sum(int(r.headers["X-Mexify-Exit-Index"]) != e for r, (e, _) in zip(answers, ref))
    differ = [int((m != ref_m).sum()) for m, (_, ref_m) in zip(masks, ref)]
    return {"requests": len(images), "answered": sum(r.status_code == 200 for r in answers), "wrong_exit": wrong_exit,
            "wrong_mask": sum(d > 0 for d in differ), "pixels_differ": sum(differ) / sum(m.size for m in masks),
            "batched_runtime": _batched_vs_alone(engine, args, images, ref)}


def _batched_vs_alone(engine: str, args: argparse.Namespace, images: List[np.ndarray], ref: List[Any]) -> Dict[str, Any]:
    """The same comparison for the batched runtime (batches of 8, no service): how much batch composition alone changes."""
    if engine == "torch":
        rt = EarlyExitRuntime(api.load(args.bundle, device="cpu"))
        x = torch.stack([to_tensor(Image.fromarray(a), tuple(rt.model.input_size)) for a in images])
        got = [(int(p.exit_index), p.mask.numpy()) for c in torch.split(x, 8) for p in rt.predict(c)]
    else:
        runner = Runner(args.onnx)
        x = np.stack([to_tensor(Image.fromarray(a), tuple(runner.input_size)).numpy() for a in images])
        got = []
        for k in range(0, len(x), 8):
            r = runner.predict(x[k:k + 8])
            got += [(int(e), m) for e, m in zip(r.exit_index, r.masks)]
    differ = [int((m != rm).sum()) for (_, m), (_, rm) in zip(got, ref)]
    return {"wrong_exit": sum(e != re for (e, _), (re, _) in zip(got, ref)), "wrong_mask": sum(d > 0 for d in differ),
            "pixels_differ": sum(differ) / sum(m.size for _, m in got)}


def _flags(args: argparse.Namespace) -> List[str]:
    return ["--max-batch", "8", "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "256", "--threads", str(args.threads)]


_NULL_SERVICE = """
import sys, numpy as np
from mexify.tools.serving import ServeConfig, Service, run_server

class Null:  # answers at once: what is left is the HTTP path (read, decode, queue, encode, send)
    num_exits, exit_names = 1, ["null"]
    def start(self, images):
        return len(images)
    def step(self, i, n, rows):
        return np.arange(rows), np.zeros((rows, {h}, {w}), np.int64), np.full(rows, np.nan, np.float32), None, None

run_server(Service(Null(), ({h}, {w}), ServeConfig(max_batch=8, max_wait_ms={wait}, max_queue=256)), port=int(sys.argv[1]))
"""


@contextlib.contextmanager
def null_service(size: Any, wait_ms: float) -> Iterator[str]:
    """The same HTTP service over an engine that answers at once: the ceiling the HTTP path sets on this machine."""
    port = _free_port()
    code = _NULL_SERVICE.format(h=int(size[0]), w=int(size[1]), wait=wait_ms)
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield _wait_up(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(60)


def _wait_up(url: str, proc: Any) -> str:
    deadline = time.time() + 180
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", trust_env=False).status_code == 200:
                return url
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def http_ceiling(args: argparse.Namespace, size: Any, slo_ms: float, start: float, bodies: List[bytes]) -> Dict[str, Any]:
    with null_service(size, args.max_wait_ms) as url:
        report = loadtest(url, bodies, rate=start, slo_ms=slo_ms, requests=args.requests)
    return {"best_rate": report.best_rate, "best": report.final.to_dict()}


def light_load_ms(args: argparse.Namespace, bodies: List[bytes]) -> Dict[str, float]:
    """The original model served, at light load (2 requests/s after a warm-up): its batch-1 latency as a client sees it."""
    with service(str(args.bundle), "--original", *_flags(args)) as base:
        warm_up(base, bodies, 32)
        return run_load(base, bodies, 2.0, requests=40, seed=2).latency_ms


def served(args: argparse.Namespace, engine: str, slo_ms: float, start: float, bodies: List[bytes], images: List[np.ndarray]) -> Dict[str, Any]:
    """The engine's service and the original's: best rates within the SLO, half-rate percentiles, correctness."""
    target = [str(args.onnx), "--engine", "onnxruntime"] if engine == "onnxruntime" else [str(args.bundle)]
    with service(*target, *_flags(args)) as url, service(str(args.bundle), "--original", *_flags(args)) as base:
        report = loadtest(url, bodies, rate=start, slo_ms=slo_ms, baseline=base, requests=args.requests)
        half = {name: run_load(u, bodies, r / 2, requests=args.requests, seed=1).to_dict() if r else None
                for name, u, r in (("service", url, report.best_rate), ("original", base, report.baseline_best_rate))}
        check = correctness(url, engine, args, images)
    lost = sum(sum(r.errors.values()) for r in report.runs + report.baseline_runs if r.rate <= (report.best_rate or 0))
    return {"slo_ms": slo_ms, "best_rate": report.best_rate, "original_best_rate": report.baseline_best_rate, "ratio": report.ratio,
            "best": report.final.to_dict(), "original_best": report.baseline_final.to_dict(), "half_rate": half,
            "errors_at_passing_rates": lost, "correctness": check, "search": report.to_dict()}


# ------------------------------------------------------------------------------ report
def table(name: str, res: Dict[str, Any]) -> str:
    lines = [f"# Serving under load: {name} ({res['cpu']}, {res['threads']} cores for torch in process)", "",
             f"`{res['bundle']}`, {res['images']} test images, p99 target {res['slo_ms']:.1f} ms = 3x the original model's "
             f"batch-1 latency served (p50 at 2 requests/s: {res['original_served_light']['p50']:.1f} ms; in process, no HTTP: "
             f"{res['original_b1_ms']:.2f} ms); `mexify serve --max-batch 8 --max-wait-ms {res['max_wait_ms']:g} --threads "
             f"{res['service_threads']}` for both services; open-loop Poisson load after 32 + 32 warm-up requests, "
             f"{res['requests']} requests per rate.", "",
             "| engine | batch-1 speed-up | batch-8 speed-up (batched runtime) | best rate, multi-exit | best rate, original | "
             "served speed-up | served / batch-1 | p50 / p99 ms at half rate (multi-exit) | p50 / p99 ms at half rate (original) "
             "| errors | wrong exit / mask |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes: List[str] = []
    for engine, row in res["engines"].items():
        s = row["served"]
        h, o = s["half_rate"]["service"] or {}, s["half_rate"]["original"] or {}
        pct = lambda r: f"{r['latency_ms'].get('p50', float('nan')):.1f} / {r['latency_ms'].get('p99', float('nan')):.1f}" if r else "-"  # noqa: E731
        ratio = s["ratio"] or float("nan")
        c = s["correctness"]
        notes.append(f"{engine}: through the service {c['wrong_exit']} exits and {c['wrong_mask']} masks of {c['requests']} differ from "
                     f"the engine on each image alone ({100 * c['pixels_differ']:.4f}% of pixels); the batched runtime in batches of 8, "
                     f"no service: {c['batched_runtime']['wrong_exit']} exits, {c['batched_runtime']['wrong_mask']} masks "
                     f"({100 * c['batched_runtime']['pixels_differ']:.4f}% of pixels)")
        lines.append(f"| {engine} | {row['b1']:.2f}x | {row['b8']:.2f}x | {s['best_rate'] or 0:.1f}/s | {s['original_best_rate'] or 0:.1f}/s | "
                     f"{ratio:.2f}x | {ratio / row['b1']:.2f} | {pct(h)} | {pct(o)} | {s['errors_at_passing_rates']} | "
                     f"{c['wrong_exit']} / {c['wrong_mask']} of {c['requests']} |")
    eq = res["equal_load"]
    lines += ["", f"Equal load, no HTTP ({eq['images']} images at once (the test images four times), images per second; speed-up against the original in "
              "batches of 8):", "", "| engine | batched runtime (batches of 8) | stage scheduler (max batch 8) | mean batch per stage (scheduler) |",
              "|---|---:|---:|---|"]
    for engine in ("torch", "onnxruntime"):
        b, s = eq[f"{engine}_batched_b8"], eq[f"{engine}_scheduler_b8"]
        fill = ", ".join("-" if f is None else f"{f:.1f}" for f in eq[f"{engine}_scheduler_fill"])
        lines.append(f"| {engine} | {b:.0f}/s ({b / eq['original_b8']:.2f}x) | {s:.0f}/s ({s / eq['original_b8']:.2f}x) | {fill} |")
    ceiling = res.get("http_ceiling") or {}
    lines += ["", f"Original model in batches of 8: {eq['original_b8']:.0f} images/s.", "",
              f"The HTTP path alone (the same service over an engine that answers at once, same load generator, same p99 target): "
              f"{ceiling.get('best_rate') or 0:.0f} requests/s: no service on this machine can pass that rate, whatever its model.",
              "", "Correctness:", ""]
    lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--user", action="store_true", help="the user-trained lraspp (copied from out/bench-exits/fused.mex, calibrated 2x FLOPs)")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each service (the rest of the cores decode, "
                    "encode and generate the load)")
    args = ap.parse_args()
    args.bundle = args.bundle or ("out/bench-serve/user.mex" if args.user else "out/demo/lraspp.mex")
    args.data = args.data or (USER_DATA if args.user else DEMO_DATA)
    args.name = args.name or ("user" if args.user else "demo")
    args.onnx = str(Path("out/bench-serve") / f"{args.name}.onnx")
    Path("out/bench-serve").mkdir(parents=True, exist_ok=True)
    prepare(args)
    images = images_of(args.data, args.images)
    bodies = [_png(a) for a in images]
    b1, b8 = engines_at(args, 1), engines_at(args, 8)
    orig_ms = b1["torch"]["original_ms_per_image"]
    light = light_load_ms(args, bodies)
    slo = 3 * light["p50"]
    res: Dict[str, Any] = {"bundle": args.bundle, "data": args.data, "images": len(images), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                           "original_b1_ms": orig_ms, "original_served_light": light, "slo_ms": slo, "service_threads": args.threads, "max_wait_ms": args.max_wait_ms, "requests": args.requests,
                           "equal_load": equal_load(args, images * 4), "engines": {}}
    start = max(2.0, 250.0 / light["p50"])  # a quarter of what the original sustains one request at a time
    res["http_ceiling"] = http_ceiling(args, api.read_config(args.bundle).trace.input_size, slo, start, bodies)
    for engine in ("torch", "onnxruntime"):
        res["engines"][engine] = {"b1": b1[engine]["measured_speedup"], "b8": b8[engine]["measured_speedup"],
                                  "flops_speedup": b1[engine]["flops_speedup"], "exit_counts": b1[engine]["exit_counts"],
                                  "served": served(args, engine, slo, start, bodies, images)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"serve-{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
    text = table(args.name, res)
    (RESULTS / f"serve-{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
