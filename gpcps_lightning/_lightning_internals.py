"""Every use of Lightning's private API, in one place (written against Lightning 2.6).

The rest of the package calls the functions and subclasses the classes of this module; no other module
names a private Lightning attribute, method or class (``tests/test_layout.py`` fails if one does). Each
item says what it relies on and which public API would replace it, so a Lightning release that changes
one of them is fixed here, and the tests that cover each (named below) fail first.

- :class:`LightningCLIHooks`: three private methods of ``LightningCLI`` under public hook names
  (``tests/test_cli.py``).
- :class:`ModelCheckpointHooks`: the private ``last.ckpt`` methods of ``ModelCheckpoint``
  (``tests/test_checkpointing.py``, ``tests/test_resume.py``).
- :func:`fit_loop_counters` and :func:`restart_fit_loop`: the fit loop's progress counters and restart
  flag (``tests/test_resume.py``, ``tests/test_data_module.py``).
- :func:`attached_trainer`, :func:`jit_scripting`: a LightningModule's Trainer and its scripting flag.
- :func:`pending_wandb_init`: the arguments a ``WandbLogger`` will pass to ``wandb.init``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.progress import _ProcessedTracker
from torch import Tensor

__all__ = [
    "FitLoopCounters",
    "LightningCLIHooks",
    "ModelCheckpointHooks",
    "attached_trainer",
    "fit_loop_counters",
    "jit_scripting",
    "pending_wandb_init",
    "restart_fit_loop",
]


# ---------------------------------------------------------------------------------------- LightningCLI
class LightningCLIHooks(LightningCLI):
    """``LightningCLI`` whose private steps call public-named hooks; subclass it and override the hooks.

    No public hook of ``LightningCLI`` (2.6) adds options to one subcommand only, changes the list of
    the parser's callbacks (``--checkpoint.*`` etc.) handed to the Trainer, or sees ``--ckpt_path`` before
    Lightning reads its hyperparameters, so the three private methods that do are overridden here, each
    calling the hook and otherwise delegating to Lightning.
    """

    def add_subcommand_arguments(self, parser: LightningArgumentParser, subcommand: str) -> None:
        """Add options to the parser of one subcommand (``fit``, ``predict``, ...); by default none."""

    def select_trainer_callbacks(self, config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
        """The parser's callbacks to give the Trainer, given its arguments ``config``; by default all."""
        return callbacks

    def on_unreadable_ckpt_path(self, ckpt_path: str | None) -> None:
        """Called when Lightning fails to read ``--ckpt_path``'s hyperparameters; the error is re-raised."""

    # Relies on: LightningCLI._add_subcommands calling `_prepare_subcommand_parser(klass, subcommand,
    # **kwargs)` once per subcommand and registering the parser it returns. Public replacement: none
    # (`add_arguments_to_parser` is called with the same arguments for every subcommand).
    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        self.add_subcommand_arguments(parser, subcommand)
        return parser

    # Relies on: the public `instantiate_trainer(**kwargs)` passing the parser's callbacks to
    # `_instantiate_trainer(config, callbacks)`. Public replacement: none (`instantiate_trainer`'s kwargs
    # can add Trainer arguments, but not drop one of the parser's callbacks).
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        return super()._instantiate_trainer(config, self.select_trainer_callbacks(config, callbacks))

    # Relies on: LightningCLI.__init__ calling `_parse_ckpt_path()` after parsing, which reads the
    # hyperparameters of `--ckpt_path` with a bare torch.load. Public replacement: none.
    def _parse_ckpt_path(self) -> None:
        try:
            super()._parse_ckpt_path()
        except Exception:
            subcommand = self.config.get("subcommand")
            self.on_unreadable_ckpt_path(self.config[subcommand].get("ckpt_path") if subcommand else None)
            raise


