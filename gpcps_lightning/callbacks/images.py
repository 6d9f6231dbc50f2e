"""Drawing and image logging: mask overlays, prediction panels, and the callbacks that log them.

- :class:`ValidationImagePanel` logs, every few epochs, fixed validation images with their ground truth and
  prediction overlays (W&B, TensorBoard, or PNG files for other loggers), in titled columns, small
  images enlarged (:func:`prediction_panel`).
- :class:`PredictionsPicture` writes a picture of a few validation predictions at the end of ``fit``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from gpcps_lightning._utils import atomic_path
from gpcps_lightning.batch import EvaluationBatch

__all__ = [
    "GROUND_TRUTH_COLOR",
    "PANEL_COLUMN_TITLES",
    "PREDICTION_COLOR",
    "PredictionsPicture",
    "ValidationImagePanel",
    "display_images",
    "overlay_mask",
    "panel_scale",
    "prediction_panel",
]

#: Overlay colours (RGB) of the ground truth and of the prediction.
GROUND_TRUTH_COLOR = (0, 200, 0)
PREDICTION_COLOR = (230, 30, 30)
#: Titles of the three columns of the prediction panels and pictures, left to right.
PANEL_COLUMN_TITLES = ("image", "ground truth", "prediction")


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


def panel_scale(height: int, width: int, min_tile_size: int) -> int:
    """The integer factor that enlarges a ``height`` x ``width`` tile to at least ``min_tile_size`` pixels.

    Args:
        height: Tile height in pixels.
        width: Tile width in pixels.
        min_tile_size: The smallest side the enlarged tile should have; 1 keeps the size.

    Returns:
        ``ceil(min_tile_size / min(height, width))``, at least 1.
    """
    return max(1, math.ceil(min_tile_size / max(1, min(height, width))))


@functools.lru_cache(maxsize=8)
def _title_font(size: int) -> Any:
    # DejaVu Sans ships with matplotlib (a dependency); Pillow's own font is the fallback.
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except Exception:
        return ImageFont.load_default()


def _title_height(tile_width: int) -> tuple[int, int]:
    """Font size and header height of the column titles above tiles ``tile_width`` pixels wide."""
    size = max(10, min(20, tile_width // 10))
    return size, size + 12


def _draw_titles(header: np.ndarray, titles: Sequence[str], tile_width: int, gap: int, size: int) -> None:
    picture = Image.fromarray(header)
    draw = ImageDraw.Draw(picture)
    for j, title in enumerate(titles):
        # A title wider than its tile gets a smaller font (down to 8 px) rather than overlapping the next.
        for smaller in range(size, 7, -1):
            font = _title_font(smaller)
            left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
            if right - left <= tile_width - 4:
                break
        x = j * (tile_width + gap) + (tile_width - (right - left)) / 2 - left
        y = (header.shape[0] - (bottom - top)) / 2 - top
        draw.text((x, y), title, fill=(0, 0, 0), font=font)
    header[...] = np.asarray(picture)


def prediction_panel(
    images: np.ndarray,
    masks: np.ndarray,
    predictions: np.ndarray,
    gap: int = 2,
    *,
    scale: int = 1,
    titles: Sequence[str] | None = None,
) -> np.ndarray:
    """A grid with one row per image: the image, its ground truth overlay and its prediction overlay.

    The overlays are drawn at the images' size, then each tile is enlarged ``scale`` times by repeating
    its pixels (nearest neighbour), so that a mask's edge stays as sharp as the network sees it.

    Args:
        images: uint8 RGB images, shape (N, H, W, 3).
        masks: Ground-truth masks, shape (N, H, W), boolean or {0, 1}.
        predictions: Binary predictions, shape (N, H, W).
        gap: Width in pixels of the white lines between tiles.
        scale: Integer enlargement of every tile (see :func:`panel_scale`).
        titles: Three column titles (e.g. :data:`PANEL_COLUMN_TITLES`) written in black on a white header
            above the columns, or ``None`` for no header.

    Returns:
        uint8 array of shape (T + N*h + (N-1)*gap, 3*w + 2*gap, 3) with ``h, w = scale*H, scale*W`` and
        ``T`` the header's height (0 without titles).

    Raises:
        ValueError: On inconsistent shapes, an empty batch, a ``scale`` below 1 or not three titles.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`images` must have shape (N, H, W, 3) with N >= 1, got {images.shape}.")
    n, h, w, _ = images.shape
    if masks.shape != (n, h, w) or predictions.shape != (n, h, w):
        raise ValueError(
            f"`masks` and `predictions` must have shape {(n, h, w)}, "
            f"got {masks.shape} and {predictions.shape}."
        )
    if int(scale) != scale or scale < 1:
        raise ValueError(f"`scale` must be a positive integer, got {scale}.")
    if titles is not None and len(titles) != 3:
        raise ValueError(f"`titles` must be three column titles, got {list(titles)}.")
    th, tw = h * scale, w * scale
    font_size, header = _title_height(tw) if titles is not None else (0, 0)
    panel = np.full((header + n * th + (n - 1) * gap, 3 * tw + 2 * gap, 3), 255, dtype=np.uint8)
    if titles is not None:
        _draw_titles(panel[:header], titles, tw, gap, font_size)
    for i in range(n):
        top = header + i * (th + gap)
        tiles = (
            images[i],
            overlay_mask(images[i], masks[i], GROUND_TRUTH_COLOR),
            overlay_mask(images[i], predictions[i], PREDICTION_COLOR),
        )
        for j, tile in enumerate(tiles):
            left = j * (tw + gap)
            panel[top : top + th, left : left + tw] = tile.repeat(scale, axis=0).repeat(scale, axis=1)
    return panel


