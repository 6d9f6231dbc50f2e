"""The settings of a run: what must be equal for two runs to be the same experiment.

``gpcps reproduce run`` refuses to reuse a record or resume a run whose settings differ from the
command's, ST++ refuses to reuse a stage made with other settings, and ``gpcps reproduce table`` never
averages runs of different settings. This module decides what "the settings" are:

- **settings** (compared, hashed): every resolved init argument of the module and of the datamodule
  (defaults included), the training augmentation, the sha256 of each split file used, and the trainer
  settings the runner sets (``max_steps``, validation interval, precision), and the module's selection head;
- **not compared** (:data:`NOT_COMPARED`): options that do not change a result (data location, workers,
  caching, file checks, the accelerator); they are in the record's ``config`` all the same;
- **per run** (:data:`SEED_KEYS`, :data:`FRACTION_KEYS`): compared for reuse, but left out of the
  settings id that groups seeds (and fractions) into one table row.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpcps_lightning._utils import public_class_path, sha256_file

__all__ = [
    "FRACTION_KEYS",
    "NOT_COMPARED",
    "PRECISION_ALIASES",
    "SEED_KEYS",
    "class_path",
    "jsonable",
    "resolved_init_args",
    "run_settings",
    "settings_differences",
    "settings_id",
    "split_files",
]

#: Settings that do not change a run's result, with the reason: recorded in ``config``, never compared.
NOT_COMPARED: dict[str, str] = {
    "data.root": "where the data lies; what it is, is checked by the split files' hashes (and the "
    "Kvasir-SEG checksum manifest)",
    "data.download": "whether missing data may be downloaded",
    "data.verify": "whether the files are checked against the manifest",
    "data.url": "where the archive is downloaded from",
    "data.check_files": "how thoroughly files are checked at setup",
    "data.num_workers": "data loader processes: the batches are the same",
    "data.cache": "keeping decoded images in memory: the same pixels",
    "data.predict_dir": "prediction only",
    "trainer.accelerator": "the hardware (recorded as `machine`); numerics differ by rounding only",
    "model.penalty_share_every_n_steps": "a logged diagnostic (extra backward passes that change nothing)",
}

#: Compared for reuse, but left out of the settings id: they differ between the seeds of one row.
SEED_KEYS: tuple[str, ...] = ("data.seed", "model.seeds", "model.network_seed")

#: Compared for reuse, but left out of a table row's settings id: a row spans the labeled fractions.
FRACTION_KEYS: tuple[str, ...] = ("data.labeled_fraction", "split.labeled")

#: Precisions that name the same setting, mapped to one spelling.
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def jsonable(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, unknown objects their ``repr``)."""
    return json.loads(json.dumps(value, default=repr))


def resolved_init_args(obj: Any) -> dict[str, Any]:
    """Every ``__init__`` argument of a module or datamodule, its defaults included.

    Lightning's ``hparams`` hold the arguments that were passed (and, through ``**kwargs``, not always the
    defaults of a base class), so the defaults of every class of ``obj`` up to Lightning's base class
    come first and ``hparams`` overrides them.

    Args:
        obj: A ``LightningModule`` or ``LightningDataModule`` that called ``save_hyperparameters``.

    Returns:
        Argument name -> value, JSON-compatible.
    """
    import lightning as L

    stop = (L.LightningModule, L.LightningDataModule)
    args: dict[str, Any] = {}
    for cls in reversed(type(obj).__mro__):
        if cls in stop or not issubclass(cls, stop) or "__init__" not in vars(cls):
            continue
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and param.default is not inspect.Parameter.empty:
                args[name] = param.default
    args.update(dict(getattr(obj, "hparams", {})))
    return jsonable(args)


