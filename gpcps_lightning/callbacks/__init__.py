"""Callbacks: checkpoint selection, image logging, prediction writing and a readable progress bar.

- :class:`BestCheckpoint` (:mod:`~gpcps_lightning.callbacks.checkpoint`) keeps the best checkpoint by the
  validation Dice of the module's selection head (the ensemble for GP-CPS) plus ``last.ckpt``, in a fixed
  folder so that ``--ckpt_path last`` resumes.
- :class:`ValidationImagePanel` (:mod:`~gpcps_lightning.callbacks.images`) logs, every few epochs, fixed
  validation images with their ground truth and prediction overlays (W&B, TensorBoard, or PNG files for
  other loggers); :class:`PredictionsPicture` writes a picture of a few validation predictions at the end
  of ``fit``.
- :class:`PredictionWriter` (:mod:`~gpcps_lightning.callbacks.writer`) writes one binary PNG mask per image
  at its original size (and overlays).
- :class:`LRSchedule` (:mod:`~gpcps_lightning.callbacks.lr_schedule`) decays every optimizer group's
  learning rate along a cosine to zero over the run (the modules optimise manually, so Lightning steps no
  scheduler for them).
- :class:`LossProgressBar` (:mod:`~gpcps_lightning.callbacks.progress`) shows the loss terms and the
  validation Dice with short names.
- :class:`TrainingClock` (:mod:`~gpcps_lightning.callbacks.clock`) counts a training's wall time and
  saves it in its checkpoints, so that a resumed run reports the time of all its parts.
- :class:`LoaderWorkerThreads` (:mod:`~gpcps_lightning.callbacks.threads`) counts the data-loader
  workers in the CPU thread policy by their measured use.
"""

from __future__ import annotations

from gpcps_lightning.callbacks.checkpoint import BestCheckpoint, selection_head
from gpcps_lightning.callbacks.clock import TrainingClock
from gpcps_lightning.callbacks.images import (
    GROUND_TRUTH_COLOR,
    PANEL_COLUMN_TITLES,
    PREDICTION_COLOR,
    PredictionsPicture,
    ValidationImagePanel,
    display_images,
    overlay_mask,
    panel_scale,
    prediction_panel,
)
from gpcps_lightning.callbacks.lr_schedule import LRSchedule
from gpcps_lightning.callbacks.progress import LossProgressBar
from gpcps_lightning.callbacks.threads import LoaderWorkerThreads
from gpcps_lightning.callbacks.writer import PredictionWriter

__all__ = [
    "GROUND_TRUTH_COLOR",
    "PANEL_COLUMN_TITLES",
    "PREDICTION_COLOR",
    "BestCheckpoint",
    "LRSchedule",
    "LoaderWorkerThreads",
    "LossProgressBar",
    "PredictionWriter",
    "PredictionsPicture",
    "TrainingClock",
    "ValidationImagePanel",
    "display_images",
    "overlay_mask",
    "panel_scale",
    "prediction_panel",
    "selection_head",
]
