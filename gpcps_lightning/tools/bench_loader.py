"""Loader throughput benchmark: training images per second on Kvasir-SEG, with and without the cache.

Run ``python -m gpcps_lightning.tools.bench_loader --root /path/to/kvasir-seg``. Each setting builds a
fresh :class:`~gpcps_lightning.data.KvasirSEGDataModule` and iterates its training loader for
``--epochs`` epochs (default 2: the first fills the cache, the second reads from it); a step delivers
``batch_size`` labeled images with masks and ``batch_size`` unlabeled images, counted as
``2 * batch_size`` images. Only loading is timed (decoding, resizing, collation, worker transfer);
``--device`` adds the device-side conversion, augmentation and normalisation of each batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence

import torch

from gpcps_lightning.data.kvasir import KvasirSEGDataModule

__all__ = ["benchmark", "main"]


def benchmark(
    root: str,
    cache: bool,
    epochs: int = 2,
    image_size: int = 256,
    batch_size: int = 16,
    num_workers: int = 2,
    steps_per_epoch: int | None = None,
    device: str | None = None,
) -> list[float]:
    """Training images per second of each epoch.

    Args:
        root: Kvasir-SEG root.
        cache: Use the in-memory cache.
        epochs: Epochs to time.
        image_size: Training size.
        batch_size: Labeled (and unlabeled) images per step.
        num_workers: DataLoader workers.
        steps_per_epoch: Steps per epoch (default: the datamodule's, 50 at batch 16).
        device: Also run ``on_after_batch_transfer`` (augmentation) on this device.

    Returns:
        Images per second, one value per epoch.
    """
    dm = KvasirSEGDataModule(
        root=root,
        verify=False,
        cache=cache,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        steps_per_epoch=steps_per_epoch,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        images = 0
        start = time.perf_counter()
        for compact in loader:
            if device is not None:
                batch = dm.on_after_batch_transfer(
                    compact.__class__(*(t.to(device, non_blocking=True) for t in vars(compact).values())), 0
                )
                if batch.labeled.is_cuda:
                    torch.cuda.synchronize()
            images += compact.labeled.shape[0] + compact.unlabeled.shape[0]
        rates.append(images / (time.perf_counter() - start))
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints one Markdown table row per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("KVASIR_SEG_ROOT"), help="Kvasir-SEG root")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--device", default=None, help="e.g. cuda: include on-device augmentation")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("give --root (or set KVASIR_SEG_ROOT)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    header = " | ".join(f"epoch {e + 1} (img/s)" for e in range(args.epochs))
    print(f"| cache | workers | image size | batch | {header} |")
    print("|---|---|---|---|" + "---|" * args.epochs)
    for workers in args.num_workers:
        for cache in (False, True):
            rates = benchmark(
                args.root,
                cache,
                args.epochs,
                args.image_size,
                args.batch_size,
                workers,
                args.steps_per_epoch,
                args.device,
            )
            cells = " | ".join(f"{r:.0f}" for r in rates)
            setting = f"{'yes' if cache else 'no'} | {workers} | {args.image_size} | {args.batch_size}"
            print(f"| {setting} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
