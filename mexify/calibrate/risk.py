"""Budgets that hold on new images: upper confidence bounds on a configuration's drop and cost.

Thresholds fitted so that the drop *on the calibration images* sits just under the budget break it on
new images about half the time, and more often still because the search picks, among many nearly equal
configurations, the one whose noisy estimate came out best (the winner's curse). A certified fit instead
keeps a configuration only when the budget holds, at a stated confidence, on a new set of images drawn
like the calibration images.

**Method: a predictive bootstrap over images.** mIoU is not a mean of per-image numbers (it is a ratio
of summed confusion counts), so per-image risk-control bounds (Hoeffding, Learn-then-Test with a per-image
loss) would bound a different, looser quantity. The cache holds every image's true positives,
predictions and labels per class at every exit, so a resample of images is a weighted sum of those
counts, and its dataset-level mIoU is exact arithmetic: no second pass over the data. For a
configuration (an exit per image), with ``d`` its drop on the calibration images, the bound is

    d + q_c( d** - d* )

where ``d*`` is the drop on a resample of the calibration images (as many as there are) and ``d**`` the
drop on an independent resample the size of the *new* set (default: as many images as the calibration
set), ``q_c`` the ``c`` quantile over resamples. ``d - d*`` stands for the estimation error of the
calibration figure, ``d** - d`` for the sampling noise of the new set; their sum is what separates the
drop a user will see on new images from the figure calibration measured. The same resampling weights are
used for every configuration (common random numbers), so comparing configurations is not noisier than
comparing their point figures. The speed side is treated the same way: a cost budget bounds the mean
cost per image (exit rates vary between sets of images) at the same confidence.

The bound holds for a configuration fixed in advance. The threshold search chooses among many, so it
uses the bound by *learn then test* (:mod:`mexify.calibrate.search`): one half of the calibration images
proposes an ordered path of configurations, the other half certifies them in order. `benchmarks/bench_risk.py`
measures how often the certified fit breaks its budget on held-out images, over many random calibration /
test partitions, against the stated rate.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import numpy as np

from mexify.errors import ConfigError
from mexify.metrics import miou_from_counts

__all__ = ["DEFAULT_CONFIDENCE", "RESAMPLES", "RiskBound", "parse_confidence", "images_to_certify"]

DEFAULT_CONFIDENCE = 0.9
RESAMPLES = 1000
"""Bootstrap resamples: the 0.9 quantile of 1,000 draws moves by about 2% of the margin between seeds."""


def parse_confidence(value: Union[str, float, None]) -> float:
    """``--confidence``: a probability in [0, 1) (``0.9`` or ``90%``); 0 is the point fit on the calibration images.

    Raises:
        ConfigError: not a number, or outside [0, 1).
    """
    if value is None:
        return 0.0
    text = value.strip() if isinstance(value, str) else value
    scale = 1.0
    if isinstance(text, str) and text.endswith("%"):
        text, scale = text[:-1], 0.01
    try:
        v = float(text) * scale
    except (TypeError, ValueError):
        raise ConfigError(f"--confidence {value!r} is not a number", "give a probability, e.g. --confidence 0.9 (or 90%)") from None
    if not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise ConfigError(f"--confidence {value!r} is out of range",
                          "give a probability from 0 (the point fit) up to, not including, 1: e.g. 0.9 or 0.95")
    return v


def _resample(rng: np.random.Generator, n: int, size: int, resamples: int) -> np.ndarray:
    """``(resamples, n)`` multiplicities of ``n`` images in resamples of ``size`` draws with replacement."""
    return rng.multinomial(size, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


class RiskBound:
    """Upper confidence bounds on an assignment's drop, disagreement and mean cost over a new set of images.

    Args:
        cache: the :class:`~mexify.calibrate.ExitCache` the thresholds are fitted on.
        confidence: the probability the bounds hold with, in (0, 1).
        new_images: size of the new set the bound speaks of (default: as many images as the cache holds;
            a larger set is less noisy, so the bound also holds for it).
        resamples: bootstrap resamples.
        seed: of the resampling (fixed: the same cache and confidence give the same thresholds).

    The drop is measured as the search measures it (:meth:`ExitCache.counts`: against labels when there
    are any, else against the final exit's masks); the disagreement is always against the final exit's
    masks (the share of pixels whose class differs).
    """

    def __init__(self, cache: Any, confidence: float, *, new_images: Optional[int] = None, resamples: int = RESAMPLES, seed: int = 0):
        if not 0.0 < confidence < 1.0:
            raise ConfigError(f"confidence {confidence!r} is out of range", "a probability in (0, 1), e.g. 0.9")
        n = cache.num_images
        self.confidence = float(confidence)
        self.num_images = n
        self.new_images = int(new_images or n)
        rng = np.random.default_rng(seed)
        self.w_fit = _resample(rng, n, n, resamples)
        self.w_new = _resample(rng, n, self.new_images, resamples)
        tp, pc, lc = cache.counts()
        self.tp, self.pc = tp.astype(np.float64), pc.astype(np.float64)
        lc = lc.astype(np.float64)
        self.lc_total, self.lc_fit, self.lc_new = lc.sum(0), self.w_fit @ lc, self.w_new @ lc
        self.final_point = miou_from_counts(self.tp[:, -1].sum(0), self.pc[:, -1].sum(0), self.lc_total)
        self.final_fit = miou_from_counts(self.w_fit @ self.tp[:, -1], self.w_fit @ self.pc[:, -1], self.lc_fit)
        self.final_new = miou_from_counts(self.w_new @ self.tp[:, -1], self.w_new @ self.pc[:, -1], self.lc_new)
        self.agreed = cache.agree_tp.sum(-1, dtype=np.int64).astype(np.float64)  # (N, E) pixels of the final exit's class
        self.pixels = cache.agree_label_count.sum(-1, dtype=np.int64).astype(np.float64)  # (N,)
        self.idx = np.arange(n)

    def _upper(self, point: float, dev: np.ndarray) -> float:
        """``point`` plus the ``confidence`` quantile of ``dev`` (the new-set figure minus the resampled calibration figure)."""
        dev = dev[np.isfinite(dev)]
        return float(point + np.quantile(dev, self.confidence)) if dev.size else math.inf

    def _drop(self, assignment: np.ndarray) -> Tuple[float, np.ndarray]:
        tp, pc = self.tp[self.idx, assignment], self.pc[self.idx, assignment]
        point = self.final_point - miou_from_counts(tp.sum(0), pc.sum(0), self.lc_total)
        fit = self.final_fit - miou_from_counts(self.w_fit @ tp, self.w_fit @ pc, self.lc_fit)
        new = self.final_new - miou_from_counts(self.w_new @ tp, self.w_new @ pc, self.lc_new)
        return float(point), new - fit

    def _disagreement(self, assignment: np.ndarray) -> Tuple[float, np.ndarray]:
        agreed = self.agreed[self.idx, assignment]
        point = 1.0 - float(agreed.sum() / max(self.pixels.sum(), 1.0))
        fit = 1.0 - (self.w_fit @ agreed) / np.maximum(self.w_fit @ self.pixels, 1.0)
        new = 1.0 - (self.w_new @ agreed) / np.maximum(self.w_new @ self.pixels, 1.0)
        return point, new - fit

    def _cost(self, per_image: np.ndarray) -> Tuple[float, np.ndarray]:
        c = np.asarray(per_image, dtype=np.float64)
        return float(c.mean()), (self.w_new @ c) / self.new_images - (self.w_fit @ c) / self.num_images

    def drop(self, assignment: np.ndarray) -> Tuple[float, float]:
        """The drop in mIoU points of an assignment on the calibration images, and its upper bound."""
        point, dev = self._drop(assignment)
        return point, self._upper(point, dev)

    def disagreement(self, assignment: np.ndarray) -> Tuple[float, float]:
        """The share (0-1) of pixels whose class differs from the final exit's, and its upper bound."""
        point, dev = self._disagreement(assignment)
        return point, self._upper(point, dev)

    def cost(self, per_image: np.ndarray) -> Tuple[float, float]:
        """The mean of a per-image cost (each image's exit cost), and its upper bound on a new set."""
        point, dev = self._cost(per_image)
        return point, self._upper(point, dev)


def images_to_certify(images: int, point: float, upper: float, bound: float) -> Optional[int]:
    """About how many calibration images would certify a configuration with ``point`` and ``upper`` at
    ``images`` images for ``bound`` (its margin shrinks as one over the square root of the set's size,
    the new set growing with it); None when its point figure itself is over the bound."""
    room = bound - point
    margin = upper - point
    if room <= 0:
        return None
    if margin <= room:
        return int(images)
    return int(math.ceil(images * (margin / room) ** 2))
