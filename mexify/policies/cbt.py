"""Class-based thresholding (CBT, Gormez & Koyuncu).

Fitting: for every class ``k``, the mean probability vector ``m_k`` over pixels
labelled ``k`` (calibration labels; the final exit's predictions when there are
none), averaged over exits. The gap ``g_k = m_k[(1)] - m_k[(2)]`` between its top two
entries says how easy the class is (neural collapse). Gaps are min-max normalised and
mapped linearly into ``[alpha, beta]``, hard classes (small gap) getting the higher
threshold::

    T_k = beta - (beta - alpha) * (g_k - min g) / (max g - min g)

Classes never seen get ``beta``. A pixel is *settled* when its top-1 probability
reaches the threshold of its predicted class; an image exits when the settled share
reaches the exit's threshold ``t_i``.

:func:`pixel_level_flops` also gives the theoretical ADP-C-style cost if settled
pixels were masked out of every later stage (dense hardware does not get this saving).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mexify.errors import ConfigError
from mexify.policies.base import Policy, register_policy, snap_to_edge

log = logging.getLogger(__name__)


def class_thresholds_from_means(mean_probs: np.ndarray, seen: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """CBT thresholds from per-class mean probability vectors.

    Args:
        mean_probs: ``(K, K)``; row ``k`` is the mean probability vector over pixels labelled ``k``.
        seen: bool ``(K,)``; classes with at least one pixel.
        alpha, beta: threshold range (easiest class gets alpha, hardest beta).

    Returns:
        float64 ``(K,)`` thresholds (not yet snapped to bin edges).
    """
    k = mean_probs.shape[0]
    srt = np.sort(mean_probs, axis=1)
    gap = srt[:, -1] - (srt[:, -2] if k > 1 else 0.0)
    out = np.full(k, float(beta))
    if seen.any():
        g = gap[seen]
        lo, hi = float(g.min()), float(g.max())
        r = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
        out[seen] = beta - (beta - alpha) * r
    return out


@register_policy("cbt")
class CBTPolicy(Policy):
    """Settled-pixel share with per-class pixel thresholds in ``[alpha, beta]``."""

    _params = ("alpha", "beta", "class_thresholds")
    options = ("alpha", "beta")

    def __init__(self, alpha: float = 0.9, beta: float = 0.998, class_thresholds: Optional[Sequence[float]] = None, **kw: Any):
        super().__init__(**kw)
        if not 0.0 <= float(alpha) <= float(beta) <= 1.0:
            raise ConfigError(f"cbt needs 0 <= alpha <= beta <= 1, got alpha={alpha}, beta={beta}", "e.g. alpha=0.9 beta=0.998")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.class_thresholds: Optional[List[float]] = None
        self._class_bins: Optional[np.ndarray] = None
        if class_thresholds is not None:
            self._set_class_thresholds(class_thresholds)

    def _set_class_thresholds(self, values: Sequence[float]) -> None:
        snapped = [snap_to_edge(float(v)) for v in values]
        self.class_thresholds = [s[0] for s in snapped]
        self._class_bins = np.array([s[1] for s in snapped], dtype=np.int64)

    def _fit_params(self, cache: Any) -> "CBTPolicy":
        p = super()._fit_params(cache)
        counts = cache.class_pixels.astype(np.float64)
        seen = counts > 0
        mean = cache.class_prob_sum.astype(np.float64) / np.maximum(counts, 1)[None, :, None]  # (E, K, K)
        thr = class_thresholds_from_means(mean.mean(0), seen, p.alpha, p.beta)
        p._set_class_thresholds(thr)
        if not cache.labelled:
            log.info("cbt: no labels; class means use the final exit's predictions as labels")
        return p

    def _require_fitted_classes(self) -> None:
        if self.class_thresholds is None:
            raise ConfigError("cbt has no class thresholds", "fit it with `mexify calibrate --policy cbt` first")

    def settled(self, probs: torch.Tensor) -> torch.Tensor:
        """Bool ``(N, H, W)``: top-1 probability reaches its predicted class's threshold."""
        self._require_fitted_classes()
        top1, pred = probs.max(dim=1)
        thr = self._on_device("class_thresholds", top1.device, top1.dtype)
        return top1 >= thr[pred]

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        return self.settled(probs).flatten(1).double().mean(1).float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        self._require_fitted_classes()
        # cumulative counts from the top bin down: above[b] = count of pixels with bin >= b
        ch = cache.class_hist[:, :-1]  # (N, E-1, K, B)
        above = np.flip(np.cumsum(np.flip(ch, -1), -1, dtype=np.int64), -1)
        k_idx = np.arange(ch.shape[2])
        settled = above[:, :, k_idx, self._class_bins].sum(-1)  # (N, E-1)
        return (settled / cache.exit_pixels()[:, :-1]).astype(np.float32).astype(np.float64)

    def to_dict(self) -> Dict[str, Any]:
        return super().to_dict()


def pixel_level_flops(policy: CBTPolicy, cache: Any) -> Optional[Dict[str, float]]:
    """Theoretical ADP-C-style mean FLOPs if settled pixels were masked in later stages.

    Every image runs to the final exit, but stage ``i`` (and head ``i``) costs only the
    share of pixels not settled at any earlier exit. Measured on the cache's
    downsampled maps; dense hardware computes masked pixels anyway, so this is a
    paper figure only.

    Returns:
        ``{"mean_flops", "speedup"}``, or None when the cache has no per-stage FLOPs.
    """
    policy._require_fitted_classes()
    if cache.stage_flops is None or cache.thumb_bins is None:
        return None
    bins = cache.thumb_bins.astype(np.int64)  # (N, E, h, w)
    pred = cache.thumb_pred.astype(np.int64)
    thr_bins = policy._class_bins[np.clip(pred, 0, len(policy._class_bins) - 1)]
    settled = bins >= thr_bins
    n, e = bins.shape[:2]
    active = np.ones((n,), dtype=np.float64)
    union = np.zeros(settled[:, 0].shape, dtype=bool)
    stage = np.asarray(cache.stage_flops, dtype=np.float64)
    head = np.asarray(cache.head_flops if cache.head_flops is not None else [0.0] * (e - 1), dtype=np.float64)
    total = np.zeros((n,), dtype=np.float64)
    for i in range(e):
        total += stage[i] * active
        if i < e - 1:
            total += head[i] * active
            union |= settled[:, i]
            active = 1.0 - union.reshape(n, -1).mean(1)
    mean = float(total.mean())
    return {"mean_flops": mean, "speedup": float(cache.original_flops) / mean if mean > 0 else float("nan")}
