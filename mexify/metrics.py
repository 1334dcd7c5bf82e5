"""Segmentation metrics: the one definition of mIoU, a streaming confusion matrix and per-image mIoU.

Units: every score (IoU, mIoU, pixel accuracy) is in points, 0-100, the unit users read and
budgets are given in (``--max-drop 1.0`` is one point of mIoU). :func:`miou_from_counts` is the
one definition of mIoU: the confusion matrix, per-image mIoU, the exit cache and the threshold
search all call it.

No labelled pixel: a score over an image or a dataset without any counted pixel is NaN (undefined),
never 0 or 100, and such an image is left out wherever per-image scores are compared or learned from.

Counting is vectorised with ``torch.bincount`` and runs on the device the inputs live on. Pixels
whose target equals ``ignore_index`` (or lies outside ``[0, num_classes)``) are not counted.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch

from mexify.config import IGNORE_INDEX

__all__ = ["ConfusionMatrix", "per_image_miou", "miou_from_counts"]


def miou_from_counts(tp: Any, pred: Any, label: Any) -> Any:
    """mIoU in points (0-100) from per-class pixel counts: the one definition.

    A class counts when it is in the labels or the predictions (of labelled pixels); mIoU is the
    mean of those classes' IoU, ``tp / (pred + label - tp)``. With no class present (no labelled
    pixel), NaN.

    Args:
        tp, pred, label: arrays ``(..., K)`` (numpy or CPU tensors): true positives, predicted and
            labelled pixels per class, counted over labelled pixels only.

    Returns:
        a float for 1-D counts; else a float64 array over the leading axes (one mIoU per row).
    """
    tp = np.asarray(tp, dtype=np.float64)
    union = np.asarray(pred, dtype=np.float64) + np.asarray(label, dtype=np.float64) - tp
    present = union > 0
    if tp.ndim == 1:
        return float((tp[present] / union[present]).mean() * 100.0) if present.any() else math.nan
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    n = present.sum(-1)
    return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1) * 100.0, np.nan)


def _as_labels(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Turn logits ``(N, K, H, W)`` into labels when ``target`` is ``(N, H, W)``."""
    if pred.dim() == target.dim() + 1 and pred.is_floating_point():
        return pred.argmax(1)
    return pred


class ConfusionMatrix:
    """Streaming confusion matrix with mIoU, per-class IoU and pixel accuracy.

    Rows are target classes, columns are predicted classes.

    Args:
        num_classes: number of classes ``K``.
        ignore_index: target value that is never counted (default 255).
        device: where the ``(K, K)`` matrix lives; it follows the first update when None.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: Optional[Union[str, torch.device]] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._device = torch.device(device) if device is not None else None
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self._device)

    def reset(self) -> "ConfusionMatrix":
        """Zero the counts; returns self."""
        self.mat.zero_()
        return self

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        """Add a batch of predictions.

        Args:
            pred: integer labels with the shape of ``target`` (logits ``(N, K, H, W)``
                are accepted too and reduced with argmax over dim 1).
            target: integer labels; ``ignore_index`` pixels are skipped.

        Returns:
            self, so calls can be chained.

        Raises:
            ValueError: when shapes differ.
        """
        pred = _as_labels(pred, target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if self._device is None and self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        pred = pred.to(self.mat.device).reshape(-1).long()
        target = target.to(self.mat.device).reshape(-1).long()
        k = self.num_classes
        valid = (target != self.ignore_index) & (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
        idx = target[valid] * k + pred[valid]
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add the counts of ``other`` (e.g. from another process); returns self.

        Raises:
            ValueError: when the class counts differ.
        """
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        self.mat += other.mat.to(self.mat.device)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU in points (0-100), a float64 tensor ``(K,)``; NaN for classes absent from both target and prediction."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, 100.0 * tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """mIoU in points (0-100) over classes that appear in target or prediction (:func:`miou_from_counts`);
        NaN when nothing was counted."""
        m = self.mat.cpu()
        return miou_from_counts(m.diag(), m.sum(0), m.sum(1))

    def pixel_accuracy(self) -> float:
        """Counted pixels labelled correctly, in points (0-100); NaN when nothing was counted."""
        total = int(self.mat.sum())
        return 100.0 * float(self.mat.diag().sum()) / total if total else math.nan

    @property
    def total(self) -> int:
        """Number of pixels counted so far."""
        return int(self.mat.sum())

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, miou={self.miou():.2f})"


@torch.no_grad()
def per_image_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mIoU of each image in a batch, over the classes present in that image's target or prediction.

    Args:
        pred: integer labels ``(N, H, W)`` (or logits ``(N, K, H, W)``).
        target: integer labels ``(N, H, W)``.
        num_classes: ``K``.
        ignore_index: target value that is never counted.

    Returns:
        float32 tensor ``(N,)`` on ``target``'s device, in points (:func:`miou_from_counts`); NaN for an
        image without any counted pixel.
    """
    pred = _as_labels(pred, target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    n = target.shape[0]
    k = int(num_classes)
    pred = pred.to(target.device).reshape(n, -1).long()
    target = target.reshape(n, -1).long()
    valid = (target != ignore_index) & (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
    img = torch.arange(n, device=target.device).unsqueeze(1).expand_as(target)
    idx = (img * (k * k) + target * k + pred)[valid]
    mats = torch.bincount(idx, minlength=n * k * k).reshape(n, k, k).cpu()
    out = miou_from_counts(mats.diagonal(dim1=1, dim2=2), mats.sum(1), mats.sum(2))
    return torch.from_numpy(out).float().to(target.device)
