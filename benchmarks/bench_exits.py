"""Exits worth taking: plain heads against fused heads on a user-trained model, stage 2 only.

The flow of ``benchmarks/user_model.py`` (run it first, with the same ``--model``): the user's own
model (``--model lraspp``, the default: ``lraspp_mobilenet_v3_large``; ``--model unet``:
segmentation_models_pytorch's ``Unet`` with a resnet18 encoder), trained by a plain loop on the
folder-layout hard scenes with many small objects, converted with ``--weights`` (``user_lraspp.pth``
or ``user_unet.pth``), then ``mexify train`` stage 2 only (frozen backbone; the final exit stays the
user's model). Each head variant is converted, trained and judged from the command line:

* ``plain``: ``--head-set fuse=false``, the heads before fused heads existed (each reads its exit's
  feature alone);
* ``fused``: the default ``mess`` head, which at an exit coarser than the model's output path also
  reads the finer feature the model's own decoder uses (LR-ASPP's stride-8 map; which one each head
  reads is in the table).

Reported per variant: per-exit mIoU on the 800 validation images, the goals (no exit more than 1 point
below the best earlier exit; the last early exit above the first), head FLOPs, stage-2 seconds, and
from ``mexify compare --max-drop 1.0 --cost flops`` (entropy, maxprob, cbt, fft;
fitted on ``calib``, judged on ``test``, the two halves of val) the oracle's speed-up at one point (what
perfect decisions give with these exits) beside the best policy's at the default confidence. The
exits are what is compared, so the cost is FLOPs, which no timing noise on shared cores moves.

    python benchmarks/bench_exits.py [--model lraspp|unet] [--user-model out/user-model] [--out out/bench-exits]
                                     [--stage2-iters 600] [--variants plain,fused,fused-joint,fused-mess]

Steps whose outputs exist are skipped (``--force`` redoes them). Bundles and step records go to
``out/bench-exits`` (``out/bench-exits-unet`` for the U-Net); writes ``benchmarks/results/exits.md``
and ``exits.json`` (``exits-unet.md`` and ``exits-unet.json``) once ``plain`` and ``fused`` have run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402
from user_model import MODELS, mexify  # noqa: E402  (spec, convert arguments and weights file of each --model; the CLI runner)

# --model -> default output folder, results file stem, the model's name in the report
TARGETS = {
    "lraspp": (Path("out/bench-exits"), "exits", "lraspp_mobilenet_v3_large"),
    "unet": (Path("out/bench-exits-unet"), "exits-unet", "segmentation_models_pytorch Unet (resnet18 encoder)"),
}
# name -> (convert options, training settings as a function of the iteration count N)
VARIANTS = {
    "plain": (["--head-set", "fuse=false"], lambda n: ["stage1_iters=0", f"stage2_iters={n}"]),
    "fused": ([], lambda n: ["stage1_iters=0", f"stage2_iters={n}"]),
    # the same N iterations spent otherwise, from the user's trained backbone: everything jointly (arXiv 2407.14320's
    # order: backbone first, then jointly), or MESS's order (end to end, then frozen with PFD), half each
    "fused-joint": ([], lambda n: ["stage1_iters=" + str(n), "stage2_iters=0", "lr=0.0005"]),
    "fused-mess": ([], lambda n: [f"stage1_iters={n // 2}", f"stage2_iters={n - n // 2}", "lr=0.0005", "stage2_lr=0.002"]),
}
POLICIES = "entropy,maxprob,cbt,fft"  # the searchable policies with a single set of thresholds (fast to certify)
RESULTS = Path(__file__).resolve().parent / "results"


def run_variant(model: str, name: str, user: Path, out: Path, size: int, iters: int, force: bool) -> dict:
    """Convert, stage 2, eval and compare one head variant (each step cached in ``out/<name>.json``)."""
    record_path = out / f"{name}.json"
    record = {} if force or not record_path.exists() else json.loads(record_path.read_text())
    if record.get("setting") != [size, iters]:
        record = {"setting": [size, iters]}
    bundle, data = out / f"{name}.mex", f"folder:{user / 'scenes'}"
    spec, weights = MODELS[model]["spec"], user / MODELS[model]["weights"]
    args = [x for a in MODELS[model]["args"] for x in ("--arg", a)]
    extra, schedule = VARIANTS[name]
    sets = [x for s in schedule(iters) for x in ("--set", s)]
    steps = [
        ("convert", lambda: mexify("convert", spec, *args, "--input-size", f"{size}x{size}", "--weights", str(weights),
                                   *extra, "-o", str(bundle), "--overwrite")),
        ("stage2", lambda: mexify("train", str(bundle), "--data", data, "--recipe", "quick-synthetic", *sets, "--device", "cpu")),
        ("eval", lambda: mexify("eval", str(bundle), "--data", data, "--split", "val", "--device", "cpu", "--workers", "0")),
        ("compare", lambda: mexify("compare", str(bundle), "--data", data, "--max-drop", "1.0", "--fit-split", "calib",
                                   "--eval-split", "test", "--no-measure", "--device", "cpu", "--policies", POLICIES,
                                   "--cost", "flops")),
    ]
    stale = False
    for step, run in steps:
        if step in record and not stale:
            print(f"[{name}/{step}] done before: skipped", file=sys.stderr)
            continue
        stale = True  # a step that runs again makes the later ones run again
        report, run_info = run()
        record[step] = {"report": report, **run_info}
        record_path.write_text(json.dumps(record, indent=1))
    return record


def summarize(record: dict) -> dict:
    """The figures the table shows, from one variant's reports."""
    exits = record["eval"]["report"]["exits"]
    miou = [round(e["miou"], 2) for e in exits]
    early = miou[:-1]
    worst_gap = max((max(early[:i]) - early[i] for i in range(1, len(early))), default=0.0)
    rows = record["compare"]["report"]["rows"]
    oracle = next(r for r in rows if r["policy"] == "oracle")
    policies = [r for r in rows if r["policy"] != "oracle"]
    best = max(policies, key=lambda r: r["eval"]["speedup"] if r["eval"]["drop"] <= 1.0 else 0.0)
    conv = record["convert"]["report"]
    return {
        "per_exit_miou": miou,
        "exit_names": [e["name"] for e in exits],
        "skips": [e.get("skip") or "" for e in conv["exits"]],
        "worst_gap_to_best_earlier": round(worst_gap, 2),
        "last_minus_first": round(early[-1] - early[0], 2),
        "head_mflops": [round(e["head_flops"] / 1e6, 2) for e in conv["exits"][:-1]],
        "original_mflops": round(conv["original_flops"] / 1e6, 1),
        "stage2_seconds": record["stage2"]["seconds"],
        "oracle_speedup": round(oracle["eval"]["speedup"], 3),
        "oracle_drop": round(oracle["eval"]["drop"], 2),
        "best_policy": best["policy"],
        "best_speedup": round(best["eval"]["speedup"], 3),
        "best_drop": round(best["eval"]["drop"], 2),
        "best_exit_rates": [round(r, 3) for r in best["eval"]["exit_rates"].values()],
        "policies": {r["policy"]: {"speedup": round(r["eval"]["speedup"], 3), "drop": round(r["eval"]["drop"], 2)} for r in policies},
    }


