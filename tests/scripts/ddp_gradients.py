"""Worker for tests/test_distributed.py: two CPU ranks (gloo) train GP-CPS for a few steps under DDP.

Usage: python ddp_gradients.py [--sync-batchnorm] OUT_DIR

With ``--sync-batchnorm`` the batch statistics are synchronised by ``GradientSyncBatchNorm``.

Writes, into OUT_DIR: ``init.pt`` (the weights before training), ``batch_rank{r}.pt`` (each rank's first
batch), ``grads_rank{r}.pt`` (each rank's gradients of the first step after DDP's all-reduce) and
``final_rank{r}.pt`` (each rank's weights after training).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from gpcps_lightning import GPCPSModule, SemiSupervisedBatch
from gpcps_lightning.distributed import GradientSyncBatchNorm
from gpcps_lightning.losses import fuse_images

TINY_NET: dict[str, Any] = {
    "arch": "Unet",
    "encoder_name": "tu-resnet18",
    "network_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
}
SIZE = 32


class FixedSemiSet(Dataset):
    """Items fully determined by their index, eps included, so one process can recompute any rank's loss."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(100 + i)
        labeled = torch.randn(3, SIZE, SIZE, generator=g)
        mask = (torch.rand(1, SIZE, SIZE, generator=g) > 0.6).float()
        unlabeled = torch.randn(3, SIZE, SIZE, generator=g)
        eps = torch.rand(1, 1, 1, generator=g)
        return labeled, mask, unlabeled, eps


def collate(items: list[tuple[torch.Tensor, ...]]) -> SemiSupervisedBatch:
    labeled, mask, unlabeled, eps = (torch.stack(x) for x in zip(*items, strict=True))
    return SemiSupervisedBatch(
        labeled=labeled, mask=mask, unlabeled=unlabeled, eps=eps, fused=fuse_images(labeled, unlabeled, eps)
    )


class Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        if trainer.global_step == 0:
            torch.save(batch, self.out / f"batch_rank{trainer.global_rank}.pt")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_step == 0:
            grads = {
                n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }
            torch.save(grads, self.out / f"grads_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self.out / f"final_rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[-1])
    sync_bn = "--sync-batchnorm" in sys.argv
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(module.state_dict(), out / "init.pt")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[GradientSyncBatchNorm()] if sync_bn else None,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Recorder(out)],
    )
    trainer.fit(module, DataLoader(FixedSemiSet(), batch_size=2, shuffle=False, collate_fn=collate))


if __name__ == "__main__":
    main()
