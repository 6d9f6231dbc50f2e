"""What a reproduction run was: its method config, and the code and versions that ran it.

``gpcps reproduce run`` (:mod:`gpcps_lightning.tools.reproduce`) stores these in each run's record beside
the run's settings (:mod:`gpcps_lightning.settings`, which decides what "the settings" are).

Method configs are YAML files with a LightningCLI ``model:`` block; the shipped ones live in the package
(``gpcps_lightning/configs/methods``) so that an installed wheel has them too.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from gpcps_lightning._utils import code_version
from gpcps_lightning.settings import jsonable

__all__ = [
    "METHOD_ALIASES",
    "METHOD_LABELS",
    "TABLE2_ROWS",
    "MethodConfig",
    "code_version",
    "library_versions",
    "load_method_config",
    "shipped_method_dir",
    "shipped_method_names",
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

#: Keys of a model's init_args that the runner sets itself (from --seeds).
_RUNNER_SET = ("seeds", "network_seed")


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
