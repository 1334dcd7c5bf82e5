"""A user-trained model on a harder folder-layout dataset, prepared the way a new user would.

Other benchmarks start from mexify's own demo bundle (trained end to end by ``mexify train`` on the
built-in scenes). This one starts where most users do: a model they trained themselves, in their
own training loop, on images stored as files. It writes what a risk/budget benchmark then reads:

1. **Dataset.** Harder top-down scenes with many small objects (``mexify.data.synthetic``: 8
   classes, ``--size`` px, seed 23, ``mix="hard"``, up to 40 objects), 1200 train and 800 val
   images as PNG files in the ``folder:`` layout: ``scenes/{train,val}/images/NNNN.png`` and
   ``scenes/{train,val}/masks/NNNN.png`` (single-channel class indices), ``scenes/classes.txt``,
   and ``scenes/difficulty.json`` (each image's generator difficulty, 0 easy .. 1 hard; the reader
   ignores it). About 15% of the scenes hold one to a few large objects, half are very crowded.
2. **The user's model** (``--model``, random init, 8 classes): ``lraspp`` (default),
   torchvision's ``lraspp_mobilenet_v3_large``; or ``unet``, segmentation_models_pytorch's
   ``Unet(encoder_name="resnet18", encoder_weights=None, classes=8)`` (it returns the logits
   tensor, not a dict with ``"out"``). Trained by a plain PyTorch loop written here (not mexify's
   trainer): PNGs read with PIL, ImageNet normalisation, random horizontal flips, batch 8, AdamW lr
   1e-3 with cosine decay, cross-entropy ignoring 255, 2 threads. Its ``state_dict()`` goes to
   ``user_lraspp.pth`` (``user_unet.pth``); its val mIoU is measured here (overall and by
   difficulty third).
3. **mexify, from the command line.** ``mexify convert ... --weights user_lraspp.pth`` (bundle
   ``lraspp.mex``; ``unet.mex`` for the U-Net, converted from ``segmentation_models_pytorch:Unet``
   with ``--arg encoder_name=resnet18 --arg encoder_weights=null --arg classes=8``), ``mexify
   train`` stage 2 only (frozen backbone: the final exit stays the user's model), ``mexify profile
   --device cpu`` (batch 1) and ``mexify eval`` (per-exit mIoU on val). The commands run as
   subprocesses and are printed (each also gets ``--json``, whose output is kept), so this script
   is the record of what was typed.

Every step is skipped when its outputs exist and it ran with the same setting (``steps.json``
records what each produced, ``steps-unet.json`` for the U-Net; ``--size``, ``--iters``,
``--stage2-iters``, ``--threads``); a step that runs again makes every later one run again, and
``--force`` redoes everything (the scenes included). The scenes live in ``DATASET_FROM/scenes``
(``--dataset-from``, by default ``--out``) and are shared by both models: when they exist at
``--size`` they are reused, not rendered again, even if this model's record has no dataset step
yet. The summary (train seconds, val mIoU of the plain-trained model, stage-2 seconds, per-exit
mIoU) is printed and written to ``OUT/summary.json`` (``OUT/summary-unet.json``).

    python benchmarks/user_model.py [--model lraspp|unet] [--out out/user-model] [--dataset-from OUT] [--size 128]
                                    [--iters 3000] [--stage2-iters 2000] [--force]

For the LR-ASPP, on two idle CPU cores the plain training takes about 9 minutes (0.18 s per
iteration) and stage 2 about 5-7 (0.15-0.2 s per iteration); on cores shared with other work both
take longer (21 and 11 minutes in the run that wrote ``out/user-model``).
For the U-Net, on shared cores the plain training took 27 minutes for ``--iters 1500`` (1.09 s per
iteration) and stage 2 28 minutes for 2000 iterations (0.83 s per iteration).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, what torchvision models (and mexify's readers) use
STD = (0.229, 0.224, 0.225)
CLASSES = 8
SEED = 23
N_TRAIN, N_VAL = 1200, 800
# --model -> the spec and arguments ``mexify convert`` gets, the file names this script writes in OUT
MODELS = {
    "lraspp": {"spec": "torchvision.models.segmentation:lraspp_mobilenet_v3_large",
               "args": ("num_classes=8", "weights=null", "weights_backbone=null"),
               "weights": "user_lraspp.pth", "bundle": "lraspp.mex", "steps": "steps.json", "summary": "summary.json"},
    "unet": {"spec": "segmentation_models_pytorch:Unet",
             "args": ("encoder_name=resnet18", "encoder_weights=null", f"classes={CLASSES}"),
             "weights": "user_unet.pth", "bundle": "unet.mex", "steps": "steps-unet.json", "summary": "summary-unet.json"},
}
MEXIFY = [sys.executable, "-m", "mexify"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="lraspp", help="the user's model")
    ap.add_argument("--out", type=Path, default=Path("out/user-model"))
    ap.add_argument("--dataset-from", type=Path, default=None,
                    help="folder whose scenes/ holds (or gets) the dataset; default: --out")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--iters", type=int, default=3000, help="iterations of the plain training loop")
    ap.add_argument("--stage2-iters", type=int, default=2000, help="iterations of mexify's stage 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="redo every step")
    args = ap.parse_args()
    # waiting OpenMP threads sleep instead of spinning: on shared CPUs spinning threads slow every step
    # many times over (here and in the mexify commands, which inherit the environment)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    torch.set_num_threads(args.threads)
    out, model = args.out, MODELS[args.model]
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / model["steps"]
    state = {} if args.force or not state_file.is_file() else json.loads(state_file.read_text())
    root = (args.dataset_from or out) / "scenes"
    pth, bundle = out / model["weights"], out / model["bundle"]
    steps = [  # name, outputs, the settings it was run with, what runs it
        ("dataset", [root / "classes.txt", root / "difficulty.json"], args.size, lambda: write_scenes(root, args.size)),
        ("plain_training", [pth], args.iters, lambda: train_plain(args.model, root, pth, args.iters)),
        # converted afresh for every stage-2 setting: stage 2 starts from untrained heads
        ("convert", [bundle / "config.yaml"], [args.size, args.stage2_iters], lambda: convert(model, pth, bundle, args.size)),
        ("stage2", [bundle / "config.yaml"], args.stage2_iters, lambda: train_exits(bundle, root, args.stage2_iters)),
        ("profile", [bundle / "config.yaml"], args.threads, lambda: profile(bundle, args.threads)),
        ("eval", [bundle / "config.yaml"], None, lambda: evaluate_exits(bundle, root)),
    ]
    redo = False
    for name, outputs, setting, run in steps:
        done = state.get(name, {})
        if not redo and done.get("setting") == setting and all(p.exists() for p in outputs):
            print(f"[{name}] done before: skipped (--force redoes it)", file=sys.stderr)
            continue
        if name == "dataset" and not args.force and all(p.exists() for p in outputs) and scene_size(root) == args.size:
            # scenes rendered before (by the other model's run): shared, so reused as they are
            print(f"[{name}] scenes in {root} reused: skipped (--force renders them again)", file=sys.stderr)
            state[name] = {**describe_scenes(root), "setting": setting}
            state_file.write_text(json.dumps(state, indent=2) + "\n")
            continue
        redo = True
        print(f"[{name}] running", file=sys.stderr)
        state[name] = {**run(), "setting": setting}
        state_file.write_text(json.dumps(state, indent=2) + "\n")
    summary = _summary(state, args)
    (out / model["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


# --------------------------------------------------------------------------- 1. the dataset


def scene_config(size: int):
    """The scenes' knobs: 8 classes, another seed, a hard mix with up to 40 (small) objects."""
    from mexify.data.synthetic import SceneConfig

    return SceneConfig(classes=CLASSES, size=size, n=N_TRAIN, n_eval=N_VAL, seed=SEED, mix="hard", max_objects=40)


