"""Convert time and the cost of the stage split: converted ``model(x)`` (all early exits skipped) vs the original.

Targets: convert < 10 s on 2 CPU cores for deeplabv3_resnet101 at 512x512; overhead < 2%.
The two models run interleaved (original, converted, original, ...) so that drifts in
machine load hit both; each figure is the median of the repeats. Writes
``benchmarks/results/convert.md``.

    python benchmarks/bench_convert.py [--model deeplabv3_resnet101] [--size 512] [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_name  # noqa: E402 - sibling module of this script

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet101", help="torchvision.models.segmentation factory")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--exits", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "convert.md")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("mexify.graph.flops").setLevel(logging.ERROR)
    import mexify
    from mexify.graph.adapt import adapt_output
    from mexify.tools import original_model

    spec = f"torchvision.models.segmentation:{args.model}"
    kw = {"weights": None, "weights_backbone": None}
    hw = (args.size, args.size)
    import torchvision.models.segmentation  # noqa: F401  (import time is not convert time)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = mexify.convert(spec, args=kw, trace=mexify.TraceConfig(hw), exits=args.exits, out=str(Path(tmp) / "m.mex"))
        convert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = mexify.load(Path(tmp) / "m.mex")
        load_s = time.perf_counter() - t0
    model = res.model.eval()
    orig, note = original_model(loaded)
    del loaded
    x = torch.randn(1, 3, *hw)

    with torch.inference_mode():
        same = torch.equal(adapt_output(orig(x)), model(x))
        for _ in range(args.warmup):
            orig(x)
            model(x)
        t_orig, t_conv = [], []
        for _ in range(args.repeats):
            for fn, acc in ((orig, t_orig), (model, t_conv)):
                t0 = time.perf_counter()
                fn(x)
                acc.append(time.perf_counter() - t0)
    m_orig, m_conv = statistics.median(t_orig), statistics.median(t_conv)
    # each converted run is compared with the original run just before it, which cancels slow drifts in load
    overhead = 100.0 * (statistics.median(c / o for c, o in zip(t_conv, t_orig)) - 1.0)
    overhead_min = 100.0 * (min(t_conv) / min(t_orig) - 1.0)
    print(f"convert {convert_s:.2f} s (load {load_s:.2f} s); original {1000 * m_orig:.1f} ms, converted {1000 * m_conv:.1f} ms, "
          f"overhead {overhead:+.2f}%; outputs identical: {same}")

    rows = [
        ("model", f"{args.model} ({args.exits} exits, {len(model.exit_names)} stages)"),
        ("input", f"1x3x{hw[0]}x{hw[1]}"),
        ("machine", f"{cpu_name()}, {args.threads} torch threads (of {os.cpu_count()} cores), torch {torch.__version__}"),
        ("convert time", f"{convert_s:.2f} s (target < 10 s)"),
        ("load time (re-trace + weights)", f"{load_s:.2f} s"),
        ("original model, median", f"{1000 * m_orig:.1f} ms"),
        ("converted model(x), exits skipped, median", f"{1000 * m_conv:.1f} ms"),
        ("overhead, median of paired ratios", f"{overhead:+.2f}% (target < 2%)"),
        ("overhead, fastest run vs fastest run", f"{overhead_min:+.2f}%"),
        ("outputs identical (torch.equal)", str(same)),
        ("repeats", f"{args.repeats} interleaved, after {args.warmup} warm-up"),
        ("runs, original (ms)", ", ".join(f"{1000 * t:.0f}" for t in t_orig)),
        ("runs, converted (ms)", ", ".join(f"{1000 * t:.0f}" for t in t_conv)),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = ["# Convert benchmark", "", f"`python benchmarks/bench_convert.py --model {args.model} --size {args.size} --threads {args.threads}`", "",
            "| | |", "|---|---|"]
    text += [f"| {k} | {v} |" for k, v in rows]
    text += ["", f"The original is {note}; FLOPs of the original: {model.original_flops / 1e9:.1f} G (1 multiply-add = 1 FLOP).", ""]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
