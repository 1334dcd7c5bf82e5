"""Draw a grid of synthetic scenes with their masks, from easy to hard.

Writes ``docs/images/synthetic_scenes.png``::

    python examples/plot_scenes.py [--size 128] [--classes 8] [--cols 6] [--out PATH]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mexify.data import build_dataset  # noqa: E402


def _palette(looks) -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.float32)
    pal[0] = (0.08, 0.08, 0.08)
    cmap = plt.get_cmap("tab20")
    for c in range(1, len(looks)):
        pal[c] = cmap((c - 1) % 20)[:3]
    pal[255] = (1.0, 1.0, 1.0)
    return pal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--cols", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "images" / "synthetic_scenes.png"))
    args = ap.parse_args()

    ds = build_dataset(f"synthetic:scenes?classes={args.classes}&size={args.size}&n=400&seed={args.seed}", split="val")
    diffs = ds.difficulties()
    targets = np.linspace(0.0, 1.0, args.cols)
    picks = [int(np.argmin(np.abs(diffs - t))) for t in targets]
    pal = _palette(ds.looks)

    fig, axes = plt.subplots(2, args.cols, figsize=(2.1 * args.cols, 4.6))
    for j, i in enumerate(picks):
        img, mask = ds.render(i)
        axes[0, j].imshow(img, interpolation="nearest")
        axes[0, j].set_title(f"d = {diffs[i]:.2f}", fontsize=10)
        axes[1, j].imshow(pal[mask], interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("mask")
    fig.suptitle("synthetic:scenes, easy (left) to hard (right)", fontsize=11)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
