"""Mean pixel entropy (the factory-floor thesis): exit when the mean entropy is low.

``H_p = -sum_k p_pk log p_pk`` (nats); the image's mean entropy ``H`` is turned into a
confidence in [0, 1] so that every policy reads "higher is more certain"::

    conf = 1 - mean_p H_p / log K        exit when conf >= t_i   (i.e. H <= (1 - t_i) log K)
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mexify.policies.base import Policy, register_policy


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the pixel entropy (nats), ``(N,)``; 0 log 0 counts as 0."""
    return torch.special.entr(probs).sum(1).flatten(1).double().mean(1)


@register_policy("entropy")
class EntropyPolicy(Policy):
    """Image confidence = 1 - mean pixel entropy / log K."""

    def _scores_from_probs(self, exit_index: int, probs: torch.Tensor) -> torch.Tensor:
        k = probs.shape[1]
        return (1.0 - mean_entropy(probs) / math.log(max(k, 2))).float()

    def cache_scores(self, cache: Any) -> np.ndarray:
        k = cache.num_classes
        return (1.0 - cache.mean_entropy[:, :-1].astype(np.float64) / math.log(max(k, 2))).astype(np.float32).astype(np.float64)
