from __future__ import annotations

import os
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from gpcps_lightning.batch import EvaluationBatch, SemiSupervisedBatch

os.environ.setdefault("WANDB_MODE", "offline")

#: A small, fast network for tests: timm ResNet-18 cut to three stages (timm drops the
#: unused ones), narrow decoder.
TINY_NET: dict[str, Any] = {
    "arch": "Unet",
    "encoder_name": "tu-resnet18",
    "network_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
}


@pytest.fixture
def tiny_net() -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_NET.items()}


def random_semi_batch(n: int = 2, size: int = 32, seed: int = 0) -> SemiSupervisedBatch:
    g = torch.Generator().manual_seed(seed)
    labeled = torch.randn(n, 3, size, size, generator=g)
    unlabeled = torch.randn(n, 3, size, size, generator=g)
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.6).float()
    return SemiSupervisedBatch(labeled=labeled, mask=mask, unlabeled=unlabeled)


class _SemiSet(Dataset):
    def __init__(self, length: int, size: int) -> None:
        self.length, self.size = length, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        img = torch.rand(3, self.size, self.size, generator=g)
        mask = torch.zeros(1, self.size, self.size)
        c = self.size // 4
        mask[:, c : 3 * c, c : 3 * c] = 1.0
        img = img * 0.5 + mask * 0.5  # the square is brighter: something to learn
        return img, mask, torch.rand(3, self.size, self.size, generator=g)


def _collate_semi(items: list[tuple[torch.Tensor, ...]]) -> SemiSupervisedBatch:
    labeled, mask, unlabeled = (torch.stack(x) for x in zip(*items, strict=True))
    return SemiSupervisedBatch(labeled=labeled, mask=mask, unlabeled=unlabeled)


def _collate_eval(items: list[tuple[torch.Tensor, ...]]) -> EvaluationBatch:
    image, mask, _ = (torch.stack(x) for x in zip(*items, strict=True))
    return EvaluationBatch(
        image=image, mask=mask, original_masks=None, names=[str(i) for i in range(len(items))]
    )


class RandomSemiDataModule(L.LightningDataModule):
    """A minimal in-test datamodule yielding SemiSupervisedBatch / EvaluationBatch."""

    def __init__(self, size: int = 32, batch_size: int = 2, length: int = 8) -> None:
        super().__init__()
        self.size, self.batch_size, self.length = size, batch_size, length

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            _SemiSet(self.length, self.size), batch_size=self.batch_size, collate_fn=_collate_semi
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_SemiSet(4, self.size), batch_size=self.batch_size, collate_fn=_collate_eval)

    test_dataloader = val_dataloader