def split_files(datamodule: Any) -> dict[str, Path]:
    """The split files a datamodule reads, by role (``train``, ``val``, ``test``, ``labeled``).

    Kvasir-SEG's are the shipped files of its labeled fraction; a folder datamodule's are the files given
    as ``train_split``, ... (none when it splits by fractions: then its seeds and fractions, which are
    settings, define the split).
    """
    labeled_name = getattr(datamodule, "labeled_split_name", None)
    if isinstance(labeled_name, str):
        from gpcps_lightning.data.kvasir import kvasir_seg_resource

        names = {"train": "train.txt", "val": "val.txt", "test": "test.txt", "labeled": f"{labeled_name}.txt"}
        return {role: kvasir_seg_resource(name) for role, name in names.items()}
    files = {}
    for role in ("train", "val", "test", "labeled"):
        value = getattr(datamodule, f"{role}_split", None)
        if isinstance(value, (str, os.PathLike)):
            files[role] = Path(value)
    return files


def class_path(obj: Any) -> str:
    """The public dotted path of ``obj``'s class (:func:`~gpcps_lightning._utils.public_class_path`)."""
    return public_class_path(f"{type(obj).__module__}.{type(obj).__qualname__}")


def _normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with every class path (``model.class_path``, ``data.class_path``) made public."""
    return {
        k: public_class_path(v) if k.endswith("class_path") and isinstance(v, str) else v
        for k, v in settings.items()
    }


def run_settings(
    module: Any, datamodule: Any, *, max_steps: int, val_every: int, precision: str
) -> dict[str, Any]:
    """The settings of one run that can change its result, as a flat ``{"model.lr": 1e-4, ...}`` dict.

    Args:
        module: The instantiated module.
        datamodule: The instantiated datamodule.
        max_steps: Training steps.
        val_every: Validation interval in steps (also the checkpoint-selection interval).
        precision: The Trainer's precision as requested (``"32"`` and ``"32-true"`` are the same).

    Returns:
        Settings, JSON-compatible; :data:`NOT_COMPARED` keys are left out.
    """
    settings: dict[str, Any] = {"model.class_path": class_path(module)}
    settings.update({f"model.{k}": v for k, v in resolved_init_args(module).items()})
    settings["data.class_path"] = class_path(datamodule)
    settings.update({f"data.{k}": v for k, v in resolved_init_args(datamodule).items()})
    augmentation = getattr(datamodule, "augmentation", None)
    settings["data.augmentation"] = None if augmentation is None else repr(augmentation)
    settings.update({f"split.{role}": sha256_file(p) for role, p in split_files(datamodule).items()})
    settings["trainer.max_steps"] = int(max_steps)
    settings["trainer.val_every"] = int(val_every)
    settings["trainer.precision"] = PRECISION_ALIASES.get(str(precision), str(precision))
    settings["model.selection_head"] = module.selection_head
    return {k: v for k, v in jsonable(settings).items() if k not in NOT_COMPARED}


def settings_id(settings: Mapping[str, Any], *, per_fraction: bool = False) -> str:
    """Short hash (8 hex digits) of the settings that a table row shares: seeds (and fractions) left out.

    Class paths enter by their public name (:func:`public_class_path`), so a record that names a class by
    an earlier module path gets the same id.

    Args:
        settings: A record's ``settings``.
        per_fraction: Keep :data:`FRACTION_KEYS` (the id of one table cell rather than of a row).
    """
    drop = set(SEED_KEYS) if per_fraction else set(SEED_KEYS) | set(FRACTION_KEYS)
    kept = {k: v for k, v in _normalised(settings).items() if k not in drop}
    payload = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def _show(value: Any) -> str:
    text = json.dumps(value)
    return (
        text if len(text) <= 60 else f"{text[:40]}… (sha256 {hashlib.sha256(text.encode()).hexdigest()[:8]})"
    )


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ, as ``"key: <recorded> in the record, <current> in this command"``.

    Class paths are compared by their public name (:func:`public_class_path`).
    """
    recorded, current = _normalised(recorded), _normalised(current)
    missing = object()
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, missing), current.get(key, missing)
        if old != new:
            old_text = "absent" if old is missing else _show(old)
            new_text = "absent" if new is missing else _show(new)
            out.append(f"{key}: {old_text} in the record, {new_text} in this command")
    return out
