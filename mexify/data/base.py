"""The dataset base class shared by the synthetic scenes and the on-disk readers."""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from mexify.config import IGNORE_INDEX
from mexify.errors import DataError


log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "SegDataset", "check_classes"]


class SegDataset(Dataset):
    """A segmentation dataset yielding ``(image, mask)`` after a joint transform.

    Subclasses implement ``__len__`` and ``load(index) -> (image, mask)`` with
    ``image`` float32 ``(3, H, W)`` in [0, 1] and ``mask`` int64 ``(H, W)``
    (ignore index 255), raising :class:`DataError` naming the file on bad data.

    Args:
        num_classes: number of classes.
        class_names: one name per class.
        transform: ``(image, mask) -> (image, mask)`` applied after loading.
        skip_bad: log a warning and use the next good sample instead of raising.
    """

    ignore_index = IGNORE_INDEX
    labelled = True
    """False when the samples carry no labels (every mask pixel is :data:`IGNORE_INDEX`)."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        transform: Optional[Callable] = None,
        skip_bad: bool = False,
    ):
        self.num_classes = int(num_classes)
        self.class_names: List[str] = list(class_names)
        self.transform = transform
        self.skip_bad = skip_bad
        self._bad: set = set()

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A short name for sample ``index`` (file path for readers)."""
        return f"sample {index}"

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        tried = 0
        i = index
        while True:
            if i not in self._bad:
                try:
                    image, mask = self.load(i)
                    break
                except DataError as exc:
                    if not self.skip_bad:
                        raise
                    self._bad.add(i)
                    log.warning("skipping %s: %s", self.describe(i), exc)
            tried += 1
            if tried >= n:
                raise DataError(f"every sample of this {type(self).__name__} is unreadable", "check the files or the dataset spec")
            i = (i + 1) % n
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def check_classes(dataset: object, num_classes: int) -> None:
    """Refuse a dataset whose class count differs from the model's (a Subset is looked through).

    Raises:
        DataError: one line naming both counts.
    """
    ds_classes = getattr(dataset, "num_classes", None)
    if ds_classes is None and hasattr(dataset, "dataset"):
        ds_classes = getattr(dataset.dataset, "num_classes", None)
    if ds_classes is not None and int(ds_classes) != int(num_classes):
        raise DataError(
            f"the dataset has {ds_classes} classes but the model predicts {num_classes}",
            f"use the dataset the model was converted for (e.g. synthetic:scenes?classes={num_classes}, "
            "or ?classes=N for a folder), or convert the model with a matching num_classes",
        )
