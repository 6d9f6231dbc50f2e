"""Prediction writing: one binary PNG mask per image at its original size, with optional overlays."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor

from gpcps_lightning._utils import resize_to_original_sizes
from gpcps_lightning.batch import PredictionBatch
from gpcps_lightning.callbacks.images import PREDICTION_COLOR, display_images, overlay_mask, save_png
from gpcps_lightning.data.io import read_image

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write one binary PNG mask per predicted image, at the image's original size.

    Probabilities are resized (bilinear) to the original size and thresholded at ``module.threshold``
    (``>=``), as in evaluation. Masks are 8-bit PNGs with values 0 and 255, written to
    ``<output_dir>/masks/<image name>.png``; with ``overlay=True`` the image with the predicted mask drawn
    over it goes to ``<output_dir>/overlays/<image name>.png`` (drawn on the original file when it can
    be read from ``datamodule.predict_dir``, else on the resized input).

    Batches must be :class:`~gpcps_lightning.batch.PredictionBatch` (they carry sizes and names).

    Args:
        output_dir: Output folder (default ``<trainer.default_root_dir>/predictions``).
        overlay: Also write overlay pictures.
        threshold: Probability threshold; default ``module.threshold``.
    """

    def __init__(
        self, output_dir: str | None = None, overlay: bool = False, threshold: float | None = None
    ) -> None:
        super().__init__(write_interval="batch")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold}.")
        self.output_dir = output_dir
        self.overlay = overlay
        self.threshold = threshold
        self._written: dict[str, str] = {}
        self.written_masks: list[str] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or os.path.join(trainer.default_root_dir, "predictions"))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._written, self.written_masks = {}, []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if self.written_masks:
            rank_zero_info(f"Wrote {len(self.written_masks)} masks to {self._folder(trainer) / 'masks'}")

    def _relative_png(self, name: str) -> Path:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.name:
            raise ValueError(f"Image name {name!r} must be a relative path inside the prediction folder.")
        png = relative.with_suffix(".png")
        key = png.as_posix()
        if key in self._written:
            raise ValueError(
                f"Images {self._written[key]!r} and {name!r} would both be written as {key!r}: "
                "rename one of them (prediction masks are named after the image file stem)."
            )
        self._written[key] = name
        return png

    def write_on_batch_end(  # noqa: D102
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(batch, PredictionBatch):
            raise TypeError(
                "PredictionWriter needs gpcps_lightning.PredictionBatch batches (with original_sizes and "
                "names) "
                f"from the datamodule's predict_dataloader, got {type(batch).__name__}."
            )
        if not isinstance(prediction, Tensor) or prediction.ndim != 4 or prediction.shape[1] != 1:
            raise ValueError("predict_step must return probabilities of shape (N, 1, H, W).")
        n = int(prediction.shape[0])
        if len(batch.original_sizes) != n or len(batch.names) != n:
            raise ValueError(
                f"PredictionBatch has {len(batch.original_sizes)} sizes and {len(batch.names)} names for "
                f"{n} images: the datamodule must give one of each per image."
            )
        threshold = (
            self.threshold if self.threshold is not None else float(getattr(pl_module, "threshold", 0.5))
        )
        folder = self._folder(trainer)
        predict_dir = getattr(getattr(trainer, "datamodule", None), "predict_dir", None)
        shown = display_images(batch.image, getattr(trainer, "datamodule", None)) if self.overlay else None
        probabilities = resize_to_original_sizes(prediction.float(), batch.original_sizes)
        for i in range(n):
            h, w = (int(v) for v in batch.original_sizes[i])
            mask = (probabilities[i][0] >= threshold).cpu().numpy()
            relative = self._relative_png(batch.names[i])
            target = folder / "masks" / relative
            save_png(mask.astype(np.uint8) * 255, target)
            self.written_masks.append(str(target))
            if self.overlay and shown is not None:
                original = None
                if predict_dir:
                    with contextlib.suppress(FileNotFoundError, ValueError):
                        original = read_image(Path(predict_dir) / batch.names[i])
                if original is None or original.shape[:2] != (h, w):
                    resized = Image.fromarray(shown[i]).resize((w, h), Image.Resampling.BILINEAR)
                    original = np.asarray(resized, dtype=np.uint8)
                save_png(overlay_mask(original, mask, PREDICTION_COLOR), folder / "overlays" / relative)
