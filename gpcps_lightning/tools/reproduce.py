"""Reproduce the paper's Tables 1 and 2 under one protocol: ``gpcps reproduce run|table|doc|methods``.

``run`` trains every (method, labeled fraction, seed) combination, selects the checkpoint on the
validation split, evaluates it once on the test split, and writes one JSON record per run: the run's
full resolved configuration and the settings compared between runs
(:mod:`gpcps_lightning.tools.provenance`), the commit of the loaded code, the library versions, the machine
and the scores. A method is a method config: a shipped one by name (``--methods gpcps``) or a YAML file
with a LightningCLI ``model:`` block (``--method-config my.yaml``). A finished run (its record exists)
is reused, and an interrupted one resumed from its ``last.ckpt``, only when its settings are the
command's; otherwise ``run`` stops before training anything and names the settings that differ. Several
``run`` commands with the same grid share its runs: each trains the runs no other one is training (a lock
file in each run folder) and leaves those to their owner.
``table`` prints the records as tables beside the paper's (:mod:`gpcps_lightning.tools.report`) and a plot;
``doc`` keeps a markdown file's generated tables equal to that output; ``methods`` lists the shipped
method configs.

Also available as ``python -m gpcps_lightning.tools.reproduce``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpcps_lightning._utils import atomic_path, import_object, sha256_file
from gpcps_lightning.settings import (
    resolved_init_args,
    run_settings,
    settings_differences,
    settings_id,
    split_files,
)
from gpcps_lightning.tools.provenance import (
    METHOD_ALIASES,
    MethodConfig,
    code_version,
    library_versions,
    load_method_config,
    shipped_method_dir,
    shipped_method_names,
    strip_local_paths,
)
from gpcps_lightning.tools.report import (
    FRACTION_NAMES,
    load_records,
    make_plot,
    make_tables,
    planned_comparisons,
    run_flags,
    sync_doc,
)

if TYPE_CHECKING:
    from gpcps_lightning.training import TrainingSpec

__all__ = [
    "DEFAULT_METHODS",
    "RECORD_SCHEMA",
    "load_records",
    "main",
    "make_tables",
    "record_path",
    "run_folder",
    "run_one",
]

#: Methods ``run`` trains when neither ``--methods`` nor ``--method-config`` is given.
DEFAULT_METHODS = ("supervised", "gpcps")
#: Version of the record layout (2: settings, full configuration, code and versions).
RECORD_SCHEMA = 2


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    return f"CPU only: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _fraction_key(fraction: float) -> str:
    return FRACTION_NAMES.get(fraction, f"{fraction:g}").replace("/", "of")


def record_path(out: Path, method: str, fraction: float, seed: int) -> Path:
    """Where the JSON record of one run lives."""
    return out / "records" / f"{method}_{_fraction_key(fraction)}_seed{seed}.json"


def run_folder(out: Path, method: str, fraction: float, seed: int) -> Path:
    """Where one run trains: its checkpoints (``checkpoints/best.ckpt`` is the selected one) and logs."""
    return out / "runs" / method / _fraction_key(fraction) / f"seed{seed}"


# ----------------------------------------------------------------------------- building a run
def _make_datamodule(args: argparse.Namespace, fraction: float, seed: int) -> Any:
    common: dict[str, Any] = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        labeled_fraction=fraction,
        num_workers=args.num_workers,
        cache=True,
        seed=seed,
        eval_at_original_size=not args.eval_at_training_size,
        augment=not getattr(args, "no_augment", False),
    )
    if args.steps_per_epoch is not None:
        common["steps_per_epoch"] = args.steps_per_epoch
    if args.data == "kvasir":
        from gpcps_lightning.data import KvasirSEGDataModule

        return KvasirSEGDataModule(root=args.data_root, download=args.download, **common)
    from gpcps_lightning.data import SyntheticPolypDataModule

    return SyntheticPolypDataModule(root=args.data_root, num_images=args.synthetic_images, **common)


def _module_class(config: MethodConfig) -> type:
    from gpcps_lightning.methods.base import SegmentationModule

    path = config.class_path if "." in config.class_path else f"gpcps_lightning.{config.class_path}"
    try:
        cls = import_object(path)
    except ImportError as err:
        raise ValueError(
            f"Method config {config.file}: class_path {config.class_path!r} cannot be imported ({err}); give "
            "the full class path, e.g. gpcps_lightning.GPCPSModule."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, SegmentationModule)):
        raise ValueError(
            f"Method config {config.file}: {config.class_path!r} is not a SegmentationModule subclass, which "
            "the runner needs (its heads, metrics and selection head)."
        )
    return cls


def _module_kwargs(config: MethodConfig, args: argparse.Namespace, seed: int) -> tuple[type, dict[str, Any]]:
    """The module class of a method config and its arguments for one run (command line and seed applied)."""
    import inspect

    cls = _module_class(config)
    kwargs: dict[str, Any] = dict(config.init_args)
    # The command line overrides the method config only where it is given.
    for option, name in (("arch", "arch"), ("encoder", "encoder_name"), ("lr", "lr")):
        if getattr(args, option, None) is not None:
            kwargs[name] = getattr(args, option)
    if getattr(args, "network_kwargs", None) is not None:
        kwargs["network_kwargs"] = dict(args.network_kwargs)
    share_every = getattr(args, "penalty_share_every", None)
    if share_every is not None and "penalty_share_every_n_steps" in inspect.signature(cls).parameters:
        kwargs["penalty_share_every_n_steps"] = share_every
    weights = getattr(args, "encoder_weights", None)
    if weights is not None:
        kwargs["encoder_weights"] = None if weights.lower() == "none" else weights
    # Different runs differ in their seeds only: network initialisation included.
    parameters = set(inspect.signature(cls).parameters)
    if "seeds" in parameters:
        kwargs["seeds"] = (2 * seed + 1, 2 * seed + 2)
    elif "network_seed" in parameters:
        kwargs["network_seed"] = 2 * seed + 1
    return cls, kwargs


def _make_module(config: MethodConfig, args: argparse.Namespace, seed: int) -> Any:
    return _instantiate(config, *_module_kwargs(config, args, seed))


def _instantiate(config: MethodConfig, cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"Method config {config.file}: {cls.__name__} does not take these arguments ({err}); fix "
            "`model.init_args`."
        ) from err


@dataclass
class _Run:
    """One (method, fraction, seed) of a command, built: what it would train and where it goes."""

    config: MethodConfig
    fraction: float
    seed: int
    module: Any
    module_kwargs: dict[str, Any]
    datamodule: Any
    settings: dict[str, Any]
    target: Path
    run_dir: Path
    #: The ST++ options of a method config with an ``stpp:`` block; ``None`` for a single training.
    stpp_options: Any = None

    @property
    def interrupted(self) -> bool:
        """Whether the run folder holds a started, unfinished run (to resume)."""
        if self.stpp_options is not None:  # the pipeline's stages resume themselves
            return (self.run_dir / "settings.json").is_file()
        return (self.run_dir / "checkpoints" / "last.ckpt").exists()


def _build(args: argparse.Namespace, method: str | MethodConfig, fraction: float, seed: int) -> _Run:
    import lightning as L

    config = method if isinstance(method, MethodConfig) else load_method_config(method)
    L.seed_everything(seed, workers=True, verbose=False)
    cls, kwargs = _module_kwargs(config, args, seed)
    module = _instantiate(config, cls, kwargs)
    datamodule = _make_datamodule(args, fraction, seed)
    settings = run_settings(
        module, datamodule, max_steps=args.max_steps, val_every=args.val_every, precision=args.precision
    )
    options = None if config.stpp is None else _stpp_options(config)
    if options is not None:
        settings.update(options.settings())
    schedule = getattr(args, "lr_schedule", "constant")
    if schedule != "constant":  # absent when constant: the runs recorded before the option keep their ids
        if options is not None:
            raise ValueError(
                f"Method config {config.file}: --lr-schedule {schedule} is not available for ST++'s pipeline "
                "(its stages build their own trainers); run it with --lr-schedule constant."
            )
        settings["trainer.lr_schedule"] = schedule
    out = Path(args.out)
    return _Run(
        config,
        fraction,
        seed,
        module,
        kwargs,
        datamodule,
        settings,
        record_path(out, config.name, fraction, seed),
        run_folder(out, config.name, fraction, seed),
        options,
    )


def _reusable_record(run: _Run) -> dict[str, Any] | None:
    """The finished record if it may stand for this command; ``None`` if the run is to train (or resume).

    Raises:
        ValueError: If the record, or the interrupted run in the run folder, has other settings (or none).
    """
    if run.target.exists():
        try:
            record = json.loads(run.target.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Run record {run.target} is not valid JSON ({err}); delete it to rerun that run."
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError(
                f"Run record {run.target} holds no settings (an older runner wrote it), so it cannot be "
                "checked against this command: delete it to rerun that run, or pass another --out."
            )
        differences = settings_differences(record["settings"], run.settings)
        if differences:
            raise ValueError(
                f"Run record {run.target} was made with other settings than this command: "
                f"{'; '.join(differences)}. It cannot stand for this command: pass another --out for these "
                "settings, or delete the record to rerun that run with them."
            )
        return record
    if run.interrupted:
        stored = run.run_dir / "settings.json"
        try:
            recorded = json.loads(stored.read_text())["settings"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"Run folder {run.run_dir} holds an interrupted run without readable "
                "settings (settings.json; an older runner wrote it), so resuming it cannot be checked "
                "against this command: delete the folder to start that run afresh, or pass another --out."
            ) from None
        differences = settings_differences(recorded, run.settings)
        if differences:
            raise ValueError(
                f"Run folder {run.run_dir} holds an interrupted run with other settings than this command: "
                f"{'; '.join(differences)}. Resuming it would mix two settings in one run: pass another "
                "--out for these settings, or delete the folder to start that run afresh."
            )
    return None


@contextlib.contextmanager
def _claimed(run_dir: Path) -> Iterator[bool]:
    """Hold the run folder's lock while this process trains the run; ``False`` if another one holds it.

    An exclusive, non-blocking ``flock`` on ``<run folder>/.lock``, so that two or more ``gpcps reproduce
    run`` commands with the same grid share its runs out. The operating system releases the lock of a
    process that dies, so its run resumes in the next command that reaches it. Without ``fcntl``
    (Windows) every command trains every run it reaches: run one at a time there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms CI runs
        yield True
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for r in results:
        merged.update({k: float(v) for k, v in r.items()})
    return merged


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def run_one(
    args: argparse.Namespace, method: str | MethodConfig, fraction: float, seed: int
) -> dict[str, Any]:
    """Train, select on val, test once, and write the record of one run (or return the finished one).

    Args:
        args: The parsed options of ``gpcps reproduce run``.
        method: A shipped method's name or a :class:`~gpcps_lightning.tools.provenance.MethodConfig`.
        fraction: Labeled fraction.
        seed: Seed of the run (data order, draws, network initialisation).

    Returns:
        The run's record.

    Raises:
        ValueError: On an unknown method, a bad method config, or a finished record / interrupted run
            whose settings differ from this command's (the message names the settings).
    """
    config = method if isinstance(method, MethodConfig) else load_method_config(method)
    run = _build(args, config, fraction, seed)
    finished = _reusable_record(run)
    validation_only = bool(getattr(args, "validation_only", False))
    if finished is not None and (finished.get("test") is None) != validation_only:
        raise ValueError(
            f"Run record {run.target} is {'a tested' if validation_only else 'a validation-only'} run, and "
            f"this command {'is validation-only' if validation_only else 'tests'}: a pilot's records and a "
            "study's never share a folder. Pass another --out."
        )
    if validation_only and _external_folders(args):
        raise ValueError(
            "--external scores the selected checkpoint on other data; a --validation-only run "
            "reads no data but its validation split: drop one of the two options."
        )
    if finished is not None:
        missing = [d for d in _external_folders(args) if Path(d).name not in finished.get("external", {})]
        if missing:
            _add_external_from_checkpoint(finished, run, missing)
            with atomic_path(run.target) as tmp:
                tmp.write_text(json.dumps(finished, indent=2, sort_keys=True) + "\n")
        return finished
    module, datamodule = run.module, run.datamodule
    resumed = run.interrupted
    # The code that trains: read before training, as the checkout may move on meanwhile.
    code, versions = code_version(), library_versions()
    started: dict[str, Any] = {"settings": run.settings, "code": code, "versions": versions}
    if resumed:
        started = json.loads((run.run_dir / "settings.json").read_text())
    else:
        with atomic_path(run.run_dir / "settings.json") as tmp:
            tmp.write_text(json.dumps(started, indent=2, sort_keys=True))
    monitor = f"val/dice_{module.selection_head}"
    if run.stpp_options is None:
        trainer, best, train_seconds, whole_time = _train(args, run, monitor, resumed)
        pipeline: dict[str, Any] | None = None
        # read before the evaluations below, which log to the same files
        curve = validation_curve(run.run_dir / "logs")
    else:
        curve = None
        trainer, best, train_seconds, pipeline = _train_stpp(args, run)
        whole_time = not resumed  # of the stage that was interrupted, the part after it only
    # ST++'s final weights are already in `module` (its checkpoint holds its own trainings' callbacks)
    selected = best if pipeline is None else None
    val = _metrics(trainer.validate(module, datamodule, ckpt_path=selected, verbose=False))
    test: dict[str, float] | None = None
    test_images: dict[str, Any] | None = None
    external: dict[str, Any] = {}
    if not getattr(args, "validation_only", False):
        test = _metrics(trainer.test(module, datamodule, ckpt_path=selected, verbose=False))
        # trainer.test loaded the selected checkpoint into `module`: score it image by image.
        test_images = _per_image(module, datamodule.test_dataset.pairs, datamodule)
        external = {Path(d).name: _external_entry(module, d, datamodule) for d in _external_folders(args)}
    split = datamodule.split
    height, width = datamodule.image_size
    record: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "method": config.name,
        "label": config.label,
        "fraction": fraction,
        "seed": seed,
        "settings_id": settings_id(run.settings),
        "settings": run.settings,
        "method_config": config.describe(),
        "config": strip_local_paths(
            {
                "model": {"class_path": _class_path(module), "init_args": resolved_init_args(module)},
                "data": {"class_path": _class_path(datamodule), "init_args": resolved_init_args(datamodule)},
                "trainer": _spec(args).record(),
                "checkpoint": {
                    "monitor": monitor,
                    "mode": "max",
                    "selected_on": "val",
                    "reported_on": "test",
                },
            }
        ),
        "resolved": {
            "steps_per_epoch": datamodule.train_steps_per_epoch,
            "images": {
                "labeled": len(split.labeled),
                "unlabeled": len(split.unlabeled),
                "val": len(split.val),
                "test": len(split.test),
            },
            "evaluation_size": (
                "original" if datamodule.eval_at_original_size else f"training size {height}x{width}"
            ),
            "precision": str(trainer.precision),
            "accelerator": type(trainer.accelerator).__name__,
        },
        "split_files": {
            role: {"file": path.name, "sha256": sha256_file(path)}
            for role, path in split_files(datamodule).items()
        },
        "code": code,
        "versions": versions,
        "machine": _machine(),
        "wall_time_s": round(train_seconds, 1),
        "resumed": resumed,
        # false where a resumed run's wall time covers the part after the interruption only (a checkpoint
        # written without the clock's state; ST++: of the stage that was interrupted)
        "wall_time_complete": whole_time,
        "best_step": _read_step(best),
        "selection_head": module.selection_head,
        "val": {k.removeprefix("val/"): v for k, v in val.items()},
        # null for a validation-only run (--validation-only: a pilot never reads the test split)
        "test": None if test is None else {k.removeprefix("test/"): v for k, v in test.items()},
        # Per-image test scores of every head ([name, dice, iou]; null where prediction and mask are both
        # empty), for intervals over images.
        "test_images": test_images,
    }
    if curve is not None:
        record["val_curve"] = curve
    resolve_schedule = getattr(module, "resolved_schedule", None)
    if callable(resolve_schedule):  # the schedule in steps of this run (methods with a schedule)
        record["resolved"]["schedule"] = resolve_schedule()
    if external:
        record["external"] = external
    if pipeline is not None:
        record["stpp"] = pipeline
    history = getattr(module, "penalty_share_history", None)
    if history:
        complete = getattr(module, "penalty_share_history_complete", not resumed)
        record["diagnostics"] = {"penalty_share": _share_summary(history, complete)}
    if resumed:
        record["code_at_start"] = started.get("code")
        record["versions_at_start"] = started.get("versions")
    with atomic_path(run.target) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def validation_curve(logs: Path) -> dict[str, list[Any]]:
    """Every validation of a training from its CSV logs: ``{"step": [...], "dice_<head>": [...], ...}``.

    Steps count finished optimizer steps (as ``best_step`` does). A resumed run logs into a new
    ``version_N`` folder; a later version's value replaces an earlier one's at the same step.
    """
    by_step: dict[int, dict[str, float]] = {}
    versions = sorted(logs.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    for path in versions:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                values = {
                    key.removeprefix("val/"): float(value)
                    for key, value in row.items()
                    if key.startswith("val/dice_") and value not in ("", None)
                }
                if values:
                    by_step.setdefault(int(row["step"]) + 1, {}).update(values)
    steps = sorted(by_step)
    heads = sorted({head for values in by_step.values() for head in values})
    return {"step": steps, **{head: [by_step[s].get(head) for s in steps] for head in heads}}


def _spec(args: argparse.Namespace) -> TrainingSpec:
    """The command's training settings (every run of one command shares them)."""
    from gpcps_lightning.training import TrainingSpec

    return TrainingSpec(
        max_steps=args.max_steps,
        val_every=args.val_every,
        precision=args.precision,
        accelerator=args.accelerator,
        lr_schedule=getattr(args, "lr_schedule", "constant"),
        progress_bar=args.progress_bar,
    )


def _train(args: argparse.Namespace, run: _Run, monitor: str, resumed: bool) -> tuple[Any, str, float, bool]:
    """Fit one run's module (resuming from ``last.ckpt``).

    Returns the trainer, the selected checkpoint, the training's wall time in seconds, and whether that
    time covers the whole training (a run resumed from a checkpoint written before checkpoints kept the
    clock counts the part after the interruption only).

    A run interrupted under an earlier runner, which kept a plain ``ModelCheckpoint`` for ``best.ckpt``
    and another for ``last.ckpt``, resumes with its best score so far: ``BestCheckpoint`` takes over the
    former's state (Lightning warns once that the latter's state has no callback).
    """
    from gpcps_lightning.callbacks import TrainingClock
    from gpcps_lightning.training import build_trainer, selected_checkpoint

    last = run.run_dir / "checkpoints" / "last.ckpt"
    clock = TrainingClock()
    trainer, checkpoint = build_trainer(_spec(args), run.run_dir, monitor=monitor, callbacks=[clock])
    trainer.fit(run.module, run.datamodule, ckpt_path=str(last) if resumed else None)
    best = selected_checkpoint(checkpoint, run.run_dir)
    # resumed from a checkpoint without the clock's state (an older runner): this part's time only
    return trainer, str(best or last), clock.seconds, clock.restored_seconds is not None or not resumed


def _stpp_options(config: MethodConfig) -> Any:
    """The ST++ options of a method config with an ``stpp:`` block (checked).

    Raises:
        ValueError: If its model is not a SupervisedModule or an option is invalid (the file is named).
    """
    from gpcps_lightning.methods.supervised import SupervisedModule
    from gpcps_lightning.pipelines.stpp import STPPOptions

    if not issubclass(_module_class(config), SupervisedModule):
        raise ValueError(
            f"Method config {config.file} has an `stpp:` block, so ST++ trains its model, which must be "
            f"gpcps_lightning.SupervisedModule (ST++ self-trains one network); got {config.class_path!r}."
        )
    try:
        return STPPOptions.from_mapping(config.stpp)
    except ValueError as err:
        raise ValueError(f"Method config {config.file}, `stpp:` block: {err}") from err


#: The ST++ pipeline's folder inside a run folder.
_STPP_DIR = "stpp"


def _train_stpp(args: argparse.Namespace, run: _Run) -> tuple[Any, str, float, dict[str, Any]]:
    """Run ST++'s stages in ``<run>/stpp``, reusing finished ones.

    Returns an evaluation trainer, the final checkpoint, the stages' summed seconds and the record's
    ``stpp`` entry.
    """
    from gpcps_lightning.checkpointing import read_checkpoint
    from gpcps_lightning.tools.stpp import stpp_run
    from gpcps_lightning.training import evaluation_trainer

    result = stpp_run(
        run.datamodule,
        module_args=run.module_kwargs,
        max_steps=args.max_steps,
        val_every=args.val_every,
        out_dir=run.run_dir / _STPP_DIR,
        precision=args.precision,
        accelerator=args.accelerator,
        seed=run.seed,
        options=run.stpp_options,
        progress_bar=args.progress_bar,
    )
    run.module.load_state_dict(read_checkpoint(result.checkpoint)["state_dict"])
    trainer = evaluation_trainer(_spec(args), run.run_dir)
    seconds = result.stage_seconds
    reliability = json.loads(result.reliability.read_text())
    entry = {
        "checkpoint": result.checkpoint.relative_to(run.run_dir).as_posix(),
        "stage_seconds": {name: round(value, 1) for name, value in seconds.items()},
        "reused_stages": result.skipped,
        "reliable_images": len(reliability["reliable"]),
        "unreliable_images": len(reliability["unreliable"]),
    }
    return trainer, str(result.checkpoint), sum(seconds.values()), entry


def _share_summary(history: Sequence[tuple[int, float, float]], complete: bool) -> dict[str, Any]:
    """Median, mean, min and max of the penalty's measured loss and gradient-norm shares."""

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
        }

    return {
        "steps": [step for step, _, _ in history],
        "loss": stats([loss for _, loss, _ in history]),
        "grad_norm": stats([grad for _, _, grad in history]),
        # false where a run resumed from a checkpoint without the history measured the steps after it only
        "complete": complete,
    }


