"""A learning-rate schedule for the library's manually optimised modules: cosine decay to zero."""

from __future__ import annotations

import math
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from gpcps_lightning.methods.schedule import run_length

__all__ = ["LRSchedule", "LRScheduleName", "lr_factor"]

LRScheduleName = Literal["constant", "cosine"]


def lr_factor(step: int, total_steps: int, schedule: LRScheduleName = "cosine") -> float:
    """The factor on the base learning rate for the 0-based ``step`` of a run of ``total_steps``.

    ``"cosine"``: ``(1 + cos(pi * step / total_steps)) / 2``, 1 at the first step and 0 after the last;
    ``"constant"``: 1.

    Raises:
        ValueError: On a negative step, a run shorter than one step or an unknown schedule.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"`schedule` must be 'constant' or 'cosine', got {schedule!r}.")
    if step < 0 or total_steps < 1:
        raise ValueError(f"Need step >= 0 and total_steps >= 1, got {step} and {total_steps}.")
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


class LRSchedule(Callback):
    """Sets every optimizer parameter group's learning rate before each training step.

    The library's modules optimise manually, so Lightning steps no scheduler for them; this callback sets
    ``lr = initial_lr * lr_factor(global_step, run_length, schedule)`` for each group, ``initial_lr`` being
    the group's learning rate when training started (kept in the group, so in checkpoints: a resumed run
    continues the same curve). The run length is the Trainer's ``max_steps`` (or its estimate from
    ``max_epochs``). A cosine decay to zero ends a run converged at its own length, which makes runs of
    different lengths comparable at their ends.

    Args:
        schedule: ``"cosine"`` (decay to zero) or ``"constant"``.

    Raises:
        ValueError: On an unknown schedule, or (when fit starts) a run without a finite length.
    """

    def __init__(self, schedule: LRScheduleName = "cosine") -> None:
        lr_factor(0, 1, schedule)  # checks the name
        self.schedule = schedule
        self._total: int | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        self._total = run_length(trainer)
        if self._total is None:
            raise ValueError(
                "LRSchedule decays the learning rate over the run, but this run has no finite length: set "
                "the Trainer's max_steps (or max_epochs)."
            )

    def on_train_batch_start(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._total is not None  # set in on_fit_start
        factor = lr_factor(trainer.global_step, self._total, self.schedule)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
        pl_module.log("train/lr_factor", factor, on_step=True, on_epoch=False, batch_size=1)
