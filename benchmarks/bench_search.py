"""Head search and exit strategies on synthetic scenes: searched heads vs uniform FCN vs the default
head everywhere, and every policy (fft and learned included) against the oracle.

Starts from a trained bundle (default: the demo's, ``make demo``): a fresh conversion of the same
model with the ``mess-fcn`` head space (an FCN and four MESS candidates per exit) gets the trained
backbone, then stage 2 trains all 30 candidates on the frozen backbone. Then:

1. ``calibrate --search`` (maxprob) at ``--max-drop 1`` (equal mIoU: which configuration is
   fastest) and at ``--budget 3x`` (equal cost: which is most accurate), each against the uniform
   FCN and the uniform default (``mess``, one 3x3 block) configurations on the calibration split;
2. ``mexify compare`` on the searched bundle: every policy fitted on ``calib`` for 1 point, judged
   on ``test`` (measured and predicted speed-ups, share of the oracle's saving).

``--layout folder`` runs the same on another dataset layout: 400 train and 600 validation scenes of
another seed and a harder mix, written as PNG files in the ``folder:`` layout (``train/`` and
``val/``, each ``images/`` + ``masks/``; calib and test are the reader's halves of ``val``).

Writes ``benchmarks/results/search-<synthetic|folder>.md`` and ``.json``.

    python benchmarks/bench_search.py [--bundle out/demo/lraspp.mex] [--stage2-iters 150] [--layout folder]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DATA = "synthetic:scenes?classes=8&size=128&n=400&n_eval=300"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="out/demo/lraspp.mex")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--stage2-iters", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layout", choices=("synthetic", "folder"), default="synthetic")
    args = ap.parse_args()
    name = f"search-{args.layout}"

    import torch

    import mexify
    from mexify.api import Budget, compare, read_config, search, train
    from mexify.bundle import update_bundle

    src = Path(args.bundle)
    if not (src / "config.yaml").is_file():
        sys.exit(f"{src} not found: run `make demo` first (or pass --bundle with a trained bundle)")
    torch.set_num_threads(args.threads)
    cfg = read_config(src)
    with tempfile.TemporaryDirectory() as tmp:
        if args.layout == "folder":
            args.data = _write_folder(Path(tmp) / "folder")
        out: dict = {"bundle": str(src), "data": args.data, "layout": args.layout}
        cand = Path(tmp) / "cand.mex"
        t0 = time.perf_counter()
        mexify.api.convert(cfg.spec["target"], args=cfg.spec.get("args") or {}, trace=mexify.api.TraceConfig(tuple(cfg.trace.input_size)),
                           exits=len(cfg.exits), at=[e.name for e in cfg.exits], heads="mess-fcn", out=str(cand))
        model = mexify.load(cand)
        trained = mexify.load(src).state_dict()
        missing, _ = model.load_state_dict({k: v for k, v in trained.items() if k.startswith("stages.")}, strict=False)
        assert not [k for k in missing if k.startswith("stages.")], "the backbones differ"
        update_bundle(cand, model=model)
        train(cand, args.data, recipe="demo-synthetic", overrides={"stage1_iters": 0, "stage2_iters": args.stage2_iters},
                       device="cpu", run_dir=Path(tmp) / "run")
        out["stage2_seconds"] = time.perf_counter() - t0
        out["stage2_iters"] = args.stage2_iters
        searches = {}
        for label, goal in (("max-drop 1", Budget.max_drop(1.0)), ("budget 3x", Budget.parse("3x"))):
            copy = Path(tmp) / f"search-{label.replace(' ', '')}.mex"
            shutil.copytree(cand, copy)
            rep = search(copy, args.data, policy="maxprob", budget=goal)
            searches[label] = {"searched": rep.figures, "uniform_fcn": rep.baseline, "uniform_default": rep.default,
                               "exits": [r.to_dict() for r in rep.rows], "evaluations": rep.evaluations, "seconds": rep.seconds}
            print(label, {k: (v or {}).get("miou") for k, v in searches[label].items() if k.startswith(("searched", "uniform"))},
                  file=sys.stderr)
        out["search"] = searches
        chosen = Path(tmp) / "search-max-drop1.mex"
        cmp = compare(chosen, args.data, budget=Budget.max_drop(1.0), limit=None, repeats=3, out=Path(tmp) / "cmp")
        out["compare"] = cmp.to_dict()
        shutil.copy(Path(tmp) / "cmp" / "compare.png", RESULTS / f"{name}-compare.png")
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(out, name))
    print(_markdown(out, name))


def _write_folder(root: Path) -> str:
    """Scenes of another seed and a harder mix as PNG files in the folder layout; returns the dataset spec."""
    from mexify.data.synthetic import SceneConfig, write_folder

    write_folder(SceneConfig(classes=8, size=128, n=400, n_eval=600, seed=11, mix="hard"), root)
    return f"folder:{root}"


def _fig(f):
    if not f:
        return "| - | - | - |"
    return f"| {f['miou']:.2f} | {f['drop']:.2f} | {f['flops_speedup']:.2f}x |"


def _markdown(r: dict, name: str) -> str:
    what = "synthetic scenes" if r["layout"] == "synthetic" else "a folder-layout dataset (harder scenes of another seed, PNG files)"
    lines = [f"# Head search and exit strategies on {what} (`benchmarks/bench_search.py`)", "",
             f"Trained backbone from `{r['bundle']}` (lraspp_mobilenet_v3_large at 128x128, 8 classes), the `mess-fcn` head "
             f"space (fcn + 4 mess candidates at each of the 6 exits), stage 2 for {r['stage2_iters']} iterations on 2 CPU "
             f"cores ({r['stage2_seconds']:.0f} s with the conversion). Search: maxprob, FLOPs (1 multiply-add = 1 FLOP), on "
             + ("the calibration split (the reader's half of `val/`, 300 images)." if r["layout"] == "folder"
              else f"the calibration split of `{r['data']}`."), ""]
    for label, s in r["search"].items():
        lines += [f"## `calibrate --search --{label.replace(' ', ' ')}` ({s['evaluations']} configurations, {s['seconds']:.1f} s)", "",
                  "| configuration | mIoU | drop | speed-up (FLOPs) |", "|---|---:|---:|---:|"]
        for label_, key in (("searched", "searched"), ("uniform FCN", "uniform_fcn"), ("uniform default (mess, 1 block)", "uniform_default")):
            lines.append(f"| {label_} " + _fig(s[key]))
        lines += ["", "| exit | head | threshold | exit rate |", "|---|---|---:|---:|"]
        for e in s["exits"]:
            th = "off" if e["candidate"] is None or e["threshold"] == float("inf") else f"{e['threshold']:.4f}"
            lines.append(f"| {e['exit']} | {e['head']} | {th} | {100 * e['exit_rate']:.1f}% |")
        lines.append("")
    c = r["compare"]
    lines += ["## Every policy on the searched bundle: fitted on calib for 1 point, judged on test", "",
              "| policy | mIoU | drop | measured | predicted | by FLOPs | oracle share |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in c["rows"]:
        e = row["eval"]
        share = row.get("oracle_share")
        measured = e.get("measured_speedup")
        lines.append(f"| {row['policy']} | {e['miou']:.2f} | {e['drop']:.2f} | {f'{measured:.2f}x' if measured else '-'} | "
                     f"{e.get('predicted_speedup', e['speedup']):.2f}x | {e['flops_speedup']:.2f}x | "
                     f"{f'{100 * share:.0f}%' if share is not None else '-'} |")
    lines += ["", "Notes: " + "; ".join(c["notes"]), "", f"![policies]({name}-compare.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