def _external_folders(args: argparse.Namespace) -> list[str]:
    folders = list(getattr(args, "external", None) or [])
    names = [Path(d).name for d in folders]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"--external folders are recorded by their folder name, and {duplicates} occur twice; rename one."
        )
    return folders


def _per_image(module: Any, pairs: Sequence[Any], datamodule: Any) -> dict[str, list[list[Any]]]:
    from gpcps_lightning.inference.evaluate import evaluate_module
    from gpcps_lightning.inference.predict import Preprocessing

    scores = evaluate_module(
        module, pairs, Preprocessing.from_datamodule(datamodule), heads="all", device=module.device
    )
    return {head: [[s.name, s.dice, s.iou] for s in values] for head, values in scores.items()}


def _summary(images: dict[str, list[list[Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for head, rows in images.items():
        dice = [r[1] for r in rows if r[1] is not None]
        iou = [r[2] for r in rows if r[2] is not None]
        out[f"dice_{head}"] = sum(dice) / len(dice) if dice else None
        out[f"iou_{head}"] = sum(iou) / len(iou) if iou else None
    return out


def _external_entry(module: Any, folder: str, datamodule: Any) -> dict[str, Any]:
    """Scores of the selected checkpoint (already in ``module``) on one external image/mask folder."""
    from gpcps_lightning.inference.evaluate import read_evaluation_folder

    images = _per_image(module, read_evaluation_folder(folder), datamodule)
    return {"folder": Path(folder).name, **_summary(images), "images": images}


def _add_external_from_checkpoint(record: dict[str, Any], run: _Run, folders: Sequence[str]) -> None:
    """Score a finished run's selected checkpoint on folders its record does not hold yet."""
    from gpcps_lightning.checkpointing import read_checkpoint

    best = run.run_dir / "checkpoints" / "best.ckpt"
    if "stpp" in record:
        best = run.run_dir / record["stpp"]["checkpoint"]
    if not best.exists():
        raise ValueError(
            f"Run record {run.target} holds no scores for --external {', '.join(map(str, folders))}, and the "
            f"run's selected checkpoint {best} is gone: delete the record to rerun that run, or leave those "
            "folders out."
        )
    module = run.module
    module.load_state_dict(read_checkpoint(best)["state_dict"])
    run.datamodule.setup("test")
    external = record.setdefault("external", {})
    for folder in folders:
        external[Path(folder).name] = _external_entry(module, folder, run.datamodule)


def _read_step(path: str) -> int:
    from gpcps_lightning.checkpointing import read_checkpoint

    try:
        return int(read_checkpoint(path).get("global_step", -1))
    except (FileNotFoundError, ValueError):
        return -1


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpcps reproduce", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train, select on val, test once, write JSON records",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = run.add_argument
    add(
        "--methods",
        nargs="+",
        default=None,
        choices=shipped_method_names() + sorted(METHOD_ALIASES),
        metavar="NAME",
        help="shipped method configs to train (`gpcps reproduce methods` lists them); default: "
        f"{' '.join(DEFAULT_METHODS)} unless --method-config is given",
    )
    add(
        "--method-config",
        nargs="+",
        default=None,
        metavar="YAML",
        help="method config files (a LightningCLI `model:` block), each a method named by its file stem",
    )
    add(
        "--fractions",
        nargs="+",
        type=float,
        default=[0.125],
        help="labeled fractions of the 800 train images",
    )
    add(
        "--seeds", nargs="+", type=int, default=[0], help="one run per seed (data order, draws, network init)"
    )
    add("--max-steps", type=int, default=5000, help="training steps per run (paper: 5000)")
    add("--val-every", type=int, default=50, help="validate every N training steps (paper epoch: 50)")
    add("--steps-per-epoch", type=int, default=None, help="epoch length; None: ceil(800 / batch size)")
    add("--image-size", type=int, default=256, help="training size in pixels (paper: 256)")
    add("--batch-size", type=int, default=16, help="labeled and unlabeled images per step, each (paper: 16)")
    add("--arch", default=None, help="smp architecture; None: the method config's, else Unet")
    add("--encoder", default=None, help="smp encoder; None: the method config's, else resnet34")
    add(
        "--encoder-weights",
        default=None,
        help="encoder weights (imagenet), or none for random init; None: the method config's, else random",
    )
    add("--lr", type=float, default=None, help="Adam learning rate; None: the method config's, else 1e-4")
    add("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    add("--num-workers", type=int, default=None, help="data loader workers; None: the datamodule's default")
    add("--data", choices=["kvasir", "synthetic"], default="kvasir", help="Kvasir-SEG or generated polyps")
    add("--data-root", default="data/kvasir-seg", help="dataset folder")
    add("--download", action="store_true", help="download Kvasir-SEG into --data-root if missing")
    add("--synthetic-images", type=int, default=400, help="size of the generated dataset (--data synthetic)")
    add("--no-augment", action="store_true", help="train without augmentation (the authors' code has none)")
    add(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="learning rate over the run: constant, or a cosine decay to zero (callbacks.LRSchedule)",
    )
    add(
        "--validation-only",
        action="store_true",
        help="never read the test split (a pilot): the record holds validation scores only",
    )
    add("--eval-at-training-size", action="store_true", help="score at the training size, not the original")
    add("--out", default="runs/reproduce", help="folder for records/ and runs/")
    add("--progress-bar", action="store_true", help="show Lightning's progress bar")
    add(
        "--network-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="further smp.create_model arguments as JSON, e.g. "
        '\'{"encoder_depth": 3, "decoder_channels": [32, 16, 8]}\'; None: the method config\'s',
    )
    add(
        "--penalty-share-every",
        type=int,
        default=None,
        metavar="N",
        help="GP-CPS: measure the penalty's share of the loss and of the parameter-gradient norm every N "
        "penalty steps (two extra backward passes there; training unchanged); summarised in the record",
    )
    add(
        "--external",
        nargs="+",
        default=None,
        metavar="DIR",
        help="image/mask folders (images/ + masks/) on which each run's selected checkpoint is also scored, "
        "once, after selection on val (recorded under `external`, by folder name)",
    )
    table = sub.add_parser(
        "table", help="markdown tables (beside the paper's) and a plot from the JSON records"
    )
    table.add_argument("records", help="the --out folder of `run` (or a folder of records)")
    table.add_argument("--markdown", default=None, help="write the tables here (default: print)")
    table.add_argument("--plot", default=None, help="write the Dice-vs-fraction plot here (PNG)")
    doc = sub.add_parser(
        "doc",
        help="regenerate the generated table blocks of a markdown file (e.g. docs/results.md) from records",
    )
    doc.add_argument("path", help="the markdown file; its blocks name their records folder")
    doc.add_argument("--check", action="store_true", help="only compare; exit 1 if a block differs")
    doc.add_argument(
        "--base", default=None, help="folder the blocks' record folders are relative to (default: .)"
    )
    sub.add_parser("methods", help="list the shipped method configs")
    return parser


def _method_configs(args: argparse.Namespace) -> list[MethodConfig]:
    names = args.methods if args.methods is not None else ([] if args.method_config else DEFAULT_METHODS)
    configs = [load_method_config(n) for n in names]
    configs += [load_method_config(Path(p)) for p in args.method_config or []]
    for config in configs:
        if config.stpp is not None:
            _stpp_options(config)  # before any training
    unique: dict[str, MethodConfig] = {}
    for config in configs:
        known = unique.setdefault(config.name, config)
        if known.sha256 != config.sha256:
            raise SystemExit(
                f"gpcps reproduce: two different method configs are named {config.name!r} (a method is named "
                "by its file); rename one of the files."
            )
    return list(unique.values())


def _list_methods() -> int:
    folder = shipped_method_dir()
    aliases = {target: alias for alias, target in METHOD_ALIASES.items()}
    print(f"Shipped method configs ({folder}):")
    for name in shipped_method_names():
        config = load_method_config(name)
        alias = f" (also: {aliases[name]})" if name in aliases else ""
        arguments = f" {config.init_args}" if config.init_args else ""
        if config.stpp is not None:
            arguments += f", trained by the ST++ pipeline with {config.stpp}"
        print(f"  {name:<15} {config.label}: {config.class_path}{arguments}{alias}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpcps reproduce``."""
    args = _parser().parse_args(argv)
    if args.command == "methods":
        return _list_methods()
    if args.command == "table":
        records = load_records(args.records)  # read once, for the tables and the plot
        text = make_tables(records, planned=planned_comparisons(args.records))
        if args.markdown:
            Path(args.markdown).write_text(text)
        else:
            sys.stdout.write(text)
        if args.plot:
            make_plot(records, args.plot)
        return 0
    if args.command == "doc":
        stale = sync_doc(args.path, check=args.check, base=args.base)
        for folder in stale:
            if args.check:
                print(
                    f"gpcps reproduce doc: {args.path}: the block of {folder} differs from its records; "
                    f"`gpcps reproduce doc {args.path}` regenerates it",
                    flush=True,
                )
            else:
                print(f"gpcps reproduce doc: {args.path}: regenerated the block of {folder}", flush=True)
        return 1 if args.check and stale else 0
    for value, name in (
        (args.max_steps, "--max-steps"),
        (args.val_every, "--val-every"),
        (args.batch_size, "--batch-size"),
    ):
        if value < 1:
            raise SystemExit(f"gpcps reproduce: {name} must be a positive integer, got {value}.")
    for fraction in args.fractions:
        if not 0 < fraction < 1 or not math.isfinite(fraction):
            raise SystemExit(f"gpcps reproduce: --fractions must lie in (0, 1), got {fraction}.")
    configs = _method_configs(args)
    if args.accelerator == "cpu" or (args.accelerator == "auto" and not _cuda_available()):
        from gpcps_lightning.threads import apply_thread_policy

        apply_thread_policy(args.num_workers or 0)
    out = Path(args.out)
    grid = [(c, f, s) for f in args.fractions for s in args.seeds for c in configs]
    # Check every finished or interrupted run first: a mismatch stops the command before hours of training.
    for config, fraction, seed in grid:
        done = record_path(out, config.name, fraction, seed).exists()
        run_dir = run_folder(out, config.name, fraction, seed)
        if done or (run_dir / "checkpoints" / "last.ckpt").exists() or (run_dir / "settings.json").exists():
            _reusable_record(_build(args, config, fraction, seed))
    elsewhere: list[str] = []
    for config, fraction, seed in grid:
        run_name = f"{config.name} fraction={fraction} seed={seed}"
        target = record_path(out, config.name, fraction, seed)
        run_dir = run_folder(out, config.name, fraction, seed)
        with contextlib.nullcontext(True) if target.exists() else _claimed(run_dir) as ours:
            if not ours:
                print(f"[reproduce] {run_name}: another process is training it (folder locked)", flush=True)
                elsewhere.append(run_name)
                continue
            state = "done, settings match, skipped" if target.exists() else "running"
            print(f"[reproduce] {run_name}: {state}", flush=True)
            record = run_one(args, config, fraction, seed)
        head = record["selection_head"]
        scores = record["test"] if record["test"] is not None else record["val"]
        split_name = "test" if record["test"] is not None else "val"
        print(
            f"[reproduce] {config.name} fraction={fraction} seed={seed} settings={record['settings_id']}: "
            f"{split_name} dice_{head}={100 * scores[f'dice_{head}']:.2f} ({record['wall_time_s']} s)",
            flush=True,
        )
        for flag in run_flags(record):
            print(f"[reproduce] warning: {config.name} fraction={fraction} seed={seed}: {flag}", flush=True)
    if elsewhere:
        print(
            f"[reproduce] {len(elsewhere)} run(s) were being trained by other processes and have no record "
            f"from this one: {'; '.join(elsewhere)}. Their records appear when those processes finish; "
            "rerun this command then to check them (finished runs are skipped, an interrupted one resumes).",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