def write_scenes(root: Path, size: int) -> dict:
    """Render the train and val splits as PNG files in the folder layout (written aside, then moved into place)."""

    from mexify.data.synthetic import write_folder

    cfg = scene_config(size)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    difficulty = {split: {f"{i:04d}": round(float(d), 4) for i, d in enumerate(ds)} for split, ds in write_folder(cfg, tmp).items()}
    (tmp / "difficulty.json").write_text(json.dumps(difficulty) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return describe_scenes(root)


def scene_size(root: Path) -> int:
    """Side in pixels of the scenes in ``root`` (from the first training image); 0 when there is none."""
    from PIL import Image

    first = min((root / "train" / "images").glob("*.png"), default=None)
    return Image.open(first).size[0] if first else 0


def describe_scenes(root: Path) -> dict:
    """The dataset step's record, read back from the scenes this script rendered in ``root``."""
    import numpy as np

    difficulty = json.loads((root / "difficulty.json").read_text())
    d = np.array(list(difficulty["val"].values()))
    return {"root": str(root), "spec": f"folder:{root}", "classes": (root / "classes.txt").read_text().splitlines(),
            "size": scene_size(root), "seed": SEED, "mix": "hard", "max_objects": 40,
            "n_train": len(difficulty["train"]), "n_val": len(difficulty["val"]),
            "val_difficulty": {"below_0.25": float((d < 0.25).mean()), "below_0.5": float((d < 0.5).mean()),
                               "above_0.9": float((d > 0.9).mean()), "median": float(np.median(d))}}


# --------------------------------------------------------------------------- 2. the user's own training


def load_split(root: Path, split: str):
    """Every image and mask of a split, read with PIL: uint8 ``(N, 3, H, W)``, int64 ``(N, H, W)``, stems."""
    import numpy as np
    import torch
    from PIL import Image

    stems = sorted(p.stem for p in (root / split / "images").glob("*.png"))
    images = np.stack([np.asarray(Image.open(root / split / "images" / f"{s}.png").convert("RGB")) for s in stems])
    masks = np.stack([np.asarray(Image.open(root / split / "masks" / f"{s}.png")) for s in stems])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks.astype(np.int64)), stems