def markdown(results: dict, args) -> str:
    plain, fused = results["plain"], results["fused"]
    n = len(plain["per_exit_miou"]) - 1
    lines = [
        f"# Exits worth taking: plain against fused heads, user-trained {TARGETS[args.model][2]}",
        "",
        f"{cpu_name()}, 2 threads, {platform.python_version()}; the user's own model from `benchmarks/user_model.py` "
        f"({args.size} px hard scenes with many small objects), converted with `--weights`, `mexify train` stage 2 only for "
        f"{args.stage2_iters} iterations (recipe `quick-synthetic`), {n} exits placed by FLOPs. mIoU on the 800 validation images; "
        f"speed-ups by FLOPs from `mexify compare --max-drop 1.0 --policies {POLICIES} --cost flops` (fitted on `calib`, judged on "
        "`test`): the exits are compared here, and FLOPs are the cost no timing noise moves (latency on these exits: "
        "`mexify profile`, and the runtime benchmarks). Written by `benchmarks/bench_exits.py`.",
        "",
        "## Per-exit mIoU (val)",
        "",
        "| exit | node | plain heads | fused heads | fused reads |",
        "|---|---|---:|---:|---|",
    ]
    for i in range(n + 1):
        node = plain["exit_names"][i]
        skip = fused["skips"][i] if i < len(fused["skips"]) else ""
        lines.append(f"| {i if i < n else 'final'} | {node} | {plain['per_exit_miou'][i]:.2f} | {fused['per_exit_miou'][i]:.2f} | {skip or '-'} |")
    lines += [
        "",
        "## Goals and costs",
        "",
        "| | plain heads | fused heads |",
        "|---|---:|---:|",
        f"| worst exit below the best earlier one (goal: at most 1 point) | {plain['worst_gap_to_best_earlier']:.2f} | {fused['worst_gap_to_best_earlier']:.2f} |",
        f"| last early exit minus first (goal: clearly above 0) | {plain['last_minus_first']:+.2f} | {fused['last_minus_first']:+.2f} |",
        f"| oracle speed-up at 1 point (test, FLOPs) | {plain['oracle_speedup']:.2f}x | {fused['oracle_speedup']:.2f}x |",
        f"| best policy at 1 point, confidence 0.9 (test, FLOPs) | {plain['best_policy']} {plain['best_speedup']:.2f}x, drop {plain['best_drop']:.2f} "
        f"| {fused['best_policy']} {fused['best_speedup']:.2f}x, drop {fused['best_drop']:.2f} |",
        f"| head FLOPs, all exits (M; original {plain['original_mflops']:.0f} M) | {sum(plain['head_mflops']):.1f} | {sum(fused['head_mflops']):.1f} |",
        f"| stage-2 seconds (on cores shared with other runs: the load differed, compare the head FLOPs) | {plain['stage2_seconds']:.0f} "
        f"| {fused['stage2_seconds']:.0f} |",
        "",
        f"Oracle headroom: {100 * (fused['oracle_speedup'] / plain['oracle_speedup'] - 1):+.0f}% with fused heads. "
        f"Exit mix of the best policy: plain {plain['best_exit_rates']}, fused {fused['best_exit_rates']}.",
        "",
        "Every policy at 1 point (test speed-up, drop):",
        "",
        "| policy | plain heads | fused heads |",
        "|---|---:|---:|",
    ]
    for p in plain["policies"]:
        a, b = plain["policies"][p], fused["policies"].get(p, {"speedup": float("nan"), "drop": float("nan")})
        lines.append(f"| {p} | {a['speedup']:.2f}x, {a['drop']:.2f} | {b['speedup']:.2f}x, {b['drop']:.2f} |")
    orders = [(k, results[k]) for k in ("fused", "fused-mess", "fused-joint") if k in results]
    if len(orders) > 1:
        what = {"fused": "stage 2 only (frozen backbone, PFD)", "fused-mess": "MESS order: end to end, then frozen (half each)",
                "fused-joint": "jointly, from the trained backbone (arXiv 2407.14320)"}
        lines += ["", f"## Training order, {args.stage2_iters} iterations from the user's trained backbone (fused heads)", "",
                  "| training | " + " | ".join(f"exit {i}" for i in range(n)) + " | final | oracle at 1 point | seconds |",
                  "|---|" + "---:|" * (n + 3)]
        for k, r in orders:
            lines.append(f"| {what[k]} | " + " | ".join(f"{v:.2f}" for v in r["per_exit_miou"]) +
                         f" | {r['oracle_speedup']:.2f}x | {r['stage2_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(TARGETS), default="lraspp", help="the user's model (user_model.py --model)")
    ap.add_argument("--user-model", type=Path, default=Path("out/user-model"), help="what benchmarks/user_model.py wrote")
    ap.add_argument("--out", type=Path, default=None, help="default: out/bench-exits (out/bench-exits-unet for unet)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--stage2-iters", type=int, default=600)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    default_out, stem, _ = TARGETS[args.model]
    args.out = args.out or default_out
    weights = MODELS[args.model]["weights"]
    if not (args.user_model / weights).exists():
        sys.exit(f"{args.user_model} has no {weights}: run benchmarks/user_model.py --model {args.model} first")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants.split(","):
        record = run_variant(args.model, name, args.user_model, args.out, args.size, args.stage2_iters, args.force)
        results[name] = summarize(record)
    if set(results) >= {"plain", "fused"}:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (RESULTS / f"{stem}.md").write_text(markdown(results, args))
        print(markdown(results, args))


if __name__ == "__main__":
    main()
