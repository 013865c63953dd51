"""Deterministic per-epoch shuffling: the order depends only on (seed, epoch)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(size)`` drawn from ``(seed, epoch)`` alone.

    Unlike ``RandomSampler`` it never touches the global RNG, so a resumed run sees exactly the
    order the uninterrupted run saw (Accelerate shards it across processes).
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
