"""The conversion sweep as a table: for each third-party segmenter, the tracer and shapes used, the
convert time (the shrink self-check included), whether end-to-end training can run its train mode.

Models are those of ``tests/zoo/zoo_models.py`` (random init, small configs). Writes
``benchmarks/results/zoo.md``.

    python benchmarks/bench_zoo.py [--threads 2] [--timeout 20]
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from pathlib import Path

import torch
from _machine import cpu_name  # noqa: E402 - sibling module of this script

RESULTS = Path(__file__).parent / "results"
ZOO = Path(__file__).resolve().parents[1] / "tests" / "zoo"


def _zoo_list():
    spec = importlib.util.spec_from_file_location("zoo_test", ZOO / "test_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="MEXIFY_TRACE_TIMEOUT for each export attempt")
    ap.add_argument("--out", type=Path, default=RESULTS / "zoo.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["MEXIFY_TRACE_TIMEOUT"] = str(args.timeout)
    logging.disable(logging.WARNING)
    import mexify

    rows = []
    for factory, package, size in _zoo_list():
        if importlib.util.find_spec(package) is None:
            rows.append(f"| {factory} | - | - | - | - | skipped: {package} missing |")
            continue
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            res = mexify.convert(f"{ZOO / 'zoo_models.py'}:{factory}", trace=mexify.TraceConfig((size, size)), exits=6)
        except mexify.MexifyError as e:
            rows.append(f"| {factory} | - | - | {time.perf_counter() - t0:.1f} | failed | {e.message[:80]} |")
            continue
        seconds = time.perf_counter() - t0
        shapes = res.config.trace.export_shapes
        tracer = "torch.export" if shapes else "torch.fx"
        dims = {"batch": "batch dynamic, spatial fixed", "batch+spatial": "batch and spatial dynamic"}.get(shapes, "any (fx)")
        train = "stage 1 and 2" if not res.model.train_issue else "stage 2 only"
        rows.append(f"| {factory} | {tracer} | {dims} | {seconds:.1f} | passed ({len(res.exits)} exits) | {train} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Conversion sweep",
        "",
        f"Machine: {cpu_name()}, {args.threads} torch threads, torch {torch.__version__}; input 64x64 (PAN 128x128),",
        f"random init, 6 exits, export attempts bounded at {args.timeout:g} s. Seconds include tracing twice (train",
        "and eval mode), profiling, the batch analysis, the shrink self-check and a train-mode pass.",
        "",
        "| model | tracer | shapes | convert s | shrink self-check | training |",
        "|---|---|---|---:|---|---|",
        *rows,
        "",
    ])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
