"""Resumable, reproducible data order: a run killed mid-epoch resumes on the very next batch.

- ``ResumableSampler`` shuffles each epoch from ``(seed, epoch)`` alone, gives each process its own
  equal share, and can start an epoch part-way through.
- ``SeededSamples`` makes every sample's augmentation a function of ``(seed, epoch, index)``, so the
  random crops, flips and RandAugment ops do not depend on which worker loads a sample or on what
  that worker loaded before (after a resume they are the ones the killed run would have drawn).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators inside the block; restore them after."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)           # the CPU generator only: CUDA's is left alone
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededSamples(Dataset):
    """Wraps a data set; items are requested as ``(epoch, index)`` and drawn under a seed of both."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded(hash((self.seed, epoch, index)) % 2 ** 63):
            return self.dataset[index]


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` keys for ``SeededSamples``: this process's share of one epoch.

    Every process draws the same permutation of ``(seed, epoch)`` and takes every ``world``-th
    sample from ``rank``; the epoch is cut to whole batches (the same count on every process, even
    sizes for Mixup). ``set_position(epoch, batch)`` starts the next iteration at that batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.batches = size // (batch_size * world)
        if self.batches == 0:
            raise ValueError(f"a data set of {size} samples is smaller than one batch of {batch_size} "
                             f"on each of {world} process(es)")
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start = epoch, batch

    def __len__(self) -> int:
        return (self.batches - self.start) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        mine = order[self.rank::self.world][: self.batches * self.batch_size]
        return iter([(self.epoch, int(i)) for i in mine[self.start * self.batch_size:]])


def train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, rank: int, world: int,
                 collate_fn: Callable | None = None) -> DataLoader:
    """A loader over ``SeededSamples(dataset)`` driven by a ``ResumableSampler`` (``loader.sampler``).

    Creating an iterator draws a seed from the loader's ``generator``; it has its own, because a
    resumed run creates one at a different step than the uninterrupted run would."""
    sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world)
    return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(), drop_last=True,
                      generator=torch.Generator().manual_seed(seed))   # not the global RNG: dropout's stays as it was


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int, world: int,
                collate_fn: Callable | None = None) -> DataLoader:
    """In order, every ``world``-th sample from ``rank`` (shares may differ by one; nothing is repeated)."""
    return DataLoader(torch.utils.data.Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size,
                      shuffle=False, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available())
