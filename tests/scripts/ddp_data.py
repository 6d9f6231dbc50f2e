"""Worker for tests/test_distributed.py: two CPU ranks (gloo) train GP-CPS on the generated dataset.

Usage: python ddp_data.py DATA_ROOT OUT_DIR

Each rank writes ``sampler_rank{r}.pt``: its training sampler's layout and the (labeled, unlabeled)
pairs it drew in epoch 0, the number of training batches per epoch, and the validation indices it saw;
and ``eps_rank{r}.pt``: the fusion weights of its first training batch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from ddp_gradients import TINY_NET

from gpcps_lightning import GPCPSModule, SyntheticPolypDataModule


class Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train = trainer.train_dataloader
        val = trainer.val_dataloaders
        torch.save(
            {
                "sampler_class": type(train.sampler).__name__,
                "num_replicas": train.sampler.num_replicas,
                "rank": train.sampler.rank,
                "pairs_epoch0": train.sampler.pairs(0).tolist(),
                "num_train_batches": trainer.num_training_batches,
                "val_sampler_class": type(val.sampler).__name__,
                "val_indices": list(iter(val.sampler)),
                "num_val_images": len(val.dataset),
            },
            self.out / f"sampler_rank{trainer.global_rank}.pt",
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            torch.save(batch.eps, self.out / f"eps_rank{trainer.global_rank}.pt")


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    L.seed_everything(0, verbose=False)
    data = SyntheticPolypDataModule(
        root=str(root), num_images=30, image_size=32, batch_size=2, labeled_fraction=0.25, num_workers=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Recorder(out)],
    )
    trainer.fit(GPCPSModule(**TINY_NET), data)


if __name__ == "__main__":
    main()
