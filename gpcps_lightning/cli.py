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
the checkpoint folder), and W&B goes offline with a message when there is no W&B login. ``validate``,
``test`` and ``predict`` log nowhere unless the command line names a logger (``--trainer.logger X``):
a config's ``trainer.logger`` is meant for ``fit``.

Errors read as one message. A misspelt option or config key is named with the closest valid name
(:class:`GPCPSArgumentParser`; ``--help`` shows the usage), and an error the library raises about its
input (a bad file, option or checkpoint: ``ValueError``, ``FileNotFoundError``, ``TypeError`` ...) is
printed as ``gpcps <command>: error: <message>`` with exit status 2. ``GPCPS_TRACEBACK=1`` (or
``gpcps --traceback ...``) shows the traceback instead; errors from elsewhere (bugs) always show it.

Other commands are dispatched to their modules: ``gpcps bench ...`` (:mod:`gpcps_lightning.tools.bench`),
``gpcps reproduce ...`` (:mod:`gpcps_lightning.tools.reproduce`), ``gpcps export ...``
(:mod:`gpcps_lightning.inference.export`) and ``gpcps evaluate ...``
(:mod:`gpcps_lightning.inference.evaluate`); each takes ``--help``.
"""

from __future__ import annotations

import difflib
import importlib
import linecache
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.plugins.io import CheckpointIO

from gpcps_lightning._lightning_internals import LightningCLIHooks
from gpcps_lightning._utils import TRACEBACK_ENV, import_object, traceback_requested
from gpcps_lightning._version import __version__
from gpcps_lightning.callbacks import (
    BestCheckpoint,
    LoaderWorkerThreads,
    LossProgressBar,
    PredictionWriter,
    ValidationImagePanel,
)
from gpcps_lightning.checkpointing import SafeCheckpointIO, read_checkpoint
from gpcps_lightning.loggers import quiet_wandb_init, resolve_wandb_mode
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.threads import apply_thread_policy, policy_overridden

__all__ = [
    "EXTRA_COMMANDS",
    "GPCPSCLI",
    "GPCPSArgumentParser",
    "explain_parse_error",
    "main",
    "reported_error",
]

#: Commands run by other modules of the library: name -> (module with a ``main(argv)``, one-line help).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("gpcps_lightning.tools.bench", "Benchmark training-step speed and memory."),
    "reproduce": ("gpcps_lightning.tools.reproduce", "Reproduce the paper's tables under one protocol."),
    "export": ("gpcps_lightning.inference.export", "Export a checkpoint to TorchScript or ONNX."),
    "evaluate": ("gpcps_lightning.inference.evaluate", "Evaluate checkpoints on other image/mask folders."),
}

#: Subcommands that log nowhere unless the command line names a logger.
_QUIET_SUBCOMMANDS = ("validate", "test", "predict")

_DESCRIPTION = (
    f"gpcps_lightning {__version__}: GP-CPS semi-supervised segmentation. Train with "
    "`gpcps fit --config CONFIG.yaml`, resume with `--ckpt_path last`, evaluate with "
    "`gpcps test --config CONFIG.yaml --ckpt_path best`, segment a folder with `gpcps predict --config "
    "CONFIG.yaml --ckpt_path best --data.predict_dir DIR`. `gpcps SUBCOMMAND --help` lists every option; "
    "`--model.help CLASS` / `--data.help CLASS` document one class. Errors are printed as one message; "
    "`gpcps --traceback ...` (or GPCPS_TRACEBACK=1) shows their traceback. Docs: docs/configuration.md."
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


# --------------------------------------------------------------------------- parse errors
_UNION_ERROR = "Does not validate against any of the Union subtypes"
#: Parser entries that are not options a config or the command line sets.
_NOT_OPTIONS = {"help", "config", "print_config", "version"}


def _did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def _option_keys(parser: ArgumentParser) -> set[str]:
    """The dotted keys a parser accepts (``trainer.max_steps``, ``model``, ...)."""
    return {
        action.dest
        for action in parser._actions
        if action.dest not in _NOT_OPTIONS and not action.dest.endswith(".help")
    }


def _class_options(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for a class (``**kwargs`` followed), or none if unknown."""
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(import_object(class_path), fail_untyped=False)
    except Exception:  # only a suggestion is lost; the message still names the option
        return []
    return sorted({key.split(".")[0] for key in _option_keys(parser)})


