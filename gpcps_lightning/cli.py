"""The ``gpcps`` command line: a :class:`~lightning.pytorch.cli.LightningCLI` with the library's defaults.

``gpcps fit|validate|test|predict`` take the model and the data as ``class_path``/``init_args`` (any
:class:`~gpcps_lightning.methods.base.SegmentationModule` subclass and any ``LightningDataModule``), so
the same YAML files work in a user's own ``LightningCLI``. On top of Lightning's options the command adds:

- ``--checkpoint.*``: :class:`~gpcps_lightning.callbacks.BestCheckpoint` (best by validation Dice of the
  selection head, plus ``last.ckpt``, in ``<default_root_dir>/checkpoints``);
- ``--image_panel.*``: :class:`~gpcps_lightning.callbacks.ValidationImagePanel`;
- ``--progress_bar.*``: :class:`~gpcps_lightning.callbacks.LossProgressBar`;
- ``predict`` only: ``--prediction_writer.*``: :class:`~gpcps_lightning.callbacks.PredictionWriter`;
- :class:`~gpcps_lightning.checkpointing.SafeCheckpointIO` as the checkpoint I/O plugin (atomic writes,
  weights-only reads, clear errors for truncated or foreign checkpoints) unless the config sets another.

``--ckpt_path best`` also works in a process that did not train (it takes the newest ``best*.ckpt`` of
the checkpoint folder), and W&B goes offline with a message when there is no W&B login.

Other commands are dispatched to their modules: ``gpcps bench ...`` (:mod:`gpcps_lightning.tools.bench`),
``gpcps reproduce ...`` (:mod:`gpcps_lightning.tools.reproduce`), ``gpcps export ...``
(:mod:`gpcps_lightning.inference.export`) and ``gpcps evaluate ...``
(:mod:`gpcps_lightning.inference.evaluate`); each takes ``--help``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.plugins.io import CheckpointIO

from gpcps_lightning._utils import import_object
from gpcps_lightning._version import __version__
from gpcps_lightning.callbacks import BestCheckpoint, LossProgressBar, PredictionWriter, ValidationImagePanel
from gpcps_lightning.checkpointing import SafeCheckpointIO, read_checkpoint
from gpcps_lightning.loggers import resolve_wandb_mode
from gpcps_lightning.methods.base import SegmentationModule

__all__ = ["EXTRA_COMMANDS", "GPCPSCLI", "main"]

#: Commands run by other modules of the library: name -> (module with a ``main(argv)``, one-line help).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("gpcps_lightning.tools.bench", "Benchmark training-step speed and memory."),
    "reproduce": ("gpcps_lightning.tools.reproduce", "Reproduce the paper's tables under one protocol."),
    "export": ("gpcps_lightning.inference.export", "Export a checkpoint to TorchScript or ONNX."),
    "evaluate": ("gpcps_lightning.inference.evaluate", "Evaluate checkpoints on other image/mask folders."),
}

_DESCRIPTION = (
    f"gpcps_lightning {__version__}: GP-CPS semi-supervised segmentation. Train with "
    "`gpcps fit --config CONFIG.yaml`, resume with `--ckpt_path last`, evaluate with "
    "`gpcps test --config CONFIG.yaml --ckpt_path best`, segment a folder with `gpcps predict --config "
    "CONFIG.yaml --ckpt_path best --data.predict_dir DIR`. `gpcps SUBCOMMAND --help` lists every option; "
    "`--model.help CLASS` / `--data.help CLASS` document one class. Docs: docs/configuration.md."
)
_EPILOG = "Other commands (each takes --help): " + "; ".join(
    f"`gpcps {name}`: {text[0].lower()}{text[1:-1]}" for name, (_, text) in EXTRA_COMMANDS.items()
)


def _class_from_path(class_path: str) -> type | None:
    try:
        cls = import_object(class_path)
    except ImportError:
        return None  # jsonargparse reports bad class paths itself
    return cls if isinstance(cls, type) else None


def _is_wandb_logger(config: Any) -> bool:
    class_path = config.get("class_path") if hasattr(config, "get") else None
    cls = _class_from_path(class_path) if isinstance(class_path, str) else None
    return cls is not None and issubclass(cls, _LightningWandbLogger)


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class GPCPSCLI(LightningCLI):
    """LightningCLI of the library: subclass-mode model and data, library callbacks, W&B without login.

    Args:
        *args: Positional arguments of :class:`~lightning.pytorch.cli.LightningCLI`.
        **kwargs: Keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`; the defaults here are
            ``model_class=SegmentationModule``, ``datamodule_class=LightningDataModule`` (both in subclass
            mode), ``seed_everything_default=0``, ``auto_configure_optimizers=False`` (each module
            configures its own optimizer) and ``save_config_kwargs={"overwrite": True}`` (a resumed run
            rewrites its ``config.yaml``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", SegmentationModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", "gpcps")
        parser_kwargs.setdefault("description", _DESCRIPTION)
        parser_kwargs.setdefault("epilog", _EPILOG)
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:  # noqa: D102
        parser = super().init_parser(**kwargs)
        parser.add_argument(
            "--version",
            action="version",
            version=f"gpcps_lightning {__version__}",
            help="Print the version and exit.",
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the library's always-present callbacks (configurable as ``--checkpoint.*`` etc.)."""
        parser.set_defaults({"model": {"class_path": "gpcps_lightning.GPCPSModule"}})
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ValidationImagePanel, "image_panel")
        parser.add_lightning_class_args(LossProgressBar, "progress_bar")

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
            # Masks are written by the callback; keeping every probability map in memory is not needed.
            parser.set_defaults({"return_predictions": False})
        return parser

    def before_instantiate_classes(self) -> None:
        """Prepare W&B loggers: offline mode without a login, Lightning's default logger when W&B is off.

        Without W&B credentials and with ``WANDB_MODE`` unset, W&B is switched to offline mode with a
        one-line message. With ``WANDB_MODE=disabled``, W&B loggers are replaced by Lightning's default
        logger (TensorBoard if installed, else CSV, in ``trainer.default_root_dir``), with a message, so
        the metrics are still written somewhere.
        """
        config = self.config.get(str(self.subcommand), self.config)
        trainer_config = config.get("trainer")
        if trainer_config is None:
            return
        loggers = _as_list(trainer_config.get("logger"))
        wandb_loggers = [logger for logger in loggers if _is_wandb_logger(logger)]
        if not wandb_loggers:
            return
        if os.environ.get("WANDB_MODE", "").lower() == "disabled":
            kept = [logger for logger in loggers if not _is_wandb_logger(logger)]
            trainer_config["logger"] = kept if kept else True
            root = trainer_config.get("default_root_dir") or "."
            print(
                f"gpcps: WANDB_MODE=disabled, so the W&B logger is replaced by "
                f"{'the other configured loggers' if kept else 'TensorBoard/CSV logging'} in {root}.",
                file=sys.stderr,
                flush=True,
            )
            return
        for logger in wandb_loggers:
            init_args = logger.get("init_args") or {}
            if not init_args.get("offline", False):
                resolve_wandb_mode(init_args.get("save_dir") or init_args.get("dir"))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # The always-present callbacks must give way when the Trainer switches their feature off, which
        # Lightning would otherwise reject as a contradiction.
        kept = []
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and config.get("enable_checkpointing") is False:
                continue
            if isinstance(callback, ProgressBar) and config.get("enable_progress_bar") is False:
                continue
            if isinstance(callback, ProgressBar) and any(
                isinstance(c, ProgressBar) for c in _as_list(config.get("callbacks"))
            ):
                continue  # the config brings its own progress bar
            kept.append(callback)
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # Atomic writes and clear errors for truncated or foreign checkpoints (docs/errors.md).
            config = {**config, "plugins": [*plugins, SafeCheckpointIO()]}
        return super()._instantiate_trainer(config, kept)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the hyperparameters of --ckpt_path with a bare torch.load, before the checkpoint
        # I/O plugin sees the file: a truncated or foreign file would fail there with PyTorch's own error.
        try:
            super()._parse_ckpt_path()
        except Exception:
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and os.path.isfile(ckpt_path):
                read_checkpoint(ckpt_path)  # raises the error that names the file and says what to do
            raise

    def _resolve_best(self) -> None:
        subcommand = str(self.subcommand)
        if self.config_init[subcommand].get("ckpt_path") != "best":
            return
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, BestCheckpoint) and not callback.best_model_path:
            found = callback.find_best_checkpoint(self.trainer)
            if found is None:
                folder = callback.resolve_dirpath(self.trainer)
                if "{" in (callback.filename or ""):
                    hint = "checkpoint.filename has {fields}, so pass the .ckpt path of the best checkpoint"
                else:
                    hint = "train first (gpcps fit, same --trainer.default_root_dir) or pass a .ckpt path"
                raise FileNotFoundError(f"--ckpt_path best: no best checkpoint found in {folder!r}; {hint}.")
            callback.best_model_path = found

    def before_validate(self) -> None:  # noqa: D102
        self._resolve_best()

    def before_test(self) -> None:  # noqa: D102
        self._resolve_best()

    def before_predict(self) -> None:  # noqa: D102
        self._resolve_best()


def _run_extra_command(name: str, argv: Sequence[str]) -> int:
    module_name, _ = EXTRA_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(
            f"gpcps {name}: this installation of gpcps_lightning {__version__} has no {module_name} module; "
            "update gpcps_lightning to a version that provides it.",
            file=sys.stderr,
        )
        return 2
    result = module.main(list(argv))
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpcps`` console script and of ``python -m gpcps_lightning``.

    Args:
        argv: Command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (argument errors exit through ``SystemExit`` as argparse does).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        return _run_extra_command(args[0], args[1:])
    # Passing None lets LightningCLI read sys.argv itself (it warns when both are given).
    GPCPSCLI(args=None if argv is None else args)
    return 0
