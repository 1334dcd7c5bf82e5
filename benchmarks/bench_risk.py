"""Does the budget hold on images calibration has not seen? Repeated random calibration / test partitions.

For each setup, the exit cache of a pool of held-out images is collected once, in chunks of 20 images
(a cache per chunk, merged per partition, so every per-image and per-class statistic of a partition is
exact). Then, ``--partitions`` times, the chunks are split at random into a calibration half and a test
half, and every policy is fitted on the calibration half for ``--max-drop`` three ways:

* **point**: ``--confidence 0``, the fit before budgets carried a confidence (within the budget on the
  calibration images);
* **certified**: at ``--confidence`` (default 0.9), within the budget on new images at that confidence;
* **label-free**: certified, but fitted on the calibration half *without its labels* (drop measured
  against the final exit's masks), then judged with the labels.

Each fit is judged on the test half, with its labels: how often the drop there exceeds the budget (goal:
at most ``1 - confidence`` of the partitions), the worst drop, and the speed-up predicted from the
bundle's measured latency profile (the kept share: certified over point, goal at least 85%). All of it is
arithmetic on the caches; the measured speed-up of the point and certified fits of one policy on one
partition comes from the runtime against the original model run the same way (``--measure``).

Setups: ``user``, a user's own lraspp_mobilenet_v3_large trained by a plain loop on harder folder-layout
scenes (``benchmarks/user_model.py`` prepares it: 800 validation images), stage 2 only; ``demo``, the
``make demo`` bundle on 800 synthetic scenes of a split it was not trained on. The policies are the ones
``calibrate --search`` fits (mess, entropy, maxprob, cbt, fft); the label-free way runs for ``--label-free``
(default entropy and maxprob). learned (its scores cross-fitted: five trainings per fit) and class-means
(a feature pass per partition) are left out for time; ``--policies`` takes them.

Writes ``benchmarks/results/risk.md`` and ``risk.json``.

    python benchmarks/bench_risk.py [--setups user,demo] [--partitions 24] [--confidence 0.9] [--max-drop 1.0]
                                    [--policies fft] [--measure-only] [--report-only]

``--policies`` reruns some policies; the others keep their runs from ``risk.json`` (same partitions and seed).

The timings are sensitive to what else the machine runs: a measurement made after the partitions in the
same process can come out far off (the user setup's certified fit once measured 0.84x, then 1.11x alone);
``--measure-only`` times them again in a fresh process from the kept caches.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SETUPS = {
    "user": ("out/user-model/lraspp.mex", "folder:out/user-model/scenes", "val"),
    "demo": ("out/demo/lraspp.mex", "synthetic:scenes?classes=8&size=128&n=400&n_eval=800&seed=5", "test"),
}
POLICIES = ("mess", "entropy", "maxprob", "cbt", "fft")
CHUNK = 20


def chunk_caches(bundle: str, data: str, split: str, keep: Path):
    """The pool's exit cache, one per chunk of CHUNK images, costed by the bundle's CPU latency profile; kept
    in ``keep`` (``chunk-NNN.npz``) and read from there on a rerun of the same bundle."""
    import torch

    import mexify
    from mexify.api import _dataset
    from mexify.calibrate import ExitCache, collect_cache
    from mexify.runtime import select_profile

    model = mexify.load(bundle, device="cpu")
    ds = _dataset(data, split, num_classes=model.num_classes)
    profile = select_profile(model.config.latency, None, "cpu")
    stamp = keep / "bundle-mtime"
    mtime = str((Path(bundle) / "config.yaml").stat().st_mtime)
    if not (stamp.is_file() and stamp.read_text() == mtime):
        keep.mkdir(parents=True, exist_ok=True)
        for old in keep.glob("chunk-*.npz"):
            old.unlink()
        loader = torch.utils.data.DataLoader(ds, batch_size=CHUNK, shuffle=False)
        for k, (x, y) in enumerate(loader):
            collect_cache(model, [(x, y)], device="cpu").save(keep / f"chunk-{k:03d}.npz")
            print(f"cache chunk {k + 1}/{len(loader)}", file=sys.stderr)
        stamp.write_text(mtime)
    caches = [ExitCache.load(f) for f in sorted(keep.glob("chunk-*.npz"))]
    return model, ds, [c.with_latency(profile) if profile is not None else c for c in caches]


def label_free(cache):
    """The cache as a calibration without labels sees it (mIoU against the final exit's masks)."""
    zero = np.zeros_like
    return dataclasses.replace(cache, tp=zero(cache.tp), pred_count=zero(cache.pred_count), label_count=zero(cache.label_count),
                               label_prob_sum=zero(cache.label_prob_sum))


def judge(policy, test) -> dict:
    """A fitted policy's figures on the test half (with its labels)."""
    a = test.assign(policy.cache_scores(test), policy.thresholds)
    f = test.figures(a, policy.thresholds)
    return {"drop": f["drop"], "speedup": f.get("predicted_speedup", f["speedup"]), "disagreement": f["disagreement"]}


def run_partitions(caches, args) -> dict:
    """Every policy, three ways, on ``args.partitions`` random halves of the chunks."""
    from mexify.calibrate import ExitCache
    from mexify.policies import build_policy

    rng = np.random.default_rng(args.seed)
    ways = {"point": 0.0, "certified": args.confidence, "label-free": args.confidence}
    out = {p: {w: [] for w in ways} for p in args.policies}
    for k in range(args.partitions):
        order = rng.permutation(len(caches))
        half = len(caches) // 2
        calib = ExitCache.merge([caches[i] for i in order[:half]])
        test = ExitCache.merge([caches[i] for i in order[half:]])
        unlabelled = label_free(calib)
        for p in args.policies:
            for way, conf in ways.items():
                if way == "label-free" and p not in args.label_free:
                    continue
                fit_on = unlabelled if way == "label-free" else calib
                t0 = time.perf_counter()
                fitted = build_policy(p).fit(fit_on, max_drop=args.max_drop, confidence=conf)
                row = {"fit_drop": fitted.figures["drop"], "bound": fitted.figures.get("drop_bound"),
                       "fit_speedup": fitted.figures.get("predicted_speedup", fitted.figures["speedup"]),
                       "seconds": time.perf_counter() - t0, **judge(fitted, test)}
                out[p][way].append(row)
        print(f"partition {k + 1}/{args.partitions}", file=sys.stderr)
    return out


def summarise(runs: dict, max_drop: float) -> dict:
    table = {}
    for p, ways in runs.items():
        point_speed = np.mean([r["speedup"] for r in ways["point"]])
        table[p] = {}
        for way, rows in ways.items():
            if not rows:
                continue
            drops = np.array([r["drop"] for r in rows])
            speed = np.array([r["speedup"] for r in rows])
            table[p][way] = {"broken": float(np.mean(drops > max_drop + 1e-9)), "worst_drop": float(drops.max()),
                             "mean_drop": float(drops.mean()), "mean_fit_drop": float(np.mean([r["fit_drop"] for r in rows])),
                             "speedup": float(speed.mean()), "kept": float(speed.mean() / point_speed),
                             "seconds": float(np.mean([r["seconds"] for r in rows]))}
    return table


def measure(model, ds, caches, args) -> dict:
    """Measured speed-ups of the point and certified entropy fits on one partition's test half: every test
    image at batch 1 through the runtime and through the original model run the same way (median of 3 passes)."""
    import torch

    from mexify.calibrate import ExitCache
    from mexify.policies import build_policy
    from mexify.runtime import EarlyExitRuntime
    from mexify.tools.benchmark import original_runner

    order = np.random.default_rng(args.seed + 1).permutation(len(caches))
    half = len(caches) // 2
    calib = ExitCache.merge([caches[i] for i in order[:half]])
    test_idx = [j for i in order[half:] for j in range(i * CHUNK, min((i + 1) * CHUNK, len(ds)))][: args.measure]
    images = [ds[j][0][None] for j in test_idx]
    runtimes = {}
    for way, conf in (("point", 0.0), ("certified", args.confidence)):
        pol = build_policy("entropy").fit(calib, max_drop=args.max_drop, confidence=conf)
        runtimes[way] = (pol, EarlyExitRuntime(model, pol))
    run_original, _ = original_runner(model, runtimes["point"][1])

    calls = {"original": run_original, **{w: rt.predict_batch for w, (_, rt) in runtimes.items()}}
    passes = {name: [] for name in calls}
    with torch.no_grad():
        for r in range(4):  # interleaved passes over every image; the first is a warm-up
            for name, fn in calls.items():
                t0 = time.perf_counter()
                for x in images:
                    fn(x)
                if r:
                    passes[name].append(time.perf_counter() - t0)
    secs = {name: float(np.median(v)) for name, v in passes.items()}
    out = {"images": len(images), "policy": "entropy", "original_ms": 1e3 * secs["original"] / len(images)}
    for way, (pol, _) in runtimes.items():
        ms = 1e3 * secs[way] / len(images)
        out[way] = {"ms": ms, "measured_speedup": out["original_ms"] / ms,
                    "predicted_speedup": pol.figures.get("predicted_speedup", pol.figures["speedup"])}
    return out


def markdown(results: dict, args) -> str:
    lines = ["# Budgets on held-out images (`benchmarks/bench_risk.py`)", "",
             f"`--max-drop {args.max_drop}` fitted on a random half of a pool of held-out images and judged on the other half, "
             f"{args.partitions} partitions per setup; speed-ups predicted from the bundle's measured CPU latency profile. "
             f"point: `--confidence 0`; certified: `--confidence {args.confidence}`; label-free: certified, fitted without "
             f"the calibration half's labels (drop against the final exit's masks), judged with them. "
             f"Goal: broken on at most {100 * (1 - args.confidence):.0f}% of partitions, speed kept at least 85% of the point fit's.", ""]
    for name, r in results.items():
        lines += [f"## {name}: {r['what']} ({r['images']} images, {r['images'] // 2} per half)", "",
                  "| policy | fit | broken on test | worst test drop | mean test drop | mean calib drop | predicted speed-up | speed-up kept | fit s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p, ways in r["table"].items():
            for way, t in ways.items():
                lines.append(f"| {p} | {way} | {100 * t['broken']:.0f}% | {t['worst_drop']:.2f} | {t['mean_drop']:.2f} | "
                             f"{t['mean_fit_drop']:.2f} | {t['speedup']:.2f}x | {100 * t['kept']:.0f}% | {t['seconds']:.1f} |")
        m = r.get("measured")
        if m:
            lines += ["", f"Measured on one partition ({m['images']} test images at batch 1, {m['policy']}, against the original "
                      f"model run the same way, {m['original_ms']:.2f} ms/image):", "",
                      "| fit | ms / image | measured speed-up | predicted |", "|---|---:|---:|---:|"]
            for way in ("point", "certified"):
                lines.append(f"| {way} | {m[way]['ms']:.2f} | {m[way]['measured_speedup']:.2f}x | {m[way]['predicted_speedup']:.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="user,demo")
    ap.add_argument("--partitions", type=int, default=24)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label-free", default="entropy,maxprob", help="policies also fitted without labels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rewrite risk.md from risk.json without running")
    ap.add_argument("--measure", type=int, default=200, help="test images timed for the measured speed-ups (0: none)")
    ap.add_argument("--measure-only", action="store_true",
                    help="time the measured speed-ups again (in a fresh process, from the kept caches) and keep the partitions in risk.json")
    args = ap.parse_args()
    args.policies = [p for p in args.policies.split(",") if p]
    args.label_free = [p for p in args.label_free.split(",") if p]
    if args.report_only:  # the tables again from risk.json's runs (e.g. after changing how they are summarised)
        results = json.loads((RESULTS / "risk.json").read_text())["results"]
        for r in results.values():
            r["table"] = summarise(r["runs"], args.max_drop)
        (RESULTS / "risk.md").write_text(markdown(results, args))
        return print(markdown(results, args))
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for name in args.setups.split(","):
        bundle, data, split = SETUPS[name]
        if not (Path(bundle) / "config.yaml").is_file():
            sys.exit(f"{bundle} not found: run `make demo` or `python benchmarks/user_model.py` first")
        t0 = time.perf_counter()
        model, ds, caches = chunk_caches(bundle, data, split, Path("out/bench-risk") / name)
        collect_s = time.perf_counter() - t0
        if args.measure_only:
            previous = json.loads((RESULTS / "risk.json").read_text())["results"][name]
            previous["measured"] = measure(model, ds, caches, args)
            results[name] = previous
            continue
        runs = run_partitions(caches, args)
        old = RESULTS / "risk.json"
        previous = json.loads(old.read_text())["results"].get(name, {}) if old.is_file() else {}
        runs = {**previous.get("runs", {}), **runs}  # policies not rerun keep their runs
        measured = measure(model, ds, caches, args) if args.measure else previous.get("measured")
        results[name] = {"measured": measured, "bundle": bundle, "data": data, "split": split, "images": sum(c.num_images for c in caches),
                         "what": "a user-trained lraspp on harder folder scenes" if name == "user" else "the demo bundle on synthetic scenes",
                         "collect_seconds": collect_s, "table": summarise(runs, args.max_drop), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "risk.json"
    results = {**(json.loads(old.read_text())["results"] if old.is_file() else {}), **results}  # other setups' rows are kept
    (RESULTS / "risk.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=float) + "\n")
    (RESULTS / "risk.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
