"""Losses of the two training stages: per-exit cross-entropy, KD and positive filtering KD.

All functions take logits ``(N, K, H, W)`` and integer targets ``(N, H, W)`` with
``ignore_index`` (255) marking unlabelled pixels. Losses are computed in float32 whatever the
autocast dtype of the logits.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mexify.config import IGNORE_INDEX
from mexify.errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "cross_entropy",
    "multi_exit_ce",
    "kd_map",
    "positive_mask",
    "distillation_loss",
    "early_exit_loss",
    "early_exits_loss",
]



def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean CE over labelled pixels; 0 (with a graph) when no pixel is labelled, never NaN."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp_min(1)
    return total / count


def multi_exit_ce(
    logits: Sequence[Tensor],
    target: Tensor,
    weights: Optional[Sequence[float]] = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[Tensor, List[Tensor]]:
    """Stage-1 loss: ``sum_i w_i * CE(logits_i, target)`` over every exit (final last).

    Returns:
        ``(total, per_exit)``: the weighted sum and the unweighted CE of each exit.
    """
    if weights is None:
        weights = [1.0] * len(logits)
    if len(weights) != len(logits):
        raise ConfigError(
            f"exit_weights has {len(weights)} entries but the model has {len(logits)} exits",
            f"give one weight per exit (early exits, then final), e.g. --set exit_weights=[{','.join(['1'] * len(logits))}]",
        )
    per_exit = [cross_entropy(lg, target, ignore_index) for lg in logits]
    total = sum(w * l for w, l in zip(weights, per_exit))
    return total, per_exit


def kd_map(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-pixel distillation term ``T^2 * KL(softmax(t/T) || softmax(s/T))``, shape ``(N, H, W)``.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    The teacher is detached.
    """
    t = teacher.detach().float() / temperature
    s = student.float() / temperature
    log_p_t = F.log_softmax(t, dim=1)
    log_p_s = F.log_softmax(s, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * (temperature**2)


def positive_mask(teacher: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixels the teacher gets right: ``argmax(teacher) == target`` on labelled pixels."""
    return (teacher.detach().argmax(dim=1) == target) & (target != ignore_index)


def distillation_loss(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor] = None,
    mode: str = "pfd",
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """Distillation from the final exit (teacher) to an early exit (student).

    Args:
        mode: ``"pfd"`` (positive filtering distillation): KD counted only on pixels where the
            teacher's prediction equals the label, so the KD and CE signals never contradict;
            ``"kd"``: KD on every pixel; ``"none"``: zero.
        reduction: ``"none"`` returns the per-pixel map ``(N, H, W)`` (zero where filtered
            out); ``"mean"`` averages it over labelled pixels for ``pfd`` (the same
            denominator as :func:`cross_entropy`, so filtered pixels count as zero), over all
            pixels for ``kd``.
    """
    if mode == "none":
        zero = student.float().sum() * 0.0
        return zero if reduction == "mean" else torch.zeros_like(student[:, 0], dtype=torch.float32)
    if mode not in ("pfd", "kd"):
        raise ConfigError(f"unknown distillation mode {mode!r}", "use pfd, kd or none")
    per_pixel = kd_map(student, teacher, temperature)
    if mode == "pfd":
        if target is None:
            raise ValueError("positive filtering distillation needs the target labels")
        per_pixel = per_pixel * positive_mask(teacher, target, ignore_index)
        denom = (target != ignore_index).sum().clamp_min(1)
    else:
        denom = per_pixel.numel()
    if reduction == "none":
        return per_pixel
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    return per_pixel.sum() / denom


def early_exit_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    mode: str = "pfd",
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Stage-2 loss of one early exit: ``CE + kd_weight * distillation`` (:func:`early_exits_loss` for one exit).

    Returns:
        ``(total, ce, distill)``.
    """
    total, ces, kds = early_exits_loss([student], teacher, target, mode, kd_weight, temperature, ignore_index)
    return total, ces[0], kds[0]


def early_exits_loss(
    students: Sequence[Tensor],
    teacher: Tensor,
    target: Tensor,
    mode: str = "pfd",
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Stage-2 loss of every early exit at once: ``sum_i CE_i + kd_weight * distill_i``.

    Equal to summing ``cross_entropy + kd_weight * distillation_loss`` over the exits, but the teacher's side (its
    probabilities, entropy and the positive-filter mask) is computed once per batch, and each
    student needs one ``log_softmax`` shared by CE and KD (at temperature 1): KL(p_t || p_s)
    summed over pixels is ``sum p_t log p_t`` (a constant) minus ``sum p_t log p_s``.

    Returns:
        ``(total, ce_per_exit, distill_per_exit)``.
    """
    if mode not in ("pfd", "kd", "none"):
        raise ConfigError(f"unknown distillation mode {mode!r}", "use pfd, kd or none")
    n_lab = (target != ignore_index).sum().clamp_min(1)
    if mode != "none":
        with torch.no_grad():
            t = teacher.detach().float()
            log_pt = F.log_softmax(t / temperature, dim=1)
            pt = log_pt.exp()
            if mode == "pfd":
                pt = pt * positive_mask(t, target, ignore_index).unsqueeze(1)
                denom = n_lab
            else:
                denom = t.numel() // t.shape[1]
            neg_entropy = (pt * log_pt).sum()
            scale = temperature**2 / denom
    total = teacher.new_zeros((), dtype=torch.float32)
    ces: List[Tensor] = []
    kds: List[Tensor] = []
    for student in students:
        log_s = F.log_softmax(student.float(), dim=1)
        ce = F.nll_loss(log_s, target, ignore_index=ignore_index, reduction="sum") / n_lab
        if mode == "none":
            kd = log_s.sum() * 0.0
        else:
            log_s_t = log_s if temperature == 1.0 else F.log_softmax(student.float() / temperature, dim=1)
            kd = (neg_entropy - (pt * log_s_t).sum()) * scale
        total = total + ce + kd_weight * kd
        ces.append(ce)
        kds.append(kd)
    return total, ces, kds
