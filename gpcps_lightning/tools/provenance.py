"""What a reproduction run was: its method config, its settings, and the code and versions that ran it.

``gpcps reproduce run`` (:mod:`gpcps_lightning.tools.reproduce`) stores all of this in each run's record,
refuses to reuse a record or resume a run whose settings differ from the command's, and
``gpcps reproduce table`` never averages runs of different settings. This module decides what
"the settings" are:

- **settings** (compared, hashed): every resolved init argument of the module and of the datamodule
  (defaults included), the training augmentation, the sha256 of each split file used, and the trainer
  settings the runner sets (``max_steps``, validation interval, precision), and the module's selection head;
- **not compared** (:data:`NOT_COMPARED`): options that do not change a result (data location, workers,
  caching, file checks, the accelerator); they are in the record's ``config`` all the same;
- **per run** (:data:`SEED_KEYS`, :data:`FRACTION_KEYS`): compared for reuse, but left out of the
  settings id that groups seeds (and fractions) into one table row.

Method configs are YAML files with a LightningCLI ``model:`` block; the shipped ones live in the package
(``gpcps_lightning/configs/methods``) so that an installed wheel has them too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from gpcps_lightning._utils import code_version, public_class_path, sha256_file

__all__ = [
    "FRACTION_KEYS",
    "METHOD_ALIASES",
    "METHOD_LABELS",
    "NOT_COMPARED",
    "SEED_KEYS",
    "TABLE2_ROWS",
    "MethodConfig",
    "code_version",
    "library_versions",
    "load_method_config",
    "public_class_path",
    "resolved_init_args",
    "run_settings",
    "settings_differences",
    "settings_id",
    "shipped_method_dir",
    "shipped_method_names",
    "split_files",
    "strip_local_paths",
]

#: Names earlier versions of the runner used for two shipped method configs.
METHOD_ALIASES: dict[str, str] = {"gpcps_grad": "gpcps_row_II", "gpcps_semi": "gpcps_row_III"}

#: How the tables name the shipped methods, in table order (a user's config is named by its file).
METHOD_LABELS: dict[str, str] = {
    "supervised": "UNet (supervised)",
    "cps": "CPS",
    "gct": "GCT (the paper's CPC)",
    "mean_teacher": "Mean Teacher",
    "psmt": "PS-MT",
    "stpp": "ST++",
    "unimatch": "UniMatch",
    "gpcps_row_I": "GP-CPS L_sup only",
    "gpcps_row_II": "GP-CPS L_sup + L_grad",
    "gpcps_row_III": "GP-CPS L_sup + L_semi",
    "gpcps": "GP-CPS",
    "gpcps_lazy8": "GP-CPS (lazy, k=8)",
    "gpcps_authors": "GP-CPS (authors' variants)",
}

#: The row of the paper's Table 2 (ablation at 1/8) each shipped method fills.
TABLE2_ROWS: dict[str, str] = {
    "supervised": "I",
    "gpcps_row_I": "I",
    "gpcps_row_II": "II",
    "gpcps_row_III": "III",
    "gpcps": "IV",
}

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

#: Keys of a model's init_args that the runner sets itself (from --seeds).
_RUNNER_SET = ("seeds", "network_seed")
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


# ----------------------------------------------------------------------------- method configs
@dataclass(frozen=True)
class MethodConfig:
    """A method for the runner: the ``model:`` block of a YAML file, named by the file's stem.

    Attributes:
        name: The method's name in records and tables (the file stem).
        class_path: The module class, as written in the file.
        init_args: The module arguments written in the file (the runner adds seeds and its options).
        file: The file's name (no folder: records hold no machine paths).
        shipped: Whether the file is one of the package's method configs.
        sha256: Hash of the file's bytes.
        stpp: The file's ``stpp:`` block (ST++'s options, see
            :class:`~gpcps_lightning.pipelines.STPPOptions`), or ``None``: a method config with one is
            trained by the ST++ pipeline, its ``model:`` block being the SupervisedModule it trains.
    """

    name: str
    class_path: str
    init_args: dict[str, Any]
    file: str
    shipped: bool
    sha256: str
    stpp: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """How the tables name the method."""
        return METHOD_LABELS.get(self.name, self.name) if self.shipped else self.name

    def describe(self) -> dict[str, Any]:
        """The method config as a record stores it."""
        described = {
            "name": self.name,
            "file": self.file,
            "shipped": self.shipped,
            "sha256": self.sha256,
            "model": {"class_path": self.class_path, "init_args": jsonable(self.init_args)},
        }
        if self.stpp is not None:
            described["stpp"] = jsonable(self.stpp)
        return described


def shipped_method_dir() -> Traversable:
    """The package folder of the shipped method configs (``gpcps_lightning/configs/methods``)."""
    return resources.files("gpcps_lightning").joinpath("configs").joinpath("methods")


def shipped_method_names() -> list[str]:
    """Names of the shipped method configs: those of :data:`METHOD_LABELS` first, in table order."""
    names = {p.name.removesuffix(".yaml") for p in shipped_method_dir().iterdir() if p.name.endswith(".yaml")}
    return [n for n in METHOD_LABELS if n in names] + sorted(names - METHOD_LABELS.keys())


def load_method_config(method: str | os.PathLike[str]) -> MethodConfig:
    """Read a method config: a shipped name (``gpcps``, ``supervised``, ...) or a YAML file's path.

    A string without a folder and without a ``.yaml``/``.yml`` suffix is a shipped name (or one of
    :data:`METHOD_ALIASES`); anything else is a path.

    Args:
        method: The name or the path.

    Returns:
        The method config.

    Raises:
        ValueError: On an unknown name, or a file that is not a method config (the message says why).
        FileNotFoundError: If the file does not exist.
    """
    text_method = os.fspath(method)
    is_name = (
        isinstance(method, str)
        and "/" not in text_method
        and os.sep not in text_method
        and not text_method.endswith((".yaml", ".yml"))
    )
    if is_name:
        name = METHOD_ALIASES.get(text_method, text_method)
        shipped = shipped_method_dir().joinpath(f"{name}.yaml")
        if not shipped.is_file():
            choices = ", ".join(shipped_method_names() + sorted(METHOD_ALIASES))
            raise ValueError(
                f"Unknown method {text_method!r}; choose from {choices}, or give a method config file "
                "with --method-config."
            )
        return _parse_method_config(shipped.read_bytes(), f"{name}.yaml", name, shipped=True)
    path = Path(text_method)
    if not path.is_file():
        raise FileNotFoundError(
            f"Method config {path} does not exist; fix the path given to --method-config."
        )
    return _parse_method_config(path.read_bytes(), str(path), path.stem, shipped=False)


def _parse_method_config(data: bytes, origin: str, name: str, *, shipped: bool) -> MethodConfig:
    import yaml

    try:
        content = yaml.safe_load(data.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"Method config {origin} is not valid YAML ({err}).") from err
    model = content.get("model") if isinstance(content, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("class_path"), str):
        raise ValueError(
            f"Method config {origin} needs a `model:` block with a `class_path` (and optional `init_args`), "
            "like the shipped ones (`gpcps reproduce methods` lists them)."
        )
    trainer = content.get("trainer") or {}
    extra = sorted(set(content) - {"model", "trainer", "stpp"}) + sorted(
        f"model.{k}" for k in set(model) - {"class_path", "init_args"}
    )
    extra += sorted(f"trainer.{k}" for k in trainer) if isinstance(trainer, dict) else ["trainer"]
    extra = [k for k in extra if k not in ("trainer.default_root_dir", "trainer.logger")]
    if extra:
        raise ValueError(
            f"Method config {origin} sets {', '.join(extra)}: the runner reads the `model:` block only and "
            "takes data, trainer and seeds from its own options (--fractions, --max-steps, --val-every, "
            "--precision, --seeds, ...); remove those keys (trainer.default_root_dir and trainer.logger, "
            "used by `gpcps fit`, may stay)."
        )
    init_args = model.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"Method config {origin}: `model.init_args` must be a mapping, got {init_args!r}.")
    runner_set = sorted(set(init_args) & set(_RUNNER_SET))
    if runner_set:
        raise ValueError(
            f"Method config {origin} sets model.init_args.{runner_set[0]}: the runner derives the networks' "
            "seeds from --seeds (seed s: 2s+1 and 2s+2); remove it."
        )
    stpp = None
    if "stpp" in content:  # options are checked by the runner, which imports the pipeline
        stpp = content["stpp"] if content["stpp"] is not None else {}
        if not isinstance(stpp, dict):
            raise ValueError(
                f"Method config {origin}: `stpp` must be a mapping of ST++ options (or empty), got {stpp!r}."
            )
    return MethodConfig(
        name=name,
        class_path=model["class_path"],
        init_args=dict(init_args),
        file=Path(origin).name,
        shipped=shipped,
        sha256=hashlib.sha256(data).hexdigest(),
        stpp=stpp,
    )


# ----------------------------------------------------------------------------- settings
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


def _class_path(obj: Any) -> str:
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
    settings: dict[str, Any] = {"model.class_path": _class_path(module)}
    settings.update({f"model.{k}": v for k, v in resolved_init_args(module).items()})
    settings["data.class_path"] = _class_path(datamodule)
    settings.update({f"data.{k}": v for k, v in resolved_init_args(datamodule).items()})
    augmentation = getattr(datamodule, "augmentation", None)
    settings["data.augmentation"] = None if augmentation is None else repr(augmentation)
    settings.update({f"split.{role}": sha256_file(p) for role, p in split_files(datamodule).items()})
    settings["trainer.max_steps"] = int(max_steps)
    settings["trainer.val_every"] = int(val_every)
    settings["trainer.precision"] = _PRECISION_ALIASES.get(str(precision), str(precision))
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


# ----------------------------------------------------------------------------- code and versions
def library_versions() -> dict[str, str]:
    """Versions of Python and of the loaded libraries that a result depends on."""
    import kornia
    import lightning
    import numpy
    import segmentation_models_pytorch
    import torch
    import torchmetrics

    import gpcps_lightning

    return {
        "gpcps_lightning": gpcps_lightning.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "segmentation_models_pytorch": segmentation_models_pytorch.__version__,
        "torchmetrics": torchmetrics.__version__,
        "kornia": kornia.__version__,
        "numpy": numpy.__version__,
    }


def strip_local_paths(value: Any) -> Any:
    """``value`` with every absolute path string replaced by ``"<local path>"`` (records travel)."""
    if isinstance(value, dict):
        return {k: strip_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_local_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return "<local path>"
    return value
