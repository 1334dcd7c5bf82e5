"""Mean top-1 probability: ``conf = mean_p max_k softmax(z)_pk``; exit when ``conf >= t_i``."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mexify.policies.base import Policy, register_policy


@register_policy("maxprob")
class MaxProbPolicy(Policy):
    """Image confidence = mean over pixels of the top-1 softmax probability."""

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        return probs.max(dim=1).values.flatten(1).double().mean(1).float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        return cache.mean_maxprob[:, :-1].astype(np.float32).astype(np.float64)
