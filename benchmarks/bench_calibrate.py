"""Time threshold fitting on an exit cache of 500 images x 6 exits (target: < 30 s on 2 CPU cores).

The cache is collected from a stand-in model whose exits see the label through noise
that shrinks with depth and grows with each image's difficulty (19 classes, 64x128
maps; fitting time does not depend on the resolution, the cache is per-image
statistics). Writes ``benchmarks/results/calibrate.md``.

    python benchmarks/bench_calibrate.py [--images 500] [--exits 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mexify.calibrate import collect_cache, oracle_at
from mexify.policies import build_policy


class StandIn:
    """Just enough of MultiExitModel for collect_cache: exits, costs and forward_all."""

    def __init__(self, k: int, e: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.training = k, False
        self.exit_names = [f"exit{i}" for i in range(e - 1)] + ["final"]
        self.mix = torch.randn(e, k, 4, generator=g)
        self.scale = [2.5 * (e - 1 - i) / (e - 1) + 0.15 for i in range(e)]
        self.stage_flops = [int(1e9 * (1 + i)) for i in range(e)]
        self.head_flops = [int(1.5e8)] * (e - 1)
        self.original_flops = sum(self.stage_flops)

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def cost_to_exit(self, i: int) -> int:
        return sum(self.stage_flops[: i + 1]) + sum(self.head_flops[: min(i + 1, len(self.head_flops))])

    def forward_all(self, x):
        y, noise = x[:, 0].long(), x[:, 1:]
        onehot = F.one_hot(y, self.num_classes).permute(0, 3, 1, 2).float() * 4
        return [onehot + torch.einsum("kc,nchw->nkhw", self.mix[i], noise) * self.scale[i] for i in range(len(self.exit_names))]


def batches(n: int, k: int, h: int, w: int, bs: int = 25, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, bs):
        m = min(bs, n - s)
        coarse = torch.randint(0, k, (m, 1, 4, 8), generator=g).float()
        y = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0]
        diff = torch.rand(m, 1, 1, 1, generator=g) ** 2
        noise = F.avg_pool2d(torch.randn(m, 4, h, w, generator=g), 5, 1, 2) * 2.5 * diff
        yield torch.cat([y[:, None], noise], 1), y.long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--exits", type=int, default=6)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibrate.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    model = StandIn(a.classes, a.exits)
    t0 = time.perf_counter()
    cache = collect_cache(model, batches(a.images, a.classes, 64, 128))
    t_collect = time.perf_counter() - t0
    rows = []
    for name in ("mess", "entropy", "maxprob", "cbt"):
        for budget in ("2x", "max-drop 1.0"):
            pol = build_policy(name)
            t0 = time.perf_counter()
            kw = {"max_cost": cache.original_flops / 2} if budget == "2x" else {"max_drop": 1.0}
            fit = pol.fit_search(cache, **kw)
            dt = time.perf_counter() - t0
            f = fit.policy.figures
            res = fit.search
            g = res.best_global
            rows.append((name, budget, dt, res.evaluations, f["miou"], f["drop"], f["speedup"], g["speedup"] if g else float("nan"), g["miou"] if g else float("nan")))
            print(f"{name:8s} {budget:13s} fit {dt:6.2f} s  mIoU {f['miou']:.2f} speed-up {f['speedup']:.2f}x")
    t0 = time.perf_counter()
    o2, _ = oracle_at(cache, max_cost=cache.original_flops / 2)
    o1, _ = oracle_at(cache, min_miou=cache.final_miou - 1.0)
    t_oracle = time.perf_counter() - t0
    lines = [
        "# Calibration fit time",
        "",
        f"`python benchmarks/bench_calibrate.py` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {a.threads} threads ({os.cpu_count()} cores visible).",
        f"Cache: {cache.num_images} images x {cache.num_exits} exits, {a.classes} classes, 64x128 maps from a stand-in model; "
        f"collected in {t_collect:.1f} s, {cache.nbytes() / 2**20:.1f} MB in memory "
        f"(per-image statistics: the size does not depend on the resolution). Final exit mIoU {cache.final_miou:.2f}.",
        "",
        "Fit = policy parameters + joint per-exit threshold search (Lagrangian sweep with coordinate descent, "
        "then constrained polish) including the Pareto curve and the global-threshold baseline. "
        "FLOPs: 1 multiply-add = 1 FLOP.",
        "",
        "| policy | budget | fit (s) | evaluations | mIoU | drop | speed-up | one global threshold: speed-up / mIoU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f}x | {r[7]:.2f}x / {r[8]:.2f} |")
    lines += [
        "",
        f"Oracle (per-image earliest exit within a tolerance; {t_oracle:.2f} s for both budgets): "
        f"at 2x {o2['miou']:.2f} mIoU ({o2['speedup']:.2f}x); within 1 point {o1['speedup']:.2f}x ({o1['miou']:.2f} mIoU).",
        "",
        f"Slowest fit: {max(r[2] for r in rows):.2f} s (target < 30 s).",
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