def _unknown_key(parser: LightningArgumentParser, dotted: str) -> str:
    """Name the first part of a config key the parser does not know, with the closest valid name."""
    keys = _option_keys(parser)
    parts = dotted.split(".")
    for i in range(len(parts)):
        key = ".".join(parts[: i + 1])
        if key in keys or any(k.startswith(key + ".") for k in keys):
            continue
        parent = ".".join(parts[:i])
        below = [k[len(parent) + 1 :] for k in keys if k.startswith(parent + ".")] if parent else keys
        where = f" (in {dotted})" if i < len(parts) - 1 else ""
        return f"unknown key '{key}'{where}" + _did_you_mean(
            parts[i], [k.split(".")[0] for k in below], f"{parent}." if parent else ""
        )
    return f"unknown key '{dotted}'"


def _class_path_problem(message: str) -> tuple[str, str] | None:
    """The class path and the indented detail of jsonargparse's first "Problem with given class_path"."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(\s*)- Problem with given class_path '([^']+)':\s*$", line)
        if found is None:
            continue
        indent = len(found.group(1))
        detail = []
        for next_line in lines[i + 1 :]:
            if next_line.strip() and len(next_line) - len(next_line.lstrip()) <= indent:
                break
            detail.append(next_line)
        return found.group(2), textwrap.dedent("\n".join(detail)).strip()
    return None


def explain_parse_error(parser: LightningArgumentParser, message: str) -> str:
    """Turn a jsonargparse error into one short message that names the option and the closest valid one.

    Handles an unknown command-line option (``--trainer.max_stepz``), an unknown config key (``trainr:``),
    an option a class does not take (``--model.lamda_grad``, also in a config's ``init_args``) and a value
    of the wrong type inside a class's options; other messages are returned with jsonargparse's Union
    details (the subtypes tried, the value given) left out.

    Args:
        parser: The parser of the (sub)command whose options apply.
        message: jsonargparse's error message.

    Returns:
        The message to print after ``gpcps <command>: error:``.
    """
    prog = parser.prog.replace(" [options]", "")
    unrecognized = re.match(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unrecognized:
        option = next((t for t in unrecognized.group(1).split() if t.startswith("-")), None)
        if option is None:
            return message
        name = option.split("=", 1)[0].rstrip("+")
        known = [s for action in parser._actions for s in action.option_strings if not s.endswith("+")]
        return f"unknown option {name}" + _did_you_mean(name, known)
    unknown_key = re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", message)
    if unknown_key:
        return _unknown_key(parser, unknown_key.group(1))
    key = re.match(r'Parser key "([^"]+)":', message)
    problem = _class_path_problem(message)
    if key and problem:
        class_path, detail = problem
        not_accepted = re.fullmatch(r"Option '([^']+)' is not accepted", detail)
        if not_accepted:
            option = not_accepted.group(1)
            return (
                f"{key.group(1)}: {class_path} has no option '{option}'"
                + _did_you_mean(option, _class_options(class_path))
                + f" (`{prog} --{key.group(1)}.help {class_path}` lists its options)"
            )
        inner = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', detail, re.DOTALL)
        if inner:
            return f"{key.group(1)}.{inner.group(1)}: {' '.join(inner.group(2).split())}"
        return f"{key.group(1)} ({class_path}): {' '.join(detail.split())}"
    if _UNION_ERROR in message:
        # Keep the reasons and drop the subtypes tried and the echo of the value.
        errors = re.findall(r"^\s*- (.+)$", message, re.MULTILINE)
        reasons = [e for e in errors if not e.startswith(("Expected a <class 'NoneType'>", _UNION_ERROR))]
        if reasons:
            return (f"{key.group(1)}: " if key else "") + "; ".join(reasons)
    if key:  # 'Parser key "config": File does not exist: ...'
        return f"{key.group(1)}: {message[key.end() :].strip()}"
    return message


class GPCPSArgumentParser(LightningArgumentParser):
    """Lightning's argument parser, reporting a parse error as one short message instead of the usage.

    ``gpcps fit --model.lamda_grad 1`` prints ``gpcps fit: error: model: gpcps_lightning.GPCPSModule
    has no option 'lamda_grad'; did you mean 'lambda_grad'? ...`` and where to find the options, and exits
    with status 2 (see :func:`explain_parse_error`). ``--help`` prints the usage and every option.
    With ``GPCPS_TRACEBACK=1`` (or ``JSONARGPARSE_DEBUG``) jsonargparse's own report is printed.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the short message and exit with status 2 (jsonargparse's behaviour where it raises).

        Args:
            message: jsonargparse's error message.
            ex: The exception behind it, if any.
        """
        if not self.exit_on_error or traceback_requested() or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {explain_parse_error(parser, message)}\n"
            f"`{prog} --help` lists the options; {TRACEBACK_ENV}=1 shows the parser's full report.\n"
        )
        self.exit(2)


# --------------------------------------------------------------------------- errors while running
#: Exception types the library raises about its input, with a message that says what to do.
_INPUT_ERRORS = (ValueError, TypeError, OSError, ImportError, MemoryError, FloatingPointError)
_PACKAGE_DIR = Path(__file__).resolve().parent


def _raised_by_the_library(err: BaseException) -> bool:
    # The innermost frame is a `raise` statement of this package: a message the library wrote, not
    # an error of Python or of another package passing through (a bug, which keeps its traceback).
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    return inside and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def reported_error(err: BaseException) -> BaseException | None:
    """The library's own error behind ``err``, which the commands print as a message alone, or ``None``.

    That is an exception of a type in ``ValueError``, ``TypeError``, ``OSError`` (``FileNotFoundError``
    ...), ``ImportError``, ``MemoryError`` or ``FloatingPointError`` raised by a ``raise`` statement of
    gpcps_lightning, also when jsonargparse wraps it (a class rejecting its options). Anything else is a
    bug or an error of another package and keeps its traceback.

    Args:
        err: The exception that ended the command.

    Returns:
        The exception whose message to print, or ``None``.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _INPUT_ERRORS) and _raised_by_the_library(current):
            return current
        if not str(current).startswith(_UNION_ERROR):
            return None
        current = current.__cause__  # jsonargparse's "Does not validate ..." wraps the class's error
    return None


