"""Batches: the one way mexify turns datasets into loaders and loader items into (images, masks)."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from mexify.config import IGNORE_INDEX
from mexify.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["build_loader", "as_loader", "take", "split_batch", "unpadded", "pad_collate", "default_num_workers"]


def split_batch(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(images, masks or None)`` from a loader item: a tuple/list, a dict with ``image``/``mask``, or images alone."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch["image"], batch.get("mask")
    return batch, None


def unpadded(batches: Iterable[Any]) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(images, masks)`` batches in which every image is at its own size.

    A batch that :func:`pad_collate` padded (it then carries each image's size as a third
    element) is split into groups of equal size, each cropped to that size, so that what is
    computed for an image never depends on the images it was batched with.
    """
    for batch in batches:
        x, y = split_batch(batch)
        sizes = batch[2] if isinstance(batch, (list, tuple)) and len(batch) > 2 else None
        if sizes is None or bool((sizes == sizes[0]).all()):
            if sizes is not None:
                h, w = (int(v) for v in sizes[0])
                x, y = x[..., :h, :w], (y[..., :h, :w] if y is not None else None)
            yield x, y
            continue
        for hw in dict.fromkeys(tuple(int(v) for v in s) for s in sizes):
            rows = torch.tensor([i for i, s in enumerate(sizes) if tuple(int(v) for v in s) == hw])
            h, w = hw
            yield x[rows, :, :h, :w], (y[rows, :h, :w] if y is not None else None)


def take(dataset: Any, limit: Optional[int]) -> Any:
    """The first ``limit`` samples of a map-style dataset (its ``num_classes`` and ``class_names`` kept)."""
    if limit is None or not hasattr(dataset, "__len__") or limit >= len(dataset):
        return dataset
    subset = Subset(dataset, range(int(limit)))
    for attr in ("num_classes", "class_names"):
        if hasattr(dataset, attr):
            setattr(subset, attr, getattr(dataset, attr))
    return subset


def as_loader(data: Any, batch_size: int, limit: Optional[int] = None, num_workers: Optional[int] = 0) -> Iterable[Any]:
    """Batches of ``(image, mask)`` from a dataset (its first ``limit`` samples), a DataLoader or an iterable of batches.

    A dataset is anything map-style, as for ``DataLoader``: a ``Dataset`` or a list of samples.
    A DataLoader or another iterable passes through unchanged (``limit`` is then up to the caller).

    Raises:
        DataError: ``data`` is neither a dataset nor iterable.
    """
    map_style = isinstance(data, (Dataset, list, tuple)) and not isinstance(data, torch.utils.data.IterableDataset)
    if map_style:
        return build_loader(take(data, limit), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if isinstance(data, Iterable):
        return data
    raise DataError(f"cannot read batches from {type(data).__name__}", "pass a dataset spec, a Dataset or a DataLoader")


def pad_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX):
    """Stack ``(image, mask)`` pairs, padding smaller ones (image 0, mask ``ignore_index``) at bottom/right.

    Returns:
        ``(images (N, 3, H, W), masks (N, H, W))``, plus ``sizes (N, 2)`` (each image's own H, W)
        when padding was needed; :func:`unpadded` undoes the padding for evaluation.
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
    return images, masks, torch.tensor([[h_, w_] for h_, w_ in zip(hs, ws)])


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
