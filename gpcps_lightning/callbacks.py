"""Callbacks: checkpoint selection, image logging, prediction writing and a readable progress bar.

- :class:`BestCheckpoint` keeps the best checkpoint by the validation Dice of the module's selection head
  (the ensemble for GP-CPS) plus ``last.ckpt``, in a fixed folder so that ``--ckpt_path last`` resumes.
- :class:`ValidationImagePanel` logs, every few epochs, fixed validation images with their ground truth and
  prediction overlays (W&B, TensorBoard, or PNG files for other loggers).
- :class:`PredictionsPicture` writes a picture of a few validation predictions at the end of ``fit``.
- :class:`PredictionWriter` writes one binary PNG mask per image at its original size (and overlays).
- :class:`LossProgressBar` shows the loss terms and the validation Dice with short names.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor

from gpcps_lightning._io import atomic_path
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch
from gpcps_lightning.data.io import read_image

__all__ = [
    "GROUND_TRUTH_COLOR",
    "PREDICTION_COLOR",
    "BestCheckpoint",
    "LossProgressBar",
    "PredictionWriter",
    "PredictionsPicture",
    "ValidationImagePanel",
    "display_images",
    "overlay_mask",
    "prediction_panel",
    "selection_head",
]

#: Overlay colours (RGB) of the ground truth and of the prediction.
GROUND_TRUTH_COLOR = (0, 200, 0)
PREDICTION_COLOR = (230, 30, 30)


def selection_head(pl_module: L.LightningModule) -> str:
    """The head whose validation Dice selects checkpoints.

    ``pl_module.selection_head`` if the module defines it; otherwise ``"ensemble"`` when the module has
    that head, else its first head (``head_names[0]``), else ``"ensemble"``.
    """
    head = getattr(pl_module, "selection_head", None)
    if head:
        return str(head)
    names = tuple(getattr(pl_module, "head_names", ()) or ())
    if not names or "ensemble" in names:
        return "ensemble"
    return str(names[0])


# --------------------------------------------------------------------------- drawing
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


def _dice(prediction: np.ndarray, mask: np.ndarray) -> float:
    p, t = prediction.astype(bool), mask.astype(bool)
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * (p & t).sum() / denominator)


def _save_png(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "panel"


# --------------------------------------------------------------------------- checkpoints
class BestCheckpoint(ModelCheckpoint):
    """Keep the best checkpoint by validation Dice of the selection head, plus ``last.ckpt``.

    The monitored key is ``val/dice_<head>`` with ``<head>`` from :func:`selection_head` (``ensemble`` for
    GP-CPS), maximised, unless ``monitor`` is given. Checkpoints go to a fixed folder,
    ``<trainer.default_root_dir>/checkpoints`` unless ``dirpath`` is given, so that a later
    ``fit --ckpt_path last`` (and ``test --ckpt_path best`` in a new process, through the ``gpcps``
    command) finds them. ``last.ckpt`` is rewritten at every validation (or epoch end without validation),
    whether or not the score improved.

    Args:
        dirpath: Folder of the checkpoints (default ``<trainer.default_root_dir>/checkpoints``).
        filename: Name of the best checkpoint without ``.ckpt``; may hold ``{epoch}``/``{step}`` fields.
            The default ``"best"`` keeps one stable path, ``best.ckpt`` (``best-v1.ckpt`` if a previous run
            left one in the same folder).
        monitor: Logged key to maximise/minimise (default ``val/dice_<selection head>``).
        mode: ``"max"`` for Dice-like scores, ``"min"`` for losses.
        save_last: Also keep ``last.ckpt`` (needed for ``--ckpt_path last``).
        save_top_k: Number of best checkpoints to keep (with ``-1`` all of them; use a filename with
            ``{epoch}`` for more than one).
        every_n_epochs: Consider saving every this many epochs (default: every validation).
        every_n_train_steps: Consider saving every this many training steps instead of at validation.
        save_weights_only: Save only the weights (no optimizer state; such checkpoints cannot resume).
        verbose: Log each save.
        **kwargs: Further arguments of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best",
        monitor: str | None = None,
        mode: Literal["max", "min"] = "max",
        save_last: bool = True,
        save_top_k: int = 1,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        save_weights_only: bool = False,
        verbose: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            save_weights_only=save_weights_only,
            verbose=verbose,
            **kwargs,
        )
        self._auto_monitor = monitor is None
        self._last_saved_step: int | None = None

    def resolve_dirpath(self, trainer: L.Trainer) -> str:
        """Fix the checkpoint folder (``<default_root_dir>/checkpoints`` unless ``dirpath`` was given)."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
            self._fs = get_filesystem(self.dirpath)
        return str(self.dirpath)

    def find_best_checkpoint(self, trainer: L.Trainer) -> str | None:
        """The most recently written best checkpoint in the folder (``filename`` and its ``-vN`` versions).

        Lets ``ckpt_path="best"`` work in a process that did not run ``fit``.
        """
        folder = Path(self.resolve_dirpath(trainer))
        stem = self.filename or ""
        if not folder.is_dir() or "{" in stem:
            return None
        pattern = re.compile(rf"^{re.escape(stem)}(-v\d+)?\.ckpt$")
        found = [p for p in folder.iterdir() if p.is_file() and pattern.match(p.name)]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the folder and the monitored key, then set up as ``ModelCheckpoint`` does."""
        self.resolve_dirpath(trainer)
        if self._auto_monitor:
            self.monitor = f"val/dice_{selection_head(pl_module)}"
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Called for ckpt_path="last" before `setup`: the folder must already be the fixed one.
        self.resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _refresh_last(self, trainer: L.Trainer) -> None:
        # ModelCheckpoint (Lightning 2.6) writes last.ckpt only when a top-k checkpoint was written at the
        # same step, so without an improvement last.ckpt would fall behind and a resume would go back.
        if (
            not self.save_last
            or getattr(trainer, "fast_dev_run", False)
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_saved_step == trainer.global_step
            or trainer.global_step == 0
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


# --------------------------------------------------------------------------- image logging
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
                    f"prediction (Dice {100 * _dice(predictions[i], masks[i]):.1f}%)",
                ),
            )
            for ax, (tile, title) in zip(axes[i], tiles, strict=True):
                ax.imshow(tile, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- prediction writing
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
        for i in range(n):
            h, w = (int(v) for v in batch.original_sizes[i])
            p = F.interpolate(
                prediction[i : i + 1].float(), size=(h, w), mode="bilinear", align_corners=False
            )
            mask = (p[0, 0] >= threshold).cpu().numpy()
            relative = self._relative_png(batch.names[i])
            target = folder / "masks" / relative
            _save_png(mask.astype(np.uint8) * 255, target)
            self.written_masks.append(str(target))
            if self.overlay and shown is not None:
                original = None
                if predict_dir:
                    with contextlib.suppress(FileNotFoundError, ValueError):
                        original = read_image(Path(predict_dir) / batch.names[i])
                if original is None or original.shape[:2] != (h, w):
                    resized = Image.fromarray(shown[i]).resize((w, h), Image.Resampling.BILINEAR)
                    original = np.asarray(resized, dtype=np.uint8)
                _save_png(overlay_mask(original, mask, PREDICTION_COLOR), folder / "overlays" / relative)


# --------------------------------------------------------------------------- progress bar
class LossProgressBar(TQDMProgressBar):
    """TQDM progress bar showing the loss terms and the validation Dice under short names.

    ``train/loss_sup`` shows as ``loss_sup`` (likewise every ``train/`` key the module puts on the bar),
    the selection head's ``val/dice_<head>`` as ``val_dice`` once validation has run, and the logger's
    version number is left out.

    Args:
        refresh_rate: Update the bar every this many batches.
        leave: Leave the finished bar of each epoch on screen.
        show_val_dice: Show the last validation Dice of the selection head.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, show_val_dice: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.show_val_dice = show_val_dice

    def get_metrics(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        out: dict[str, int | str | float | dict[str, float]] = {}
        for key, value in items.items():
            out[key.removeprefix("train/")] = value
        if self.show_val_dice:
            dice = trainer.callback_metrics.get(f"val/dice_{selection_head(pl_module)}")
            if dice is not None:
                out["val_dice"] = float(dice)
        return out
