"""Datasets for mexify: synthetic scenes, on-disk readers, MESS transforms and loaders.

The entry points are :func:`build_dataset` (from a spec string such as
``synthetic:scenes?classes=8&size=128`` or ``voc:/data/VOC2012``) and
:func:`build_loader`. Every dataset yields ``(image, mask)``: image float32
``(3, H, W)`` normalised with the ImageNet statistics, mask int64 ``(H, W)``
with :data:`IGNORE_INDEX` (255) on pixels that carry no label.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple, Union

from mexify.config import IGNORE_INDEX
from mexify.data import readers
from mexify.data.base import SegDataset, check_classes
from mexify.data.loader import as_loader, build_loader, default_num_workers, pad_collate, split_batch, take, unpadded
from mexify.data.spec import DatasetSpec, OptionReader, parse_spec
from mexify.data.synthetic import SceneConfig, SyntheticScenes
from mexify.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegTransform, build_transform, to_rgb
from mexify.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_rgb",
    "SegDataset",
    "check_classes",
    "SyntheticScenes",
    "SceneConfig",
    "SegTransform",
    "DatasetSpec",
    "build_dataset",
    "build_loader",
    "as_loader",
    "split_batch",
    "take",
    "unpadded",
    "default_num_workers",
    "build_transform",
    "pad_collate",
    "available_schemes",
    "parse_spec",
    "parse_dataset_spec",
]

_SCENE_OPTIONS = (
    "classes", "size", "n", "n_eval", "seed", "dmin", "dmax", "mix", "max_objects",
    "noise", "blur", "contrast", "clutter", "cache", "split", "base_size", "crop_size",
)


def _scene_config(spec: DatasetSpec) -> Tuple[OptionReader, SceneConfig]:
    """The synthetic scenes' options, checked: the reader and the :class:`SceneConfig` they give."""
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
    o.size("base_size", None)
    o.size("crop_size", None)
    return o, cfg


def _build_synthetic(spec: DatasetSpec, split: str, train: bool, crop_size, base_size) -> SegDataset:
    o, cfg = _scene_config(spec)
    split = o.get("split", split)
    base_size = o.size("base_size", base_size)
    crop_size = o.size("crop_size", crop_size)
    if base_size is None:
        base_size = cfg.size
    if train and crop_size is None:
        crop_size = base_size if isinstance(base_size, int) else tuple(base_size)
    transform = build_transform(train, base_size=base_size, crop_size=crop_size)
    return SyntheticScenes(cfg, split=split, transform=transform)


def _readers() -> Dict[str, Callable]:
    return readers.BUILDERS


def available_schemes() -> List[str]:
    """The dataset spec schemes :func:`build_dataset` understands."""
    return ["synthetic", *_readers().keys()]


def parse_dataset_spec(spec: Union[str, DatasetSpec]) -> DatasetSpec:
    """A dataset spec, checked without reading the disk: scheme, option names and their values.

    Raises:
        DataError: what is wrong (the valid schemes or options are named).
    """
    parsed = spec if isinstance(spec, DatasetSpec) else parse_spec(spec, available_schemes())
    if parsed.scheme == "synthetic":
        _scene_config(parsed)
    else:
        readers.check_options(parsed)
    return parsed


def build_dataset(
    spec: str,
    split: str = "train",
    train: bool = False,
    crop_size=None,
    base_size=None,
    num_classes: Optional[int] = None,
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
        num_classes: the class count of the model the data is for, used by ``folder:`` datasets whose spec
            and ``classes.txt`` give none (a folder without masks needs one of the three).

    Returns:
        A :class:`SegDataset` with ``num_classes`` and ``class_names``.

    Raises:
        DataError: unknown scheme (the valid ones are listed), bad options, missing files.
    """
    parsed = parse_dataset_spec(spec)
    if parsed.scheme == "synthetic":
        ds = _build_synthetic(parsed, split, train, crop_size, base_size)
    else:
        extra = {"num_classes": num_classes} if parsed.scheme == "folder" else {}  # other layouts define their classes
        ds = _readers()[parsed.scheme](parsed, split=split, train=train, crop_size=crop_size, base_size=base_size, **extra)
    log.info("dataset %s split=%s: %d samples, %d classes", parsed, getattr(ds, "split", split), len(ds), ds.num_classes)
    return ds
