"""Checkpoint policy: which head's validation Dice selects checkpoints, and where they are kept."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from gpcps_lightning._lightning_internals import ModelCheckpointHooks

__all__ = ["BestCheckpoint", "selection_head"]


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


class BestCheckpoint(ModelCheckpointHooks):
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
            self.set_dirpath(os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints")))
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

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Take over the state of a plain ``ModelCheckpoint`` with the same settings.

        Runs of ``gpcps reproduce run`` interrupted before the runner used this callback saved their best
        score under ``ModelCheckpoint``'s state key; Lightning loads a callback's state by its key, so
        without this a resumed run would forget its best score and select the first validation after the
        restart. The state is moved to this callback's key before Lightning loads states.
        """
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        legacy = "ModelCheckpoint" + self.state_key.removeprefix(type(self).__qualname__)
        if legacy in states:
            states[self.state_key] = states.pop(legacy)

    def before_find_last_checkpoints(self, trainer: L.Trainer) -> None:
        """Fix the folder: ``ckpt_path="last"`` looks for ``last.ckpt`` before ``setup``."""
        self.resolve_dirpath(trainer)

    def after_save_last_checkpoint(self, trainer: L.Trainer) -> None:
        """Remember the step of the last ``last.ckpt``."""
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
        self.save_last_checkpoint(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_validation_end(trainer, pl_module)
        if not self.saves_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_train_epoch_end(trainer, pl_module)
        if self.saves_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
