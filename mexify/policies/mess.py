"""MESS confidence: share of confident pixels, with predicted class boundaries discounted.

Per pixel of the exit's own output map (feature resolution, float32),
``c_p = max_k softmax(z)_pk`` (top-1 probability). An image's confidence is
the weighted share of pixels with ``c_p >= tau`` (MESS Eq. 7), where pixels within
``edge_radius`` pixels of that map (Chebyshev) of a change of predicted class get weight ``edge_weight`` instead
of 1 (our reading of the edge smoothing of Eq. 9: boundaries are uncertain even in
good maps, so they should not hold an image back)::

    conf = sum_p w_p [c_p >= tau] / sum_p w_p,   w_p = edge_weight if p on a boundary else 1

When every pixel is a boundary pixel and ``edge_weight`` is 0, Eq. 7 without the
discount is used. ``tau`` is rounded down to a probability-bin edge so that the
exit cache reproduces the run-time score exactly: the run time counts pixels (exact integers) and
does the per-image arithmetic above in float64, as the cache does from its histograms.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mexify.errors import ConfigError
from mexify.policies.base import Policy, boundary_mask, register_policy, snap_to_edge

log = logging.getLogger(__name__)


@register_policy("mess")
class MessPolicy(Policy):
    """Fraction of pixels whose top-1 probability passes ``pixel_threshold`` (MESS Eq. 7 + 9)."""

    _params = ("pixel_threshold", "edge_radius", "edge_weight")

    def __init__(self, pixel_threshold: float = 0.9, edge_radius: int = 1, edge_weight: float = 0.0, **kw: Any):
        super().__init__(**kw)
        if not 0.0 <= float(pixel_threshold) <= 1.0:
            raise ConfigError(f"mess pixel_threshold must lie in [0, 1], got {pixel_threshold}", "e.g. 0.9")
        if not 0.0 <= float(edge_weight) <= 1.0:
            raise ConfigError(f"mess edge_weight must lie in [0, 1], got {edge_weight}", "0 ignores boundary pixels")
        self.pixel_threshold, self._bin = snap_to_edge(float(pixel_threshold))
        self.edge_radius = int(edge_radius)
        self.edge_weight = float(edge_weight)

    def _fit_params(self, cache: Any) -> "MessPolicy":
        p = super()._fit_params(cache)
        if p.edge_radius != cache.edge_radius:
            log.info("mess: using the cache's boundary radius %d px instead of %d", cache.edge_radius, p.edge_radius)
            p.edge_radius = int(cache.edge_radius)
        return p

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        top1, pred = probs.max(dim=1)
        above = (top1 >= self.pixel_threshold).flatten(1)  # a float32 bin edge, compared in top1's dtype
        edge = boundary_mask(pred, self.edge_radius).flatten(1)
        # pixel counts per image, then the few per-image operations in float64 (as cache_scores)
        above_all = above.sum(1).double()
        above_edge = (above & edge).sum(1).double()
        tot_edge = edge.sum(1).double()
        tot = float(above.shape[1])
        w = self.edge_weight
        num = (above_all - above_edge) + w * above_edge
        den = (tot - tot_edge) + w * tot_edge
        conf = torch.where(den > 0, num / den.clamp_min(1e-12), above_all / tot)
        return conf.float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        hist = cache.hist()[:, :-1]  # (N, E-1, B)
        edge = cache.edge_hist[:, :-1].astype(np.float64)
        b = self._bin
        above_all = hist[..., b:].sum(-1)
        above_edge = edge[..., b:].sum(-1)
        tot = cache.exit_pixels()[:, :-1]
        tot_edge = edge.sum(-1)
        w = self.edge_weight
        num = (above_all - above_edge) + w * above_edge
        den = (tot - tot_edge) + w * tot_edge
        plain = above_all / tot
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(den > 0, num / np.maximum(den, 1e-12), plain)
        return conf.astype(np.float32).astype(np.float64)