def _dice_score(prediction: np.ndarray, mask: np.ndarray) -> float:
    p, t = prediction.astype(bool), mask.astype(bool)
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * (p & t).sum() / denominator)


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> None:
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

    The panel has one row per image and three titled columns: the image, the ground truth (green) and
    the prediction (red) of the module's predicting head; images smaller than ``min_tile_size`` pixels
    are enlarged by an integer factor (nearest neighbour), so 64 px images show as 192 px tiles. The
    images are the first ones the validation loader yields, the same every epoch when the loader does
    not shuffle (Lightning's default for validation). It goes to each logger: W&B (``wandb.Image`` under
    ``key``), TensorBoard (``add_image``); for any other logger, or none, it is written as a PNG file to
    ``output_dir`` (default ``<trainer.log_dir or default_root_dir>/panels``).

    Args:
        every_n_epochs: Log at the validation of epoch 0 and every this many epochs after; 0 switches
            the panel off.
        num_images: Number of validation images (the first ones of the validation set).
        key: Name of the logged image.
        output_dir: Folder of the PNG files for loggers without image support.
        min_tile_size: Smallest side, in pixels, of each tile of the panel: smaller images are enlarged
            by the integer factor that reaches it (1 keeps the images' size).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_images: int = 4,
        key: str = "val/predictions",
        output_dir: str | None = None,
        min_tile_size: int = 192,
    ) -> None:
        super().__init__(num_images)
        if every_n_epochs < 0:
            raise ValueError(
                f"`every_n_epochs` must be >= 0 (0 switches the panel off), got {every_n_epochs}."
            )
        if min_tile_size < 1:
            raise ValueError(f"`min_tile_size` must be at least 1 (1 keeps the size), got {min_tile_size}.")
        self.every_n_epochs = every_n_epochs
        self.key = key
        self.output_dir = output_dir
        self.min_tile_size = min_tile_size

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
        scale = panel_scale(images.shape[1], images.shape[2], self.min_tile_size)
        panel = prediction_panel(images, masks, predictions, scale=scale, titles=PANEL_COLUMN_TITLES)
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
                save_png(panel, os.path.join(folder, name))
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
            image_title, truth_title, prediction_title = PANEL_COLUMN_TITLES
            tiles = (
                (images[i], image_title),
                (overlay_mask(images[i], masks[i], GROUND_TRUTH_COLOR), truth_title),
                (
                    overlay_mask(images[i], predictions[i], PREDICTION_COLOR),
                    f"{prediction_title} (Dice {100 * _dice_score(predictions[i], masks[i]):.1f}%)",
                ),
            )
            for ax, (tile, title) in zip(axes[i], tiles, strict=True):
                ax.imshow(tile, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