def normalize(images):
    import torch

    x = images.float().div_(255.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def build_model(name: str):
    """The user's model, randomly initialised (the same constructor ``mexify convert`` is given)."""
    if name == "unet":
        import segmentation_models_pytorch as smp

        return smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=CLASSES)
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES)


def logits(model, x):
    """The model's ``(N, K, H, W)`` logits: torchvision's models return a dict with ``"out"``, smp's the tensor."""
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def train_plain(name: str, root: Path, pth: Path, iters: int) -> dict:
    """The user's training loop: AdamW + cosine, CE (ignore 255), random flips, batch 8; saves the state_dict."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    images, masks, _ = load_split(root, "train")
    model = build_model(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    gen = torch.Generator().manual_seed(0)
    order, pos, batch, running = torch.randperm(len(images), generator=gen), 0, 8, 0.0
    t0 = time.perf_counter()
    for it in range(iters):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx, pos = order[pos:pos + batch], pos + batch
        x, y = normalize(images[idx]), masks[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = F.cross_entropy(logits(model, x), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if it else loss.item()
        if (it + 1) % 250 == 0 or it + 1 == iters:
            print(f"  iter {it + 1}/{iters}  loss {running:.3f}  {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    seconds = time.perf_counter() - t0
    torch.save(model.state_dict(), pth)
    scores = evaluate_plain(model.eval(), root)
    print(f"  trained in {seconds:.0f}s, val mIoU {scores['miou']:.2f}", file=sys.stderr)
    return {"model": name, "weights": str(pth), "iters": iters, "batch_size": batch, "epochs": round(iters * batch / len(images), 1),
            "seconds": round(seconds, 1), "seconds_per_iter": round(seconds / iters, 4), "final_loss": round(running, 4),
            "val": scores}


def _counts(pred, target):
    """Confusion matrix ``(K, K)`` (rows: labels) over the labelled pixels."""
    import torch

    keep = target != 255
    return torch.bincount(target[keep] * CLASSES + pred[keep], minlength=CLASSES * CLASSES).view(CLASSES, CLASSES)


def miou(conf) -> float:
    """mIoU in points over the classes present in the labels or the predictions."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    present = union > 0
    return float((tp[present] / union[present]).mean() * 100) if present.any() else math.nan


