"""Drawing and image logging: mask overlays, prediction panels, and the callbacks that log them.

- :class:`ValidationImagePanel` logs, every few epochs, fixed validation images with their ground truth and
  prediction overlays (W&B, TensorBoard, or PNG files for other loggers).
- :class:`PredictionsPicture` writes a picture of a few validation predictions at the end of ``fit``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor

from gpcps_lightning._utils import atomic_path
from gpcps_lightning.batch import EvaluationBatch

__all__ = [
    "GROUND_TRUTH_COLOR",
    "PREDICTION_COLOR",
    "PredictionsPicture",
    "ValidationImagePanel",
    "display_images",
    "overlay_mask",
    "prediction_panel",
]

#: Overlay colours (RGB) of the ground truth and of the prediction.
GROUND_TRUTH_COLOR = (0, 200, 0)
PREDICTION_COLOR = (230, 30, 30)


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, color: Sequence[int] = PREDICTION_COLOR, alpha: float = 0.45
) -> np.ndarray:
    """Blend a colour over the masked pixels of an image and draw the mask's outline in full colour.

    Args:
        image: RGB image, uint8, shape (H, W, 3).
        mask: Boolean (or {0, 1}) mask, shape (H, W).
        color: RGB colour of the overlay.
        alpha: Opacity of the fill in [0, 1].

    Returns:
        A new uint8 image of shape (H, W, 3).

    Raises:
        ValueError: On mismatched shapes or ``alpha`` outside [0, 1].
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`image` must have shape (H, W, 3), got {image.shape}.")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"`mask` must have shape {image.shape[:2]}, got {mask.shape}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    m = mask.astype(bool)
    out = image.astype(np.float32)
    col = np.asarray(color, dtype=np.float32)
    out[m] = (1.0 - alpha) * out[m] + alpha * col
    # Outline: mask pixels with a 4-neighbour outside the mask.
    padded = np.pad(m, 1, mode="constant", constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[m & ~inner] = col
    return out.round().clip(0, 255).astype(np.uint8)


def display_images(images: Tensor, datamodule: Any = None) -> np.ndarray:
    """Turn network-input images into displayable uint8 RGB arrays.

    Uses ``datamodule.denormalize`` when the datamodule has it; otherwise each image is min-max scaled.

    Args:
        images: Images as the network sees them, shape (N, C, H, W); 1-channel images are shown in gray.
        datamodule: The datamodule that normalised them, or ``None``.

    Returns:
        Array of shape (N, H, W, 3), dtype uint8.
    """
    x = images.detach().float().cpu()
    denormalize = getattr(datamodule, "denormalize", None)
    if callable(denormalize):
        x = denormalize(x).float().cpu()
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3].clamp(0.0, 1.0)
    return (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


def prediction_panel(
    images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, gap: int = 2
) -> np.ndarray:
    """A grid with one row per image: the image, its ground truth overlay and its prediction overlay.

    Args:
        images: uint8 RGB images, shape (N, H, W, 3).
        masks: Ground-truth masks, shape (N, H, W), boolean or {0, 1}.
        predictions: Binary predictions, shape (N, H, W).
        gap: Width in pixels of the white lines between tiles.

    Returns:
        uint8 array of shape (N*H + (N-1)*gap, 3*W + 2*gap, 3).

    Raises:
        ValueError: On inconsistent shapes or an empty batch.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`images` must have shape (N, H, W, 3) with N >= 1, got {images.shape}.")
    n, h, w, _ = images.shape
    if masks.shape != (n, h, w) or predictions.shape != (n, h, w):
        raise ValueError(
            f"`masks` and `predictions` must have shape {(n, h, w)}, "
            f"got {masks.shape} and {predictions.shape}."
        )
    panel = np.full((n * h + (n - 1) * gap, 3 * w + 2 * gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        top = i * (h + gap)
        tiles = (
            images[i],
            overlay_mask(images[i], masks[i], GROUND_TRUTH_COLOR),
            overlay_mask(images[i], predictions[i], PREDICTION_COLOR),
        )
        for j, tile in enumerate(tiles):
            left = j * (w + gap)
            panel[top : top + h, left : left + w] = tile
    return panel


def _dice_score(prediction: np.ndarray, mask: np.ndarray) -> float:
    p, t = prediction.astype(bool), mask.astype(bool)
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * (p & t).sum() / denominator)


def _save_png(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "panel"


class _FixedValidationImages(L.Callback):
    """Keeps the first ``num_images`` validation images and masks (the same ones every epoch)."""

    def __init__(self, num_images: int) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"`num_images` must be at least 1, got {num_images}.")
        self.num_images = num_images
        self._images: list[Tensor] = []
        self._masks: list[Tensor] = []

    @property
    def _count(self) -> int:
        return sum(int(x.shape[0]) for x in self._images)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or not isinstance(batch, EvaluationBatch) or self._count >= self.num_images:
            return
        take = self.num_images - self._count
        self._images.append(batch.image[:take].detach().cpu())
        self._masks.append(batch.mask[:take].detach().cpu())

    @torch.no_grad()
    def _render(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = torch.cat(self._images)
        masks = torch.cat(self._masks)[:, 0] >= 0.5
        was_training = pl_module.training
        pl_module.eval()
        try:
            probs = pl_module(images.to(pl_module.device)).float().cpu()
        finally:
            pl_module.train(was_training)
        threshold = float(getattr(pl_module, "threshold", 0.5))
        predictions = probs[:, 0] >= threshold
        shown = display_images(images, getattr(trainer, "datamodule", None))
        return shown, masks.numpy(), predictions.numpy()


class ValidationImagePanel(_FixedValidationImages):
    """Every few epochs, log fixed validation images with ground-truth and prediction overlays.

    The panel has one row per image: the image, the ground truth (green) and the prediction (red) of
    the module's predicting head. The images are the first ones the validation loader yields, the same
    every epoch when the loader does not shuffle (Lightning's default for validation). It goes to each
    logger: W&B (``wandb.Image`` under ``key``), TensorBoard (``add_image``); for any other logger, or
    none, it is written as a PNG file to ``output_dir`` (default
    ``<trainer.log_dir or default_root_dir>/panels``).

    Args:
        every_n_epochs: Log at the validation of epoch 0 and every this many epochs after; 0 switches
            the panel off.
        num_images: Number of validation images (the first ones of the validation set).
        key: Name of the logged image.
        output_dir: Folder of the PNG files for loggers without image support.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_images: int = 4,
        key: str = "val/predictions",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(num_images)
        if every_n_epochs < 0:
            raise ValueError(
                f"`every_n_epochs` must be >= 0 (0 switches the panel off), got {every_n_epochs}."
            )
        self.every_n_epochs = every_n_epochs
        self.key = key
        self.output_dir = output_dir

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        if self.every_n_epochs > 0:
            super().on_validation_batch_end(*args, **kwargs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if (
            self.every_n_epochs == 0
            or trainer.sanity_checking
            or trainer.current_epoch % self.every_n_epochs != 0
            or not self._images
        ):
            return
        images, masks, predictions = self._render(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        panel = prediction_panel(images, masks, predictions)
        caption = (
            f"epoch {trainer.current_epoch}, step {trainer.global_step}: image | ground truth | prediction"
        )
        wrote_png = False
        loggers: list[Logger | None] = list(trainer.loggers) or [None]
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(self.key, [panel], step=trainer.global_step, caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.key, panel, trainer.global_step, dataformats="HWC")
            elif not wrote_png:
                folder = self.output_dir or os.path.join(
                    trainer.log_dir or trainer.default_root_dir, "panels"
                )
                epoch, step = trainer.current_epoch, trainer.global_step
                name = f"{_safe_name(self.key)}_epoch{epoch:04d}_step{step:07d}.png"
                _save_png(panel, os.path.join(folder, name))
                wrote_png = True


class PredictionsPicture(_FixedValidationImages):
    """At the end of ``fit``, write a picture of a few validation images: image, ground truth, prediction.

    The images are the first ones of the last validation run and the prediction is that of the weights at
    the end of training (the predicting head, thresholded at ``module.threshold``), titled with its Dice.

    Args:
        path: The PNG file to write (folders are created).
        num_images: Number of validation images (rows).
        tile_inches: Size of one tile in the figure, in inches.
        dpi: Resolution of the picture.
    """

    def __init__(
        self, path: str = "predictions.png", num_images: int = 4, tile_inches: float = 2.2, dpi: int = 100
    ) -> None:
        super().__init__(num_images)
        self.path = path
        self.tile_inches = tile_inches
        self.dpi = dpi

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._images, self._masks = [], []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not trainer.is_global_zero:
            return
        if not self._images:
            rank_zero_warn(
                f"PredictionsPicture: no validation batch was seen during fit, so {self.path!r} was not "
                "written "
                "(validation is needed: check limit_val_batches / check_val_every_n_epoch)."
            )
            return
        images, masks, predictions = self._render(trainer, pl_module)
        self.write(images, masks, predictions, self.path)
        rank_zero_info(f"Predictions picture written to {self.path}")

    def write(self, images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, path: str) -> None:
        """Draw the picture with matplotlib and write it atomically.

        Args:
            images: uint8 RGB images, shape (N, H, W, 3).
            masks: Ground truth, shape (N, H, W).
            predictions: Binary predictions, shape (N, H, W).
            path: The PNG file.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = images.shape[0]
        fig = Figure(figsize=(3 * self.tile_inches, n * self.tile_inches + 0.3), dpi=self.dpi)
        FigureCanvasAgg(fig)
        axes = fig.subplots(n, 3, squeeze=False)
        for i in range(n):
            tiles = (
                (images[i], "image"),
                (overlay_mask(images[i], masks[i], GROUND_TRUTH_COLOR), "ground truth"),
                (
                    overlay_mask(images[i], predictions[i], PREDICTION_COLOR),
                    f"prediction (Dice {100 * _dice_score(predictions[i], masks[i]):.1f}%)",
                ),
            )
            for ax, (tile, title) in zip(axes[i], tiles, strict=True):
                ax.imshow(tile, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
