"""Train GP-CPS inside your own Lightning project: a plain ``Trainer``, no command line, no config file.

This is the path for code that already has its own training script. ``GPCPSModule`` is an ordinary
``LightningModule`` and the datamodules are ordinary ``LightningDataModule``\\ s, so they plug into any
``Trainer``; the library's callbacks are optional extras.

    python examples/train_own_project.py --max-epochs 5 --out runs/own_project

Swap ``SyntheticPolypDataModule`` for ``KvasirSEGDataModule(root=...)`` or ``FolderDataModule(...)`` to
train on real data, or pass your own datamodule that yields ``gpcps_lightning.SemiSupervisedBatch``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from gpcps_lightning import GPCPSModule
from gpcps_lightning.callbacks import BestCheckpoint, LossProgressBar, PredictionsPicture
from gpcps_lightning.data import SyntheticPolypDataModule


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="runs/own_project", help="Folder for logs, checkpoints and the picture."
    )
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--labeled-fraction", type=float, default=0.125, help="1/8, as in the paper's ablation."
    )
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--num-images", type=int, default=400, help="Generated images (made on first use).")
    parser.add_argument(
        "--data-root", default="data/synthetic-polyps", help="Where the images are generated."
    )
    args = parser.parse_args(argv)
    out = Path(args.out)

    L.seed_everything(0, workers=True)
    datamodule = SyntheticPolypDataModule(
        root=args.data_root,
        num_images=args.num_images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        labeled_fraction=args.labeled_fraction,
        steps_per_epoch=args.steps_per_epoch,
        seed=0,
    )
    # The paper's loss weights; the module builds and trains both networks and evaluates
    # net1, net2 and their ensemble (logged as val/dice_net1, val/dice_net2, val/dice_ensemble).
    model = GPCPSModule(encoder_name=args.encoder, lambda_grad=1e-3, lambda_semi=1.0, lr=1e-4)

    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        default_root_dir=out,
        logger=CSVLogger(out, name="logs"),
        callbacks=[
            BestCheckpoint(),  # best.ckpt by val/dice_ensemble + last.ckpt, in <out>/checkpoints
            LossProgressBar(),  # loss_sup / loss_semi / loss_grad / val_dice on the bar
            PredictionsPicture(path=str(out / "predictions.png")),
        ],
    )
    trainer.fit(model, datamodule=datamodule)
    (results,) = trainer.test(model, datamodule=datamodule, ckpt_path="best")
    dice = 100 * results["test/dice_ensemble"]
    print(f"test Dice (ensemble): {dice:.2f}%  predictions picture: {out / 'predictions.png'}")
    return results


if __name__ == "__main__":
    main()
