"""Joint image/mask transforms following the MESS training protocol.

Training: resize to a base resolution, random scale in [0.5, 2.0], random crop
(padded with the ignore index where the scaled image is smaller than the crop),
horizontal flip with p=0.5, normalisation. Evaluation: resize to the base
resolution (if one is given) and normalise.

Transforms take and return ``(image, mask)`` with ``image`` a float32 tensor
``(3, H, W)`` in [0, 1] before normalisation and ``mask`` an int64 tensor
``(H, W)``. Randomness comes from ``torch``'s generator, which DataLoader seeds
differently in every worker.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from mexify.config import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Tuple[int, int], Sequence[int]]

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegTransform",
    "build_transform",
    "resize",
    "random_scale",
    "random_crop",
    "random_hflip",
    "normalize",
    "to_rgb",
]


def _pair(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _base_hw(h: int, w: int, base_size: Size) -> Tuple[int, int]:
    """An int base size sets the longer side (aspect kept); a pair sets (H, W) exactly."""
    if isinstance(base_size, int):
        s = base_size / max(h, w)
        return (max(1, round(h * s)), max(1, round(w * s)))
    return _pair(base_size)


def resize(image: torch.Tensor, mask: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Resize image (bilinear) and mask (nearest) to ``hw``; a no-op when already that size."""
    if tuple(image.shape[-2:]) == tuple(hw):
        return image, mask
    image = F.interpolate(image.unsqueeze(0), size=hw, mode="bilinear", align_corners=False).squeeze(0)
    mask = F.interpolate(mask[None, None].float(), size=hw, mode="nearest-exact").squeeze(0).squeeze(0).long()
    return image, mask


def random_scale(image, mask, lo: float = 0.5, hi: float = 2.0):
    """Scale both by one factor drawn uniformly from ``[lo, hi]``."""
    s = lo + (hi - lo) * float(torch.rand(()))
    h, w = image.shape[-2:]
    return resize(image, mask, (max(1, round(h * s)), max(1, round(w * s))))


def random_crop(image, mask, crop: Size, ignore_index: int = IGNORE_INDEX):
    """Crop ``crop`` at a random position; pad first (image 0, mask ``ignore_index``) where smaller."""
    ch, cw = _pair(crop)
    h, w = image.shape[-2:]
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
        h, w = image.shape[-2:]
    y = int(torch.randint(0, h - ch + 1, ()))
    x = int(torch.randint(0, w - cw + 1, ()))
    return image[:, y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]


def random_hflip(image, mask, p: float = 0.5):
    """Flip both left-right with probability ``p``."""
    if float(torch.rand(())) < p:
        return image.flip(-1), mask.flip(-1)
    return image, mask


def to_rgb(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """The inverse of :func:`normalize`: a normalised ``(3, H, W)`` image as uint8 RGB ``(H, W, 3)`` (what a camera sends)."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return ((image.cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Channel-wise ``(image - mean) / std``."""
    if image.device.type == "cpu" and image.dtype == torch.float32:
        # numpy stays single-threaded: torch's intra-op pool thrashes on small shared CPUs
        arr = image.numpy()
        m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        return torch.from_numpy((arr - m) / s)
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image - m) / s


class SegTransform:
    """The MESS train or eval pipeline as one callable ``(image, mask) -> (image, mask)``.

    Args:
        train: apply the random augmentations.
        base_size: resize target first; int = longer side, pair = (H, W); None keeps the size.
        crop_size: training crop (int or (H, W)); None skips cropping.
        scale_range: random scale range for training.
        flip_p: horizontal flip probability for training.
        ignore_index: mask value used for padding.
        mean, std: normalisation; None skips it.
    """

    def __init__(
        self,
        train: bool = False,
        base_size: Optional[Size] = None,
        crop_size: Optional[Size] = None,
        scale_range: Tuple[float, float] = (0.5, 2.0),
        flip_p: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        mean: Optional[Sequence[float]] = IMAGENET_MEAN,
        std: Optional[Sequence[float]] = IMAGENET_STD,
    ):
        self.train = train
        self.base_size = base_size
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.flip_p = flip_p
        self.ignore_index = ignore_index
        self.mean = mean
        self.std = std

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        if self.base_size is not None:
            h, w = _base_hw(h, w, self.base_size)
        if self.train and tuple(self.scale_range) != (1.0, 1.0):
            # one resampling step for base size and random scale: composing two nearest-neighbour
            # resizes of the mask drifts up to a pixel away from the bilinear image
            lo, hi = self.scale_range
            s = lo + (hi - lo) * float(torch.rand(()))
            h, w = max(1, round(h * s)), max(1, round(w * s))
        image, mask = resize(image, mask, (h, w))
        if self.train:
            if self.crop_size is not None:
                image, mask = random_crop(image, mask, self.crop_size, self.ignore_index)
            if self.flip_p > 0:
                image, mask = random_hflip(image, mask, self.flip_p)
        if self.mean is not None and self.std is not None:
            image = normalize(image, self.mean, self.std)
        if not image.is_contiguous():
            image = image.contiguous()
        if not mask.is_contiguous():
            mask = mask.contiguous()
        return image, mask

    def __repr__(self) -> str:
        return (
            f"SegTransform(train={self.train}, base_size={self.base_size}, crop_size={self.crop_size}, "
            f"scale_range={self.scale_range}, flip_p={self.flip_p})"
        )


def build_transform(train: bool, base_size: Optional[Size] = None, crop_size: Optional[Size] = None, **kw) -> SegTransform:
    """Build the MESS train/eval transform (see :class:`SegTransform`).

    Args:
        train: training augmentations on or off.
        base_size: resize target (int = longer side, pair = (H, W)).
        crop_size: training crop size; defaults to ``base_size`` when training.

    Returns:
        A :class:`SegTransform`.
    """
    if train and crop_size is None:
        crop_size = base_size
    return SegTransform(train=train, base_size=base_size, crop_size=crop_size, **kw)
