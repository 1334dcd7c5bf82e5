"""Datasets for mexify: synthetic scenes, on-disk readers, MESS transforms and loaders.

The entry points are :func:`build_dataset` (from a spec string such as
``synthetic:scenes?classes=8&size=128`` or ``voc:/data/VOC2012``) and
:func:`build_loader`. Every dataset yields ``(image, mask)``: image float32
``(3, H, W)`` normalised with the ImageNet statistics, mask int64 ``(H, W)``
with :data:`IGNORE_INDEX` (255) on pixels that carry no label.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from mexify.data.base import IGNORE_INDEX, SegDataset
from mexify.data.spec import DatasetSpec, OptionReader, parse_spec
from mexify.data.synthetic import SceneConfig, SyntheticScenes
from mexify.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegTransform, build_transform
from mexify.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegDataset",
    "SyntheticScenes",
    "SceneConfig",
    "SegTransform",
    "DatasetSpec",
    "build_dataset",
    "build_loader",
    "build_transform",
    "pad_collate",
    "available_schemes",
    "parse_spec",
]

_SCENE_OPTIONS = (
    "classes", "size", "n", "n_eval", "seed", "dmin", "dmax", "mix", "max_objects",
    "noise", "blur", "contrast", "clutter", "cache", "split", "base_size", "crop_size",
)


def _size_opt(raw: str):
    """``512`` -> 512 (longer side); ``512x1024`` -> (512, 1024) as (H, W)."""
    if "x" in raw.lower():
        h, w = raw.lower().split("x", 1)
        return (int(h), int(w))
    return int(raw)


def _build_synthetic(spec: DatasetSpec, split: str, train: bool, crop_size, base_size) -> SegDataset:
    if spec.target not in ("scenes", ""):
        raise DataError(f"unknown synthetic dataset {spec.target!r} in {str(spec)!r}", "the built-in one is synthetic:scenes")
    o = OptionReader(spec, _SCENE_OPTIONS)
    d = SceneConfig()
    cfg = SceneConfig(
        classes=o.int("classes", d.classes, lo=2),
        size=o.int("size", d.size, lo=16),
        n=o.int("n", d.n, lo=1),
        n_eval=o.int("n_eval", None, lo=1),
        seed=o.int("seed", d.seed),
        dmin=o.float("dmin", d.dmin, 0.0, 1.0),
        dmax=o.float("dmax", d.dmax, 0.0, 1.0),
        mix=o.choice("mix", d.mix, ("uniform", "easy", "hard")),
        max_objects=o.int("max_objects", d.max_objects, lo=1),
        noise=o.float("noise", d.noise, 0.0),
        blur=o.float("blur", d.blur, 0.0),
        contrast=o.float("contrast", d.contrast, 0.0, 1.4),
        clutter=o.float("clutter", d.clutter, 0.0),
        cache=o.bool("cache", d.cache),
    )
    split = o.get("split", split)
    base_size = o.get("base_size", base_size, _size_opt)
    crop_size = o.get("crop_size", crop_size, _size_opt)
    if base_size is None:
        base_size = cfg.size
    if train and crop_size is None:
        crop_size = base_size if isinstance(base_size, int) else tuple(base_size)
    transform = build_transform(train, base_size=base_size, crop_size=crop_size)
    return SyntheticScenes(cfg, split=split, transform=transform)


def _readers() -> Dict[str, Callable]:
    from mexify.data import readers

    return readers.BUILDERS


def available_schemes() -> List[str]:
    """The dataset spec schemes :func:`build_dataset` understands."""
    return ["synthetic", *_readers().keys()]


def build_dataset(
    spec: str,
    split: str = "train",
    train: bool = False,
    crop_size=None,
    base_size=None,
) -> SegDataset:
    """Build a dataset from a spec string.

    Args:
        spec: ``synthetic:scenes[?k=v&...]``, ``voc:PATH``, ``cityscapes:PATH``, ``ade20k:PATH``
            or ``folder:PATH``, each with optional ``?key=value`` options (``split=`` in the spec
            overrides ``split``; ``skip_bad=1`` skips unreadable samples with a warning).
        split: train, val (and calib/test for synthetic scenes; readers map them onto their splits).
        train: apply the MESS training augmentations (random scale, crop, flip).
        crop_size: training crop, int or (H, W); defaults per dataset.
        base_size: resize target before augmentation, int (longer side) or (H, W); defaults per dataset.

    Returns:
        A :class:`SegDataset` with ``num_classes`` and ``class_names``.

    Raises:
        DataError: unknown scheme (the valid ones are listed), bad options, missing files.
    """
    if isinstance(spec, DatasetSpec):
        parsed = spec
    else:
        parsed = parse_spec(spec, ["synthetic", "voc", "cityscapes", "ade20k", "folder"])
    if parsed.scheme == "synthetic":
        ds = _build_synthetic(parsed, split, train, crop_size, base_size)
    else:
        ds = _readers()[parsed.scheme](parsed, split=split, train=train, crop_size=crop_size, base_size=base_size)
    log.info("dataset %s split=%s: %d samples, %d classes", parsed, getattr(ds, "split", split), len(ds), ds.num_classes)
    return ds


def pad_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX):
    """Stack ``(image, mask)`` pairs, padding smaller ones (image 0, mask ``ignore_index``) at bottom/right.

    Returns:
        ``(images (N, 3, H, W), masks (N, H, W))``.
    """
    hs = [img.shape[-2] for img, _ in batch]
    ws = [img.shape[-1] for img, _ in batch]
    h, w = max(hs), max(ws)
    if all(x == h for x in hs) and all(x == w for x in ws):
        return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    images = batch[0][0].new_zeros((len(batch), batch[0][0].shape[0], h, w))
    masks = torch.full((len(batch), h, w), ignore_index, dtype=torch.int64)
    for i, (img, m) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        masks[i, : m.shape[-2], : m.shape[-1]] = m
    return images, masks


def default_num_workers() -> int:
    """Workers that use the cores this process may run on (capped at 8; 0 on a single core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(cores, 8)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: Optional[int] = None,
    distributed: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader that uses the available cores.

    Args:
        dataset: the dataset.
        batch_size: samples per batch (per process when distributed).
        shuffle: shuffle every epoch (through the DistributedSampler when distributed).
        num_workers: loader workers; None uses one per available core (0 on a single core).
        distributed: shard with a ``DistributedSampler`` (call ``loader.sampler.set_epoch(e)`` each epoch).
        drop_last: drop the last incomplete batch.
        seed: seed of the shuffling order.

    Returns:
        A ``torch.utils.data.DataLoader`` (pinned memory when CUDA is available; images of
        different sizes are padded with :func:`pad_collate`).
    """
    if num_workers is None:
        num_workers = default_num_workers()
    sampler = None
    generator = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
        shuffle = False
    elif shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed)
    kwargs = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        collate_fn=pad_collate,
        generator=generator,
        **kwargs,
    )
