"""A resumable stream of training batches.

Which images make up batch ``i`` of a stage, and how each is augmented, is a pure function of
``(seed, stage, i)``: the epoch's order comes from a ``DistributedSampler`` seeded per stage and
re-shuffled per epoch, and every sample is loaded with the global RNGs reseeded from its own
position. A run resumed at iteration ``i`` therefore sees exactly the batches the uninterrupted
run would have seen, on any number of data workers, without replaying the earlier ones.
"""
from __future__ import annotations

import random
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mexify.errors import ConfigError

__all__ = ["BatchStream", "derive_seed"]

_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps; stable across runs and platforms)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & _MASK


class _SeededDataset(Dataset):
    """Loads ``base[index]`` with torch/Python/NumPy RNGs seeded from the sample's own seed."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % (1 << 32))
        except ImportError:  # pragma: no cover
            pass
        return self.base[index]


class BatchStream:
    """Batches of one training stage, startable at any iteration.

    Args:
        dataset: yields ``(image, mask)``.
        batch_size: per process.
        seed, stage: together select the data order and augmentation.
        rank, world_size: this process's shard (each rank sees different images).
        num_workers: DataLoader workers.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, stage: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = derive_seed(seed, stage)
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed % (1 << 31), drop_last=False
        )
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch < 1:
            raise ConfigError(
                f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size} per process "  # type: ignore[arg-type]
                f"({world_size} process(es))",
                "lower batch_size with --set batch_size=... or use a larger dataset",
            )

    def _epoch_keys(self, epoch: int) -> List[Tuple[int, int]]:
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)[: self.per_epoch * self.batch_size]
        # The seed depends on the global position, so ranks augment differently.
        return [
            (idx, derive_seed(self.seed, epoch, pos * self.world_size + self.rank))
            for pos, idx in enumerate(indices)
        ]

    def iterate(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches from iteration ``start`` on, forever."""
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            keys = self._epoch_keys(epoch)[offset * self.batch_size:]
            loader = DataLoader(
                _SeededDataset(self.dataset), batch_size=self.batch_size, sampler=keys, drop_last=True,
                num_workers=self.num_workers, pin_memory=self.pin_memory,
                persistent_workers=False,
            )
            yield from loader
            epoch, offset = epoch + 1, 0
