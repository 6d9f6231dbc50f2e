"""Segment every image of a folder with a trained checkpoint: one binary PNG mask per image.

Masks (0 / 255, at each image's original size) go to ``<out>/masks/<image stem>.png``; with ``--overlay``
the images with the predicted mask drawn in red go to ``<out>/overlays/``. The preprocessing (training
size, normalisation) is read from the checkpoint when it holds the datamodule's hyperparameters (the
``gpcps`` command and the library's datamodules store them); otherwise pass ``--image-size``, ``--mean``
and ``--std``.

    python examples/predict_folder.py runs/quickstart/checkpoints/best.ckpt my_images/ --out preds --overlay

The same from the command line:
``gpcps predict --config CONFIG.yaml --ckpt_path best --data.predict_dir my_images/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from gpcps_lightning.callbacks import PREDICTION_COLOR, overlay_mask
from gpcps_lightning.data.io import read_image
from gpcps_lightning.inference.predict import Segmenter, list_images


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="A .ckpt file, e.g. runs/quickstart/checkpoints/best.ckpt")
    parser.add_argument("images", help="Folder of images (png, jpg, jpeg, bmp, tif, tiff), any sizes.")
    parser.add_argument("--out", default="predictions", help="Output folder.")
    parser.add_argument("--overlay", action="store_true", help="Also write overlay pictures.")
    parser.add_argument("--threshold", type=float, default=None, help="Default: the model's threshold (0.5).")
    parser.add_argument("--image-size", type=int, default=None, help="If the checkpoint does not record it.")
    parser.add_argument(
        "--mean", type=float, nargs=3, default=None, help="If the checkpoint does not record it."
    )
    parser.add_argument(
        "--std", type=float, nargs=3, default=None, help="If the checkpoint does not record it."
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
    args = parser.parse_args(argv)

    segmenter = Segmenter.from_checkpoint(
        args.checkpoint,
        image_size=args.image_size,
        mean=args.mean,
        std=args.std,
        threshold=args.threshold,
        device=args.device,
        batch_size=args.batch_size,
    )
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if args.overlay:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    files = list_images(args.images)
    written = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = [read_image(path) for path in chunk]
        for path, image, mask in zip(chunk, images, segmenter(images), strict=True):
            target = out / "masks" / f"{path.stem}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(target)
            written.append(target)
            if args.overlay:
                Image.fromarray(overlay_mask(image, mask, PREDICTION_COLOR)).save(
                    out / "overlays" / f"{path.stem}.png"
                )
    print(f"Wrote {len(written)} masks to {out / 'masks'}")
    return written


if __name__ == "__main__":
    main()