# ------------------------------------------------------------------------------------- ModelCheckpoint
class ModelCheckpointHooks(ModelCheckpoint):
    """``ModelCheckpoint`` with the private parts that keep ``last.ckpt`` under public names.

    Relies on (Lightning 2.6): ``_find_last_checkpoints(trainer)`` (called for ``ckpt_path="last"``, before
    ``setup``), ``_save_last_checkpoint(trainer, monitor_candidates)``, ``_monitor_candidates(trainer)``,
    ``_should_save_on_train_epoch_end(trainer)`` and the filesystem ``_fs`` that goes with ``dirpath``.
    Public replacement: none; ``ModelCheckpoint`` has no public way to write ``last.ckpt`` on demand.
    """

    def before_find_last_checkpoints(self, trainer: L.Trainer) -> None:
        """Called before the folder is searched for ``last.ckpt`` (``ckpt_path="last"``); nothing here."""

    def after_save_last_checkpoint(self, trainer: L.Trainer) -> None:
        """Called after each call that saves ``last.ckpt`` (if ``save_last``); does nothing here."""

    def set_dirpath(self, dirpath: str) -> None:
        """Set the checkpoint folder, and the filesystem ``ModelCheckpoint`` writes it with."""
        self.dirpath = dirpath
        self._fs = get_filesystem(dirpath)

    def save_last_checkpoint(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (if ``save_last``), as ``ModelCheckpoint`` does after a top-k save."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def saves_on_train_epoch_end(self, trainer: L.Trainer) -> bool:
        """Whether this callback saves at the end of the training epoch rather than after validation."""
        return self._should_save_on_train_epoch_end(trainer)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self.before_find_last_checkpoints(trainer)
        return super()._find_last_checkpoints(trainer)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.after_save_last_checkpoint(trainer)


# ------------------------------------------------------------------------------------------- fit loop
class FitLoopCounters(NamedTuple):
    """The fit loop's progress counters, as plain values (see :func:`fit_loop_counters`)."""

    #: Whether the loop state was restored from a checkpoint and the loop has not run since.
    restarting: bool
    #: Epochs counted ready / started / processed / completed (``fit_loop.epoch_progress.current``).
    epoch_ready: int
    epoch_started: int
    epoch_processed: int
    epoch_completed: int
    #: Batches of the current epoch processed / completed (``epoch_loop.batch_progress.current``).
    batch_processed: int
    batch_completed: int
    #: Whether the last batch fetched was the epoch's last.
    is_last_batch: bool


def fit_loop_counters(trainer: L.Trainer) -> FitLoopCounters:
    """The fit loop's counters: which epoch started, how many of its batches ran, and the restart flag.

    Relies on: ``trainer.fit_loop`` (public attribute, private class ``_FitLoop``), its ``restarting``,
    ``epoch_progress.current`` and ``epoch_loop.batch_progress`` (private ``_Progress`` classes, whose
    trackers are ``_ProcessedTracker``). Public replacement: none; ``trainer.current_epoch`` and
    ``trainer.global_step`` count finished epochs and optimizer steps, not started epochs and the
    batches of the current epoch.
    """
    loop = trainer.fit_loop
    # Both trackers are _ProcessedTracker at run time; the attributes are annotated with a base class.
    epoch = cast(_ProcessedTracker, loop.epoch_progress.current)
    batches = loop.epoch_loop.batch_progress
    batch = cast(_ProcessedTracker, batches.current)
    return FitLoopCounters(
        restarting=bool(loop.restarting),
        epoch_ready=int(epoch.ready),
        epoch_started=int(epoch.started),
        epoch_processed=int(epoch.processed),
        epoch_completed=int(epoch.completed),
        batch_processed=int(batch.processed),
        batch_completed=int(batch.completed),
        is_last_batch=bool(batches.is_last_batch),
    )


def restart_fit_loop(trainer: L.Trainer) -> None:
    """Clear the fit loop's restart flag and reset it, as Lightning does when resuming without ``max_steps``.

    Relies on: ``_Loop.restarting``'s setter, which clears the flag on the loop and its child loops
    (``_FitLoop``'s own setter forces the flag back on under ``max_steps``), and ``_FitLoop.reset()``.
    Public replacement: none (Lightning issue 19617).
    """
    loop = trainer.fit_loop
    _Loop.restarting.fset(loop, False)  # type: ignore[attr-defined]
    loop.reset()


# ---------------------------------------------------------------------------------- LightningModule
def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, or ``None``.

    Relies on: ``LightningModule._trainer``. Public replacement: ``module.trainer``, which raises
    ``RuntimeError`` instead of returning ``None`` when no Trainer is attached.
    """
    trainer: L.Trainer | None = module._trainer
    return trainer


@contextlib.contextmanager
def jit_scripting(module: L.LightningModule) -> Iterator[None]:
    """Let tracers and ``torch.jit.script`` probe ``module.trainer`` without a Trainer attached.

    Relies on: ``LightningModule._jit_is_scripting``, the flag ``LightningModule.to_torchscript`` sets so
    that the ``trainer`` property returns ``None`` instead of raising. Public replacement:
    ``LightningModule.to_torchscript`` / ``to_onnx``, which set it but also choose the export arguments.
    """
    flag = getattr(module, "_jit_is_scripting", False)
    module._jit_is_scripting = True
    try:
        yield
    finally:
        module._jit_is_scripting = flag


# ---------------------------------------------------------------------------------------- WandbLogger
def pending_wandb_init(logger: WandbLogger) -> dict[str, Any] | None:
    """The arguments ``logger`` will pass to ``wandb.init`` (to change in place), or ``None`` once it ran.

    Relies on: ``WandbLogger._wandb_init`` (the dict of ``wandb.init`` arguments) and
    ``WandbLogger._experiment`` (``None`` until the run starts). Public replacement: none (the
    constructor's ``**kwargs`` reach ``wandb.init``, but ``anonymous`` is always added).
    """
    init = getattr(logger, "_wandb_init", None)
    if not isinstance(init, dict) or getattr(logger, "_experiment", None) is not None:
        return None
    return init
