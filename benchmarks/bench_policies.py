"""Exit policies side by side on synthetic scenes with trained torchvision bundles.

For each model (lraspp_mobilenet_v3_large at 128x128 and deeplabv3_mobilenet_v3_large at 256x256
by default): convert with 6 exits, train with the ``quick-synthetic`` recipe (both stages;
skipped when the trained bundle is already in ``--work``), profile every stage, head, decision and
mask on this CPU at each batch size (``mexify profile``), then for each policy and batch size fit
the thresholds on the ``calib`` split for ``--max-drop`` (1 mIoU point) on that measured cost
(``--cost latency``) and measure on the held-out ``test`` split with ``mexify bench``:

* mIoU and the drop versus the final exit (the original model's output);
* FLOPs speed-up (original FLOPs / mean FLOPs per image, 1 multiply-add = 1 FLOP);
* predicted speed-up (the profile's cost of the exit mix observed) and measured speed-up (the
  original model + argmax against the runtime over the same images; interleaved passes, median);
* the share of the oracle's saving reached at the same mIoU, both costed by the same profile:
  (1 - policy cost share) / (1 - cost share of the cheapest oracle whose test mIoU is at least the policy's).

Targets (latency issue): at batch 1 and 8, measured >= 0.85 x predicted, and at <= 1 mIoU point
drop on test, measured >= 1.5x.
Writes ``benchmarks/results/policies.md``.

    python benchmarks/bench_policies.py [--threads 2] [--test 100] [--calib 200] [--models ...] [--policies ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from _machine import cpu_name  # noqa: E402 - sibling module of this script

RESULTS = Path(__file__).parent / "results"
DATA = "synthetic:scenes?classes=8&size={size}"
SIZES = {"lraspp_mobilenet_v3_large": 128, "deeplabv3_mobilenet_v3_large": 256}
MODELS = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]
POLICIES = ["mess", "entropy", "maxprob", "cbt", "class-means"]

log = logging.getLogger("bench_policies")


def trained_bundle(name: str, work: Path, data: str, recipe: str, overrides: Dict[str, Any] = None) -> Path:
    """Convert and train ``name`` once; later runs reuse the bundle in ``work``."""
    import mexify
    from mexify.bundle import read_config
    from mexify.api import train

    out = work / f"{name}.mex"
    if (out / "config.yaml").is_file() and read_config(out).training is not None:
        log.info("reusing trained bundle %s", out)
        return out
    raw = work / f"{name}.mex.raw"
    if not (raw / "config.yaml").is_file():
        t0 = time.perf_counter()
        mexify.convert(f"torchvision.models.segmentation:{name}", args={"num_classes": 8, "weights": None, "weights_backbone": None},
                       trace=mexify.TraceConfig((SIZES.get(name, 128),) * 2), out=str(raw))
        log.info("converted %s in %.1f s", name, time.perf_counter() - t0)
    with torch.enable_grad():
        rep = train(str(raw), data, recipe=recipe, out=str(out), overrides=overrides or None, device="cpu")
    log.info("trained %s in %.0f s", name, rep.wall_s)
    return out


def _batches(data: str, split: str, n: int, batch_size: int) -> List[tuple]:
    from mexify.data import build_dataset

    ds = build_dataset(data, split=split, train=False)
    n = min(n, len(ds))
    items = [ds[i] for i in range(n)]
    return [
        (torch.stack([x for x, _ in items[i : i + batch_size]]), torch.stack([y for _, y in items[i : i + batch_size]]))
        for i in range(0, n, batch_size)
    ]


def _time_passes(fns: Dict[str, Any], repeats: int) -> Dict[str, float]:
    """Median seconds of each pass, run interleaved after one warm-up each."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def bench_model(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    import mexify
    from mexify import api
    from mexify.calibrate import collect_cache, oracle_at
    from mexify.data import build_dataset

    bundle = trained_bundle(name, args.work, args.data, args.recipe, dict(kv.split("=", 1) for kv in args.train_override))
    # the cost model: every stage, head, decision and mask timed on this CPU, per batch size
    profiles = {p.batch_size: p for p in api.profile(bundle, device="cpu", batch_sizes=args.batch_sizes, warmup=3, repeats=15).profiles}
    model = mexify.load(bundle).eval()
    test = build_dataset(args.data, split="test", train=False)
    test_batches = _batches(args.data, "test", args.test, 8)
    cache = collect_cache(model, test_batches)
    final_miou = cache.final_miou
    p1 = profiles[args.batch_sizes[0]]
    e = model.num_exits
    exits = [
        {"name": n, "miou": cache.exit_miou(i), "flops_fraction": model.cost_to_exit(i) / model.original_flops,
         "latency_fraction": p1.to_exit_ms()[i] / p1.original_ms}
        for i, n in enumerate(model.exit_names)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pname in args.policies:
            for bs in args.batch_sizes:
                rows.append(_policy_row(name, pname, bs, bundle, model, test, cache, profiles[bs], args, Path(tmp)))
    timed = cache.with_latency(p1)
    oracle1, _ = oracle_at(timed, min_miou=final_miou - args.max_drop)
    return {"model": name, "exits": exits, "final_miou": final_miou, "rows": rows, "images": cache.num_images,
            "oracle": oracle1, "exit_names": list(model.exit_names), "num_exits": e}


def _policy_row(name: str, pname: str, bs: int, bundle: Path, model: Any, test: Any, cache: Any, profile: Any,
                args: argparse.Namespace, tmp: Path) -> Dict[str, Any]:
    """Fit ``pname`` on calib against the batch-``bs`` profile, then bench it on test at that batch size."""
    import mexify
    from mexify import api
    from mexify.calibrate import oracle_at
    from mexify.tools import bench

    t0 = time.perf_counter()
    try:
        goal = api.Budget.max_drop(args.max_drop, cost=args.cost, profile=f"|b{bs}|")
        rep = api.calibrate(str(bundle), args.data, policy=pname, budget=goal, split="calib", limit=args.calib,
                            write=False, out=tmp / f"{pname}-{bs}", batch_size=8, means_limit=args.calib)
    except mexify.MexifyError as e:
        log.warning("%s on %s: %s", pname, name, e)
        return {"policy": pname, "batch": bs, "error": e.message}
    fit_s = time.perf_counter() - t0
    b = bench(model, test, policy=rep.policy, limit=args.test, batch_size=bs, warmup=2, repeats=args.repeats, device="cpu")
    p = b.policy
    # the oracle at the policy's test mIoU, costed by the same measured profile
    timed = cache.with_latency(profile)
    oracle, _ = oracle_at(timed, min_miou=p["miou"])
    cost = 1 / p["predicted_speedup"]
    share = (1 - cost) / (1 - oracle["cost_fraction"]) if oracle is not None and oracle["cost_fraction"] < 1 else None
    row = {
        "policy": pname, "batch": bs, "miou": p["miou"], "drop": p["drop"],
        "flops_speedup": p["flops_speedup"], "predicted_speedup": p["predicted_speedup"],
        "measured_speedup": p["measured_speedup"], "measured_vs_predicted": p["measured_speedup"] / p["predicted_speedup"],
        "oracle_share": share, "oracle_speedup": None if oracle is None else oracle["speedup"],
        "calib_drop": rep.figures["drop"], "exit_rates": list(p["exit_rates"].values()),
        "ms_per_image": p["ms_per_image"], "original_ms_per_image": p["original_ms_per_image"], "fit_s": fit_s,
    }
    log.info("%s %s b%d: %s", name, pname, bs, json.dumps({k: v for k, v in row.items() if k != "exit_rates"}, default=str))
    return row


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def write_markdown(results: List[Dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# Exit policies on synthetic scenes",
        "",
        f"`python benchmarks/bench_policies.py --threads {args.threads} --test {args.test} --calib {args.calib} "
        f"--models {' '.join(args.models)} --recipe {args.recipe} --policies {' '.join(args.policies)} --repeats {args.repeats}`",
        "",
        f"Data `{args.data}` (per model: {', '.join(f'{m} at {SIZES.get(m, 128)}' for m in args.models)}); bundles converted with 6 early exits and trained with the "
        f"`{args.recipe}` recipe (both stages{'; ' + ', '.join(args.train_override) if args.train_override else ''}). Thresholds fitted on {args.calib} `calib` images for "
        f"`--max-drop {args.max_drop}`; everything below measured on the held-out `test` split through the "
        f"early-exit runtime, batch {' and '.join(map(str, args.batch_sizes))}, on {cpu_name()} with {args.threads} torch threads "
        f"(torch {torch.__version__}). FLOPs: 1 multiply-add = 1 FLOP; speed-ups are against the original model. "
        f"Measured speed-up: median of {args.repeats} interleaved passes. Predicted: the CPU profile's cost of the "
        "exit mix observed. Oracle share: the policy's saving over the saving of the cheapest oracle with at least the "
        "policy's test mIoU, both costed by the same profile.",
        "",
    ]
    for res in results:
        lines += [f"## {res['model']} ({res['images']} test images, final-exit mIoU {res['final_miou']:.2f})", ""]
        lines += ["| exit | mIoU | FLOPs to reach | CPU latency to reach (every head on the way) |", "|---|---:|---:|---:|"]
        lines += [f"| {e['name']} | {e['miou']:.2f} | {100 * e['flops_fraction']:.1f}% | "
                  f"{_f(None if e.get('latency_fraction') is None else 100 * e['latency_fraction'], '.1f')}% |" for e in res["exits"]]
        lines += ["", "| policy | batch | mIoU | drop vs final | FLOPs speed-up | predicted | measured CPU speed-up | "
                  "measured / predicted | oracle share | ms / image | exit rates |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['policy']} | {r['batch']} | failed: {r['error']} | | | | | | | | |")
                continue
            rates = " ".join(f"{100 * v:.0f}" for v in r["exit_rates"])
            lines.append(
                f"| {r['policy']} | {r['batch']} | {r['miou']:.2f} | {r['drop']:.2f} | {r['flops_speedup']:.2f}x | "
                f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {r['measured_vs_predicted']:.2f} | "
                f"{_f(None if r['oracle_share'] is None else 100 * r['oracle_share'], '.0f')}{'%' if r['oracle_share'] is not None else ''} | "
                f"{r['ms_per_image']:.1f} (orig {r['original_ms_per_image']:.1f}) | {rates} |"
            )
        o = res["oracle"]
        if o:
            lines.append(f"| oracle (cheapest within {args.max_drop} pt) | {args.batch_sizes[0]} | {o['miou']:.2f} | {o['drop']:.2f} | "
                         f"{o['flops_speedup']:.2f}x | {o['speedup']:.2f}x | - | - | 100% | - | "
                         + " ".join(f"{100 * v:.0f}" for v in o["exit_rates"].values()) + " |")
        lines += ["", "Exit rates in %, shallowest exit first: " + ", ".join(res["exit_names"]) + ".", ""]
        ok = [r for r in res["rows"] if "error" not in r and r["drop"] <= args.max_drop + 1e-9]
        if ok:
            for bs in args.batch_sizes:
                mine = [r for r in ok if r["batch"] == bs]
                if not mine:
                    continue
                best = max(mine, key=lambda r: r["measured_speedup"])
                lines.append(
                    f"Batch {bs}, best within {args.max_drop} point on test: **{best['policy']}**, {best['measured_speedup']:.2f}x "
                    f"measured (target >= 1.5x), {best['predicted_speedup']:.2f}x predicted, {best['flops_speedup']:.2f}x by FLOPs; "
                    f"measured / predicted {best['measured_vs_predicted']:.2f} (target >= 0.85)."
                )
        else:
            lines.append(f"No policy stayed within {args.max_drop} point on the test split.")
        best_early = max(e["miou"] for e in res["exits"][:-1])
        if best_early >= res["final_miou"]:
            lines.append(
                f"Note: an early exit ({best_early:.2f}) scores at least as well as the final exit ({res['final_miou']:.2f}): the "
                "training run leaves the original model's own head behind its early heads, so drops come out negative and "
                "the policies differ little; a longer recipe gives a harder trade-off."
            )
        e0 = res["exits"][0]
        if e0.get("latency_fraction"):
            lines.append(
                f"Exit {e0['name']} costs {100 * e0['flops_fraction']:.0f}% of the FLOPs but {100 * e0['latency_fraction']:.0f}% of the "
                f"original's CPU latency (batch {args.batch_sizes[0]}: early high-resolution layers are memory-bound); the search "
                f"costs exits by the measured profile (`--cost {args.cost}`)."
            )
        lines.append("")
    if seconds == seconds:
        lines += [f"Total wall time {seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--recipe", default="demo-synthetic")
    ap.add_argument("--train-override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for training, e.g. stage1_iters=600 (use a fresh --work)")
    ap.add_argument("--work", type=Path, default=Path("out/bench_policies"), help="trained bundles are kept here")
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--batch-sizes", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8])
    ap.add_argument("--cost", default="latency", choices=["latency", "flops"], help="what the threshold search minimises")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "policies.md")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="only assemble the Markdown from the .json files of earlier runs (e.g. one run per model in parallel)")
    args = ap.parse_args()
    if args.from_json:
        results = [r for f in args.from_json for r in json.loads(f.read_text())]
        args.data = args.data.format(size=SIZES.get(args.models[0], 128))
        text = write_markdown(results, args, float("nan"))
        args.out.write_text(text)
        print(text)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("mexify.graph.flops", "mexify.data", "mexify.calibrate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for m in args.models:
        sized = argparse.Namespace(**{**vars(args), "data": args.data.format(size=SIZES.get(m, 128))})
        results.append(bench_model(m, sized))
    text = write_markdown(results, args, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
