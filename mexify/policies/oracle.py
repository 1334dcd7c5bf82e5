"""Oracle: the upper bound every policy is measured against (needs labels, reports only).

Each image leaves at the earliest exit whose per-image mIoU is within ``tolerance``
mIoU points of the final exit's on that image. It cannot run at inference time
(it reads the labels); calibration reports its figures beside the fitted policy.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np
import torch

from mexify.errors import ConfigError
from mexify.policies.base import Policy, PolicyFit, register_policy


@register_policy("oracle")
class OraclePolicy(Policy):
    """Earliest exit within ``tolerance`` mIoU points of the final exit, per image."""

    needs_labels = True
    _params = ("tolerance",)

    def __init__(self, tolerance: float = 1.0, **kw: Any):
        super().__init__(**kw)
        self.tolerance = float(tolerance)

    def assignment(self, cache: Any) -> np.ndarray:
        """Exit index per image ``(N,)``."""
        return cache.oracle_assignment(self.tolerance)

    def fit_search(self, cache: Any, **search: Any) -> PolicyFit:
        """Figures of the oracle on the cache (no thresholds, no search; ``search`` is ignored)."""
        if not cache.labelled:
            raise ConfigError("the oracle needs labels", "calibrate on a labelled split")
        p = self._fit_params(cache)
        p.exit_names = list(cache.exit_names)
        p.figures = cache.figures(self.assignment(cache))
        p.thresholds = []
        return PolicyFit(p)

    def cache_scores(self, cache: Any) -> np.ndarray:
        raise ConfigError("the oracle has no confidence score", "it reads labels; use it for reports only")

    def decide(self, exit_index: int, logits: torch.Tensor, features=None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("the oracle cannot decide at inference time (it needs labels)", "calibrate another policy, e.g. mess")
