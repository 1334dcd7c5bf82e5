"""Exit caches drawn from a known population (per-image confusion counts), for the risk-control tests.

Images vary in difficulty; every exit labels a share of each class's pixels right that falls with the
difficulty and rises with depth, and its errors land on the next class; an image's score at an exit is
that share plus noise. Two caches drawn with different generators are two independent sets of images.
"""
import numpy as np

from mexify.calibrate.cache import ExitCache


def draw(rng: np.random.Generator, n: int, k: int = 5, e: int = 4, pixels: int = 400):
    """``(scores (n, e-1), tp (n, e, k), pred_count (n, e, k), label_count (n, k))`` of ``n`` new images."""
    u = rng.uniform(0, 1, n)
    props = rng.dirichlet(np.full(k, 0.7), n)
    lc = rng.multinomial(pixels, props)
    acc = np.clip(1 - u[:, None] * (0.55 - 0.15 * np.arange(e))[None, :] - 0.03, 0.05, 1)
    tp = rng.binomial(lc[:, None, :], acc[:, :, None])
    pc = tp + np.roll(lc[:, None, :] - tp, 1, axis=2)
    scores = acc[:, :-1] + rng.normal(0, 0.08, (n, e - 1))
    return scores, tp, pc, lc


def cache_of(tp, pc, lc, costs=(1.0, 2.0, 3.0, 4.0)) -> ExitCache:
    """An exit cache holding those counts (the final exit's masks are the labels' stand-in for agreement)."""
    n, e, k = tp.shape
    zeros = np.zeros
    return ExitCache(exit_names=[f"e{i}" for i in range(e - 1)] + ["final"], num_classes=k, costs=np.asarray(costs, float),
                     original_flops=float(costs[-1]), class_hist=zeros((n, e, k, 2)), edge_hist=zeros((n, e, 2)),
                     num_pixels=np.full(n, int(lc.sum(1).max())), mean_maxprob=zeros((n, e)), mean_entropy=zeros((n, e)),
                     tp=tp, pred_count=pc, label_count=lc, agree_tp=tp, agree_pred_count=pc, agree_label_count=lc,
                     label_prob_sum=zeros((e, k, k)), agree_prob_sum=zeros((e, k, k)))