def evaluate_plain(model, root: Path) -> dict:
    """Val mIoU of the user's model, over all images and over each third of the difficulty range."""
    import torch

    images, masks, stems = load_split(root, "val")
    difficulty = json.loads((root / "difficulty.json").read_text())["val"]
    buckets = {"easy (d<1/3)": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "hard (d>=2/3)": (2 / 3, 1.01)}
    conf = {k: torch.zeros(CLASSES, CLASSES, dtype=torch.int64) for k in ("all", *buckets)}
    with torch.no_grad():
        for s in range(0, len(images), 16):
            pred = logits(model, normalize(images[s:s + 16])).argmax(1)
            for j, stem in enumerate(stems[s:s + 16]):
                c = _counts(pred[j], masks[s + j])
                conf["all"] += c
                d = difficulty[stem]
                conf[next(k for k, (lo, hi) in buckets.items() if lo <= d < hi)] += c
    out = {"miou": round(miou(conf["all"]), 2), "images": len(images)}
    out["by_difficulty"] = {k: round(miou(conf[k]), 2) for k in buckets}
    return out


# --------------------------------------------------------------------------- 3. mexify, as typed by the user


def mexify(*argv: str, json_out: bool = True, ok: tuple = (0,)) -> tuple:
    """Run ``mexify ARGV --json`` (printed as typed; without ``--json`` when not ``json_out``); returns its JSON
    output (None without) and the seconds it took. An exit code outside ``ok`` ends the script."""
    typed = "mexify " + " ".join(shlex.quote(a) for a in argv)
    print(f"$ {typed}", file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.perf_counter()
    proc = subprocess.run([*MEXIFY, *argv, *(["--json"] if json_out else [])], stdout=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode not in ok:
        sys.exit(f"`{typed}` failed with exit code {proc.returncode}")
    return (json.loads(proc.stdout) if json_out else None), {"command": typed, "seconds": round(seconds, 1)}


def convert(model: dict, pth: Path, bundle: Path, size: int) -> dict:
    args = [x for a in model["args"] for x in ("--arg", a)]
    report, run = mexify("convert", model["spec"], *args, "--input-size", f"{size}x{size}", "--weights", str(pth),
                         "-o", str(bundle), "--overwrite")
    keys = ("exit", "node", "stride", "channels", "flops_to_exit", "percent_of_original")
    run["exits"] = [{k: e[k] for k in keys} for e in report["exits"]]
    return run


def train_exits(bundle: Path, root: Path, iters: int) -> dict:
    """Stage 2 only: the backbone and final exit frozen (the user's model), the early heads trained."""
    report, run = mexify("train", str(bundle), "--data", f"folder:{root}", "--recipe", "quick-synthetic",
                         "--set", "stage1_iters=0", "--set", f"stage2_iters={iters}", "--device", "cpu")
    run.update(iters=iters, recipe="quick-synthetic", report=report)
    return run


def profile(bundle: Path, threads: int) -> dict:
    report, run = mexify("profile", str(bundle), "--device", "cpu", "--batch-size", "1", "--threads", str(threads))
    run["report"] = report
    return run


def evaluate_exits(bundle: Path, root: Path) -> dict:
    report, run = mexify("eval", str(bundle), "--data", f"folder:{root}", "--split", "val", "--device", "cpu",
                         "--workers", "0")
    run["report"] = report
    return run


def _summary(state: dict, args) -> dict:
    """The figures the other benchmarks read."""
    plain, stage2, ev = state["plain_training"], state["stage2"], state["eval"]
    return {
        "dataset": {k: state["dataset"][k] for k in ("spec", "size", "seed", "mix", "max_objects", "n_train", "n_val",
                                                      "val_difficulty")},
        "model": args.model,
        "bundle": str(args.out / MODELS[args.model]["bundle"]),
        "weights": plain["weights"],
        "plain_training": {"seconds": plain["seconds"], "iters": plain["iters"], "val_miou": plain["val"]["miou"],
                           "val_miou_by_difficulty": plain["val"]["by_difficulty"]},
        "stage2": {"seconds": stage2["seconds"], "iters": stage2["iters"], "recipe": stage2["recipe"]},
        "per_exit_val_miou": _per_exit(ev["report"]),
        "commands": [state[k]["command"] for k in ("convert", "stage2", "profile", "eval")],
    }


def _per_exit(report: dict) -> list:
    """One row per exit of ``mexify eval --json`` (final last): mIoU, pixel accuracy, share of the original's FLOPs."""
    return [{"exit": r["index"], "name": r["name"], "miou": round(r["miou"], 2), "pixel_accuracy": round(r["pixel_accuracy"], 2),
             "flops_percent": round(100 * r["flops_fraction"], 1)} for r in report["exits"]]


if __name__ == "__main__":
    main()
