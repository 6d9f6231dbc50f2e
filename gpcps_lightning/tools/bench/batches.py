"""Synthetic training batches made once on the benchmark device, and the dataset that replays them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.tools.bench.config import BenchConfig

__all__ = ["make_batches"]


def make_batches(config: BenchConfig, count: int = 2) -> list[SemiSupervisedBatch]:
    """Synthetic training batches, already on the benchmark device.

    Each mask holds one random rectangle of foreground (a quarter to a half of each side), so that the
    penalty's background set is a realistic, non-empty part of the image.

    Args:
        config: A checked configuration.
        count: Number of different batches.

    Returns:
        ``count`` batches of ``config.batch_size`` labeled and unlabeled images.
    """
    g = torch.Generator().manual_seed(config.seed)
    n, s = config.batch_size, config.image_size
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    batches = []
    for _ in range(count):
        labeled = torch.randn(n, 3, s, s, generator=g)
        unlabeled = torch.randn(n, 3, s, s, generator=g)
        mask = torch.zeros(n, 1, s, s)
        for i in range(n):
            h, w = (int(v) for v in torch.randint(s // 4, s // 2 + 1, (2,), generator=g))
            top, left = (int(v) for v in torch.randint(0, s - max(h, w) + 1, (2,), generator=g))
            mask[i, :, top : top + h, left : left + w] = 1.0
        labeled = labeled + mask  # foreground is brighter: something to learn
        batches.append(
            SemiSupervisedBatch(
                labeled=labeled.to(config.torch_device).contiguous(memory_format=fmt),
                mask=mask.to(config.torch_device).contiguous(memory_format=fmt),
                unlabeled=unlabeled.to(config.torch_device).contiguous(memory_format=fmt),
            )
        )
    return batches


class CycleDataset(Dataset):
    """``length`` items cycling through pre-made batches (yielded as they are with ``batch_size=None``)."""

    def __init__(self, batches: Sequence[SemiSupervisedBatch], length: int) -> None:
        self.batches, self.length = list(batches), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SemiSupervisedBatch:
        return self.batches[index % len(self.batches)]


def identity(item: Any) -> Any:
    """The collate function of :class:`CycleDataset`'s loader: each item is a whole batch already."""
    return item
