"""One Trainer for the trainings the library runs itself: the reproduction runner's and ST++'s stages.

Both train for a fixed number of steps, validate every ``val_every`` steps without a sanity check, keep
the best checkpoint by validation Dice of the selection head and an always-current ``last.ckpt``
(:class:`~gpcps_lightning.callbacks.BestCheckpoint`, the checkpoint policy ``gpcps fit`` uses too),
write CSV logs and save checkpoints atomically (:class:`~gpcps_lightning.checkpointing.SafeCheckpointIO`).
:class:`TrainingSpec` holds what varies between them, and its :meth:`TrainingSpec.record` is both the
Trainer's arguments and the ``trainer`` block of a run's record, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from gpcps_lightning.callbacks.checkpoint import BestCheckpoint
from gpcps_lightning.callbacks.lr_schedule import LRSchedule
from gpcps_lightning.checkpointing import SafeCheckpointIO

__all__ = ["TrainingSpec", "build_trainer", "evaluation_trainer", "selected_checkpoint"]

#: Learning-rate schedules a :class:`TrainingSpec` can name.
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainingSpec:
    """What a training's Trainer depends on.

    Args:
        max_steps: Optimizer steps.
        val_every: Validation (and checkpoint selection) interval in steps.
        precision: Trainer precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ...).
        accelerator: Trainer accelerator.
        lr_schedule: ``"constant"``, or ``"cosine"``: decay to zero over ``max_steps``
            (:class:`~gpcps_lightning.callbacks.LRSchedule`).
        progress_bar: Show Lightning's progress bar.
    """

    max_steps: int
    val_every: int
    precision: str = "32-true"
    accelerator: str = "auto"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    progress_bar: bool = False

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}.")

    def record(self) -> dict[str, Any]:
        """The ``trainer`` block of a run record: the Trainer's arguments and the schedule."""
        return {
            "accelerator": self.accelerator,
            "devices": 1,
            "precision": self.precision,
            "max_steps": self.max_steps,
            "val_check_interval": self.val_every,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "lr_schedule": self.lr_schedule,
        }


def build_trainer(
    spec: TrainingSpec,
    folder: str | Path,
    *,
    monitor: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[L.Trainer, BestCheckpoint]:
    """The Trainer of one training in ``folder``, and its checkpoint callback.

    Checkpoints go to ``folder/checkpoints`` (``best.ckpt``, ``last.ckpt``), CSV logs to ``folder/logs``.

    Args:
        spec: The training's settings.
        folder: The training's folder.
        monitor: The logged key that selects the best checkpoint (default: ``val/dice_<selection head>``).
        callbacks: Further callbacks, after the checkpoint and the learning-rate schedule.

    Returns:
        The Trainer and its :class:`~gpcps_lightning.callbacks.BestCheckpoint` (whose
        ``best_model_path`` names the selected checkpoint after ``fit``).
    """
    folder = Path(folder)
    checkpoint = BestCheckpoint(dirpath=str(folder / "checkpoints"), monitor=monitor)
    schedule = [LRSchedule("cosine")] if spec.lr_schedule == "cosine" else []
    arguments = {k: v for k, v in spec.record().items() if k != "lr_schedule"}
    trainer = L.Trainer(
        **arguments,
        callbacks=[checkpoint, *schedule, *callbacks],
        logger=CSVLogger(folder, name="logs"),
        plugins=[SafeCheckpointIO()],
        enable_progress_bar=spec.progress_bar,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    return trainer, checkpoint


def selected_checkpoint(checkpoint: BestCheckpoint, folder: str | Path) -> Path | None:
    """The best checkpoint of the training in ``folder`` (of :func:`build_trainer`) after ``fit``.

    The callback's ``best_model_path``; or ``folder/checkpoints/best.ckpt`` when the callback names
    none, or names another folder (a run resumed after its folder was moved: the restored state names
    the old one); ``None`` when there is no best checkpoint.
    """
    checkpoints = Path(folder) / "checkpoints"
    named = checkpoint.best_model_path
    if named and Path(named).resolve().parent == checkpoints.resolve():
        return Path(named)
    fallback = checkpoints / "best.ckpt"
    return fallback if fallback.is_file() else None


def evaluation_trainer(spec: TrainingSpec, folder: str | Path) -> L.Trainer:
    """A Trainer that only validates, tests or predicts: no logger, no checkpoints."""
    return L.Trainer(
        accelerator=spec.accelerator,
        devices=1,
        precision=spec.precision,  # type: ignore[arg-type]
        logger=False,
        enable_progress_bar=spec.progress_bar,
        enable_model_summary=False,
        default_root_dir=Path(folder),
    )
