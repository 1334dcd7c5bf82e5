"""Poly learning-rate schedule: ``lr = lr0 * (1 - it / total) ** power``."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["poly_factor", "PolyLR"]


def poly_factor(iteration: int, total: int, power: float = 0.9) -> float:
    """Multiplier of the initial lr at ``iteration`` (0 at and after ``total``)."""
    if total <= 0:
        return 1.0
    return max(0.0, 1.0 - iteration / total) ** power


class PolyLR(LRScheduler):
    """Poly decay over ``total_iters`` steps; call :meth:`step` once per iteration.

    A scheduler class rather than ``LambdaLR`` with a closure, so its state dict holds only
    numbers and checkpoints load with ``weights_only=True``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9, last_epoch: int = -1):
        self.total_iters = int(total_iters)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        f = poly_factor(self.last_epoch, self.total_iters, self.power)
        return [base * f for base in self.base_lrs]