class GPCPSCLI(LightningCLIHooks):
    """LightningCLI of the library: subclass-mode model and data, library callbacks, W&B without login.

    Args:
        *args: Positional arguments of :class:`~lightning.pytorch.cli.LightningCLI`.
        **kwargs: Keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`; the defaults here are
            ``model_class=SegmentationModule``, ``datamodule_class=LightningDataModule`` (both in subclass
            mode), ``seed_everything_default=0``, ``auto_configure_optimizers=False`` (each module
            configures its own optimizer), ``save_config_kwargs={"overwrite": True}`` (a resumed run
            rewrites its ``config.yaml``) and ``parser_class=GPCPSArgumentParser`` (short parse errors).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", SegmentationModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", GPCPSArgumentParser)
        self._command_line: list[str] | None = None
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

    def add_subcommand_arguments(self, parser: LightningArgumentParser, subcommand: str) -> None:
        """Add ``--prediction_writer.*`` to ``predict`` only."""
        if subcommand == "predict":
            parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
            # Masks are written by the callback; keeping every probability map in memory is not needed.
            parser.set_defaults({"return_predictions": False})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:  # noqa: D102
        # Remember the command line: whether it names a logger decides if validate/test/predict log.
        if args is None:
            self._command_line = list(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            self._command_line = [str(arg) for arg in args]
        super().parse_arguments(parser, args)

    def _logger_requested(self) -> bool:
        """Whether the command line names a logger (``--trainer.logger X``); a dict of args always does.

        Options of the config's logger (``--trainer.logger.init_args.save_dir``) alone do not: a command
        line shared with ``fit`` does not make an evaluation log.
        """
        if self._command_line is None:
            return True
        return any(re.match(r"--trainer\.logger($|=|\+)", arg) for arg in self._command_line)

    def before_instantiate_classes(self) -> None:
        """Choose the loggers: none for evaluation and prediction, W&B offline without a login.

        ``validate``, ``test`` and ``predict`` log nowhere (``trainer.logger=False``) unless the command
        line names a logger (``--trainer.logger CLASS``, ``--trainer.logger true``): a config's logger is
        meant for ``fit``, and each evaluation would otherwise open a new W&B run (or a
        ``lightning_logs/version_N`` folder).

        For W&B loggers: without W&B credentials and with ``WANDB_MODE`` unset, W&B is switched to
        offline mode with a one-line message. With ``WANDB_MODE=disabled``, W&B loggers are replaced by
        Lightning's default logger (TensorBoard if installed, else CSV, in ``trainer.default_root_dir``),
        with a message, so the metrics are still written somewhere.
        """
        config = self.config.get(str(self.subcommand), self.config)
        trainer_config = config.get("trainer")
        if trainer_config is None:
            return
        if self.subcommand in _QUIET_SUBCOMMANDS and not self._logger_requested():
            trainer_config["logger"] = False
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Instantiate the Trainer with W&B's quiet ``wandb.init`` and the atomic checkpoint I/O plugin."""
        init = self.config_init.get(str(self.subcommand), self.config_init)
        config = {**(init.get("trainer") or {}), **kwargs}
        for logger in _as_list(config.get("logger")):
            if isinstance(logger, _LightningWandbLogger):
                quiet_wandb_init(logger)
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # Atomic writes and clear errors for truncated or foreign checkpoints (docs/errors.md).
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(trainer.accelerator, CPUAccelerator):
            # PyTorch's one thread per core stalls when another process is busy (docs/performance.md)
            workers = int(getattr(self.datamodule, "num_workers", 0) or 0)
            apply_thread_policy(workers)
            if workers and not policy_overridden():
                # the workers, by their measured use (Trainer declares no type for `callbacks`)
                trainer.callbacks.append(LoaderWorkerThreads())  # type: ignore[attr-defined]
        return trainer

    def select_trainer_callbacks(self, config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
        """Drop the always-present callbacks whose feature the Trainer switches off.

        Lightning would otherwise reject the pair as a contradiction; a progress bar in the config's
        ``trainer.callbacks`` replaces ``--progress_bar.*``'s.
        """
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
        return kept

    def on_unreadable_ckpt_path(self, ckpt_path: str | None) -> None:
        """Raise the library's error for a truncated or foreign ``--ckpt_path``.

        Lightning reads the hyperparameters of ``--ckpt_path`` with a bare ``torch.load``, before the
        checkpoint I/O plugin sees the file, so it would fail with PyTorch's own error.
        """
        if ckpt_path and os.path.isfile(ckpt_path):
            read_checkpoint(ckpt_path)  # raises the error that names the file and says what to do

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


def _command_name(args: Sequence[str]) -> str:
    """``gpcps <command>`` for the messages: the first argument that names a command."""
    names = (*EXTRA_COMMANDS, *LightningCLI.subcommands())
    return next((f"gpcps {arg}" for arg in args if arg in names), "gpcps")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpcps`` console script and of ``python -m gpcps_lightning``.

    The library's own errors (see :func:`reported_error`) are printed as ``gpcps <command>: error:
    <message>`` and give exit status 2; ``--traceback`` anywhere in the arguments (or
    ``GPCPS_TRACEBACK=1``) lets them through with their traceback. Other exceptions are not caught.

    Args:
        argv: Command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after a reported error (argument errors exit through ``SystemExit``
        with status 2, as argparse does).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--traceback" in args:
        args = [arg for arg in args if arg != "--traceback"]
        os.environ[TRACEBACK_ENV] = "1"  # also for the parsers and the commands run below
        if argv is None:
            sys.argv[1:] = args  # LightningCLI reads sys.argv itself when given no args
    command = _command_name(args)
    try:
        if args and args[0] in EXTRA_COMMANDS:
            return _run_extra_command(args[0], args[1:])
        # Passing None lets LightningCLI read sys.argv itself (it warns when both are given).
        GPCPSCLI(args=None if argv is None else args)
    except Exception as err:
        reported = reported_error(err)
        if reported is None or traceback_requested():
            raise
        hint = f"(`gpcps --traceback ...` or {TRACEBACK_ENV}=1 shows the traceback.)"
        print(f"{command}: error: {reported}\n{hint}", file=sys.stderr)
        return 2
    return 0
