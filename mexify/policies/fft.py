"""FFT energy (the multi-exit HRNet thesis): jittery early predictions carry more high-frequency energy.

What is transformed: the exit's **top-1 probability map** ``c`` (its own resolution, the
temperature applied), with its mean removed. Its 2-D FFT magnitude ``|F(c)|`` (orthonormal, so
independent of the map's size up to the band's sampling) is averaged over one radial band of
frequencies: with ``r = sqrt(fy^2 + fx^2) / 0.5`` the frequency as a fraction of Nyquist
(``fy``, ``fx`` in cycles per pixel), band ``b`` covers ``BANDS[b][0] <= r < BANDS[b][1]``. A
smooth, confident map has little energy there; a speckled one has much::

    E_b = mean_{r in band b} |F(c - mean c)|          conf = -log(E_b + 1e-12)

The band is fitted on the calibration cache: the one whose thresholds reach the budget best
(highest mIoU within a cost budget, lowest cost within a drop); with a confidence, by point fits on
the half of the images that proposes thresholds, so the half that certifies them chose nothing. The cache keeps ``E_b`` for every
band, computed by the same function (:func:`band_energy`) as the run time, so fitted scores equal
run-time scores.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional, Tuple

import numpy as np
import torch

from mexify.errors import ConfigError
from mexify.policies.base import Policy, PolicyFit, register_policy

__all__ = ["BANDS", "band_energy", "FFTPolicy"]

#: Radial frequency bands, as fractions of Nyquist (the last ones reach the corners, r up to sqrt 2).
BANDS: Tuple[Tuple[float, float], ...] = (
    (1 / 16, 1 / 8),
    (1 / 8, 1 / 4),
    (1 / 4, 1 / 2),
    (1 / 2, math.inf),
    (1 / 8, math.inf),
    (1 / 4, math.inf),
)


def _band_masks(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(len(BANDS), h, w // 2 + 1)`` float64 masks of rfft2 bins per band, each normalised to mean 1 over its bins."""
    # fftfreq / rfftfreq written out (ONNX has no op for them): cycles per pixel of each rfft2 bin
    iy = torch.arange(h, device=device, dtype=torch.float64)
    fy = (torch.where(iy < (h + 1) // 2, iy, iy - h) / h)[:, None]
    fx = (torch.arange(w // 2 + 1, device=device, dtype=torch.float64) / w)[None, :]
    r = torch.sqrt(fy * fy + fx * fx) / 0.5
    masks = torch.stack([((r >= lo) & (r < hi)).to(torch.float64) for lo, hi in BANDS])
    count = masks.flatten(1).sum(1).clamp_min(1.0)
    return masks / count[:, None, None]


def band_energy(top1: torch.Tensor) -> torch.Tensor:
    """Mean FFT magnitude of each mean-removed map in every band of :data:`BANDS`: ``(N, h, w) -> (N, len(BANDS))`` float64.

    A band with no frequency bin at this map size (a tiny map) has energy 0.
    """
    c = top1.to(torch.float64)
    c = c - c.mean(dim=(-2, -1), keepdim=True)
    mag = torch.fft.rfft2(c, norm="ortho").abs()
    masks = _band_masks(int(c.shape[-2]), int(c.shape[-1]), c.device)
    # a plain reduction per (image, band), not a matmul: an image's value must not depend on its batch
    return (mag[:, None] * masks[None]).flatten(2).sum(-1)


def confidence(energy: Any) -> Any:
    """``-log(E + 1e-12)`` (numpy or torch): higher is more certain."""
    if isinstance(energy, torch.Tensor):
        return -torch.log(energy + 1e-12)
    return -np.log(energy + 1e-12)


@register_policy("fft")
class FFTPolicy(Policy):
    """Image confidence = -log of the mean FFT magnitude of the top-1 probability map in a fitted band."""

    _params = ("band",)

    def __init__(self, band: Optional[int] = None, **kw: Any):
        super().__init__(**kw)
        if band is not None and not 0 <= int(band) < len(BANDS):
            raise ConfigError(f"fft band must be one of 0..{len(BANDS) - 1}, got {band}", "leave it out to fit it on the cache")
        self.band = None if band is None else int(band)

    def fit_search(self, cache: Any, **search: Any) -> PolicyFit:
        """Fit thresholds for each band (or the given one) and keep the band that reaches the budget best."""
        if getattr(cache, "fft_energy", None) is None:
            raise ConfigError("this exit cache has no FFT energies (made by an older mexify)", "collect it again (mexify calibrate)")
        if self.band is not None:
            return super().fit_search(cache, **search)
        # With a confidence, the band is chosen by point fits on the half of the images that proposes thresholds:
        # choosing the best of the bands' certified fits would be a selection the certificate does not cover,
        # and the other half must not have helped choose anything it certifies.
        certified = bool(search.get("confidence"))
        chooser, choose = (cache.proposal_half(), {**search, "confidence": 0.0}) if certified else (cache, search)
        best, best_key = None, None
        for b in range(len(BANDS)):
            trial = copy.deepcopy(self)
            trial.band = b
            fit = Policy.fit_search(trial, chooser, **choose)
            f = fit.policy.figures
            key = (f["miou"], -f["mean_cost"]) if search.get("max_cost") is not None else (-f["mean_cost"], f["miou"])
            if best_key is None or key > best_key:
                best, best_key = fit, key
        if not certified:
            return best
        chosen = copy.deepcopy(self)
        chosen.band = best.policy.band
        return Policy.fit_search(chosen, cache, **search)

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        if self.band is None:
            raise ConfigError("the fft policy has no band", "fit it with `mexify calibrate --policy fft`")
        energy = band_energy(probs.max(dim=1).values)[:, self.band]
        return confidence(energy).float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        energy = cache.fft_energy[:, :-1, self.band]
        return confidence(energy).astype(np.float32).astype(np.float64)
