"""Exported bundles on the clock: the torch runtime on the bundle and on its pt2 export, and the
onnxruntime runner on its ONNX export, on the same images (CPU).

For each engine: the time to leave at every exit (that exit forced, batch 1, median over images),
the policy's ms per image and its measured speed-up against the original model (run by torch, as
``bench`` and ``compare`` measure it), every exit off (the same engine running the stages back to back)
and its overhead over the original, the exit mix, mIoU on the split, and agreement with the torch runtime on
the bundle (same exit, same mask pixel). Export times are reported too.

Default: the demo bundle (``make demo`` writes ``out/demo/lraspp.mex``) on its test split.
Writes ``benchmarks/results/deploy-cpu-<model>-<size>-<policy>.md`` and ``.json``.

    python benchmarks/bench_deploy.py [--bundle out/demo/lraspp.mex] [--images 100] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from _machine import cpu_name  # noqa: E402 - sibling module of this script

RESULTS = Path(__file__).parent / "results"
DEMO_DATA = "synthetic:scenes?classes=8&size=128&n=400&n_eval=300"


def _per_exit_ms(engine: Any, images: List[torch.Tensor], repeats: int) -> float:
    """Median over images of the best of ``repeats`` runs of one image (batch 1)."""
    times = []
    engine.predict_batch(images[0])
    for x in images:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.predict_batch(x).masks.cpu()
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="out/demo/lraspp.mex")
    ap.add_argument("--data", default=DEMO_DATA)
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--exit-images", type=int, default=20, help="images for the per-exit latency")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from mexify.api import export, read_config
    from mexify.data import build_dataset, take
    from mexify.tools.benchmark import _batches
    from mexify.tools.engines import compare_engines, make_engine

    bundle = Path(args.bundle)
    if not (bundle / "config.yaml").is_file():
        sys.exit(f"{bundle} not found: run `make demo` first (or pass --bundle with a calibrated bundle)")
    config = read_config(bundle)
    if config.policy is None:
        sys.exit(f"{bundle} has no policy: run `mexify calibrate` first")
    torch.set_num_threads(args.threads)
    model_name = config.spec["target"].rsplit(":", 1)[-1]
    size = "x".join(map(str, config.trace.input_size))
    ds = take(build_dataset(args.data, split=args.split), args.images)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export(bundle, out=Path(tmp) / "pt2", format="pt2")
        pt2_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        export(bundle, out=Path(tmp) / "onnx", format="onnx")
        onnx_s = time.perf_counter() - t0
        onnx_dir, pt2_dir = Path(tmp) / "onnx", Path(tmp) / "pt2"

        report = compare_engines(onnx_dir, ds, engines=("torch", "onnxruntime"), limit=args.images, batch_size=1,
                                 warmup=2, repeats=args.repeats, threads=args.threads)
        pt2 = compare_engines(pt2_dir, ds, engines=("torch",), limit=args.images, batch_size=1, warmup=2, repeats=args.repeats)
        rows = report.rows[:1] + [dict(pt2.rows[0], engine="torch (pt2 export)")] + report.rows[1:]
        rows[0]["engine"] = "torch (bundle)"
        rows[-1]["engine"] = "onnxruntime (ONNX export)"
        # agreement of the pt2 export with the bundle, on the same images
        ref_rt, pt2_rt = make_engine("torch", bundle), make_engine("torch", pt2_dir)
        batches = _batches(ds, 1, args.images, torch.device("cpu"))
        same_exit = same_px = 0.0
        for x, _ in batches:
            a, b = ref_rt.predict_batch(x), pt2_rt.predict_batch(x)
            same_exit += float((a.exit_index == b.exit_index).double().mean())
            same_px += float((a.masks == b.masks).double().mean())
        rows[1]["same_exit"], rows[1]["same_pixels"] = same_exit / len(batches), same_px / len(batches)

        exit_images = [x for x, _ in batches[: args.exit_images]]
        names = config.exit_names
        per_exit: Dict[str, List[float]] = {}
        for label, engine, path in (("torch (bundle)", "torch", bundle), ("torch (pt2 export)", "torch", pt2_dir),
                                    ("onnxruntime (ONNX export)", "onnxruntime", onnx_dir)):
            per_exit[label] = [_per_exit_ms(make_engine(engine, path, exit=i, threads=args.threads), exit_images, args.repeats)
                               for i in range(len(names))]

    result = {"device": cpu_name(), "threads": args.threads, "bundle": str(bundle), "model": model_name, "size": size,
              "policy": config.policy["name"], "images": report.images, "export_seconds": {"pt2": pt2_s, "onnx": onnx_s},
              "rows": rows, "exit_names": names, "per_exit_ms": per_exit, "torch": torch.__version__}
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    stem = RESULTS / f"deploy-cpu-{model_name}-{size.split('x')[0]}-{config.policy['name']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: Dict[str, Any]) -> str:
    lines = [
        f"# Deploy: torch runtime vs onnxruntime, {r['model']} at {r['size']}",
        "",
        f"{r['device']}, {r['threads']} threads, torch {r['torch']}, onnxruntime {r.get('onnxruntime', '-')}; "
        f"bundle `{r['bundle']}`, policy `{r['policy']}`, {r['images']} test images, batch 1. Export took "
        f"{r['export_seconds']['pt2']:.0f} s (pt2) and {r['export_seconds']['onnx']:.0f} s (ONNX).",
        "",
        "Policy: ms per image with the policy, the original model's (run by torch: the baseline of the measured speed-up),",
        "with every exit off (the same engine running the stages back to back) and its overhead over the original,",
        "the FLOPs speed-up of the exit mix, and agreement with the torch runtime on the bundle.",
        "",
        "| engine | mIoU | ms/image | original ms/image | measured speed-up | exits off ms/image | exits-off overhead | by FLOPs | same exit | same pixels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        orig, speedup, overhead = row["original_ms_per_image"], row["measured_speedup"], row["exits_off_overhead"]
        lines.append(f"| {row['engine']} | {row.get('miou', float('nan')):.2f} | {row['ms_per_image']:.2f} | "
                     f"{f'{orig:.2f}' if orig else '-'} | {f'{speedup:.2f}x' if speedup else '-'} | "
                     f"{row['exits_off_ms_per_image']:.2f} | {f'{100 * overhead:+.0f}%' if overhead is not None else '-'} | "
                     f"{row['flops_speedup']:.2f}x | {100 * row['same_exit']:.1f}% | {100 * row['same_pixels']:.2f}% |")
    lines += ["", "Exit mix: " + "; ".join(f"{row['engine']}: " + ", ".join(f"{k} {v}" for k, v in row["exit_counts"].items() if v)
                                          for row in r["rows"]), ""]
    lines += ["Time to leave at each exit (that exit forced, batch 1, median over images, ms):", "",
              "| engine | " + " | ".join(r["exit_names"]) + " |", "|---|" + "---:|" * len(r["exit_names"])]
    for label, ms in r["per_exit_ms"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in ms) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
