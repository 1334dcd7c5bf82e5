"""The early-exit runtime on the clock, against the original model run the same way.

Converts a torchvision model (random weights: latency does not depend on them), fixes an exit mix
with a ``maxprob`` policy whose thresholds are quantiles of the exits' scores on the benchmark
images (synthetic scenes, each scaled by its own contrast so that random-weight heads' confidences
spread) (default: the mix measured on the H100 in the latency issue, 52% / 19.5% / 1% / 27.5% over
exits 0, 1, 4 and the final exit; the other exits switched off), then for every batch size and
dtype runs ``mexify.tools.benchmark`` (the runtime and the original model over the same images,
interleaved, medians) in each execution mode:

* ``eager``: stage by stage in eager PyTorch, against the original in eager PyTorch;
* ``graphs`` (CUDA): stages, heads and decisions replayed as CUDA graphs per batch bucket,
  against the original replayed as one CUDA graph.

Reported per row: measured speed-up, predicted speed-up (timed stages, heads and decisions and the
observed exit mix), FLOPs speed-up, measured / predicted, ms per image, and the all-exits-off
path (every image to the final exit, no head run) against the original.

Targets (latency issue): GPU, deeplabv3_resnet50 at 512: measured >= 0.9 x predicted and >= 1.6x
at this mix; all-exits-off within 3% of the original. CPU (2 cores): measured >= 0.85 x predicted.
Writes ``benchmarks/results/runtime-<cpu|cuda>-<model>-<size>.md`` and ``.json``.

    python benchmarks/bench_runtime.py [--device cuda] [--model deeplabv3_resnet50] [--size 512]
        [--batch 1,8] [--dtype float32,bfloat16] [--images 64] [--mix 0.52,0.195,0,0,0.01,0.275]
    (on a CPU the defaults are lraspp_mobilenet_v3_large at 128, float32: what 2 cores can run)
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from _machine import cpu_name  # noqa: E402 - sibling module of this script

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench_runtime")


def _mix_policy(model: Any, images: torch.Tensor, mix: List[float]) -> Any:
    """maxprob thresholds that send ``mix[i]`` of ``images`` to exit ``i`` (0 switches an exit off)."""
    from mexify.policies import build_policy

    pol = build_policy("maxprob")
    with torch.inference_mode():
        native = []
        for chunk in images.split(8):
            outs = model.forward_all(chunk, upsample=False)
            native.append([pol.scores(i, z).float().cpu() for i, z in enumerate(outs[:-1])])
    scores = [torch.cat([n[i] for n in native]) for i in range(model.num_exits - 1)]
    left = torch.ones(images.shape[0], dtype=torch.bool)
    thresholds = []
    for i, share in enumerate(mix[:-1]):
        want = round(share * images.shape[0])
        s = scores[i][left].sort(descending=True).values
        if want == 0 or len(s) == 0:
            thresholds.append(float("inf"))
            continue
        k = min(want, len(s))
        t = float(s[k - 1]) if k == len(s) else float((s[k - 1] + s[k]) / 2)  # midway: no image on the threshold
        thresholds.append(t)
        left &= ~(scores[i] >= t)
    pol = pol.with_thresholds(thresholds)
    pol.exit_names = list(model.exit_names)
    return pol


def _row(rep: Any, mode: str, batch: int, dtype: str, off: Any) -> Dict[str, Any]:
    p = rep.policy
    return {
        "mode": mode, "batch": batch, "dtype": dtype,
        "original_ms_per_image": p["original_ms_per_image"], "ms_per_image": p["ms_per_image"],
        "measured_speedup": p["measured_speedup"], "predicted_speedup": p["predicted_speedup"],
        "flops_speedup": p["flops_speedup"], "measured_over_predicted": p["measured_speedup"] / p["predicted_speedup"],
        "exit_rates": p["exit_rates"],
        "all_off_ms_per_image": off.policy["ms_per_image"],
        "all_off_vs_original": off.policy["ms_per_image"] / off.policy["original_ms_per_image"],
    }


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import mexify
    from mexify.data import build_dataset
    from mexify.runtime import FixedExit
    from mexify.tools.benchmark import bench

    dev = torch.device(args.device)
    torch.manual_seed(0)  # the same random weights, hence the same exit points and scores, run to run
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mexify.convert(f"torchvision.models.segmentation:{args.model}",
                       args={"num_classes": 21, "weights": None, "weights_backbone": None},
                       trace=mexify.TraceConfig((args.size, args.size)), exits=len(args.mix) - 1, out=f"{tmp}/b", check=False)
        log.info("converted %s at %d in %.1f s", args.model, args.size, time.perf_counter() - t0)
        model = mexify.load(f"{tmp}/b", device=dev)
    ds = build_dataset(f"synthetic:scenes?size={args.size}&classes=21&n={args.images}&n_eval={args.images}", split="val")
    images = torch.stack([ds[i][0] for i in range(args.images)])
    # random weights give every image nearly the same confidence; a per-image contrast (shuffled)
    # spreads them so that thresholds can set the mix
    scale = torch.linspace(0.2, 4.0, args.images)[torch.randperm(args.images, generator=torch.Generator().manual_seed(0))]
    images = images * scale.view(-1, 1, 1, 1)
    pol = _mix_policy(model, images.to(dev), args.mix)
    data = [(images[i], torch.zeros(images.shape[-2:], dtype=torch.long)) for i in range(args.images)]
    rows = []
    modes = ["eager", "graphs"] if dev.type == "cuda" else ["eager"]
    for batch in args.batch:
        for dtype in args.dtype:
            for mode in modes:
                kw = dict(limit=args.images, batch_size=batch, warmup=2, repeats=args.repeats, device=dev,
                          cuda_graphs=mode == "graphs", dtype=dtype)
                rep = bench(model, data, policy=pol, **kw)
                off = bench(model, data, policy=FixedExit(-1, model.num_exits), **kw)
                rows.append(_row(rep, mode, batch, dtype, off))
                log.info("%s", rows[-1])
    return rows


def write(rows: List[Dict[str, Any]], args: argparse.Namespace) -> Path:
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    tag = "cuda" if args.device == "cuda" else "cpu"
    mix = ", ".join(f"{100 * v:g}%" for v in args.mix)
    lines = [
        f"# Early-exit runtime against the original model: {args.model} at {args.size}x{args.size}",
        "",
        f"Device: {dev}; torch {torch.__version__}. {args.images} synthetic images; exit mix by exit (0..final): {mix}",
        "(maxprob thresholds set to that mix; exits at 0% are switched off). Each mode runs the original model the same",
        "way (eager against eager, one CUDA graph against stage graphs). Medians of "
        f"{args.repeats} interleaved passes. `all exits off`: every image to the final exit, no head run, against the original.",
        "",
        "| mode | batch | dtype | original ms/img | runtime ms/img | measured | predicted | by FLOPs | measured / predicted | all exits off vs original |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['dtype']} | {r['original_ms_per_image']:.3f} | {r['ms_per_image']:.3f} | "
            f"{r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
            f"{r['measured_over_predicted']:.2f} | {100 * (r['all_off_vs_original'] - 1):+.1f}% |"
        )
    lines += ["", "Observed exit rates (first row): " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in rows[0]["exit_rates"].items()), ""]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"runtime-{tag}-{args.model}-{args.size}.md"
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "device": dev, "rows": rows}, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="default: deeplabv3_resnet50 on CUDA, lraspp_mobilenet_v3_large on CPU")
    ap.add_argument("--size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    ap.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    ap.add_argument("--dtype", type=lambda s: s.split(","), default=None, help="default: float32,bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mix", type=lambda s: [float(v) for v in s.split(",")], default=[0.52, 0.195, 0.0, 0.0, 0.01, 0.275])
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("deeplabv3_resnet50" if cuda else "lraspp_mobilenet_v3_large")
    args.size = args.size or (512 if cuda else 128)
    args.dtype = args.dtype or (["float32", "bfloat16"] if cuda else ["float32"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(write(run(args), args).read_text())


if __name__ == "__main__":
    main()
