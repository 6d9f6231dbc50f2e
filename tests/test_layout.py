"""The package layout: layers import downwards only, old import paths still work, records stay comparable."""

from __future__ import annotations

import ast
import importlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gpcps_lightning
from gpcps_lightning import CPSModule, GPCPSModule, KvasirSEGDataModule, SupervisedModule
from gpcps_lightning.checkpointing import CHECKPOINT_KEY, read_checkpoint
from gpcps_lightning.tools.provenance import (
    public_class_path,
    run_settings,
    settings_differences,
    settings_id,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gpcps_lightning"
RECORD = REPO / "docs" / "records" / "fast-cpu" / "gpcps_1of8_seed0.json"

#: The layers, bottom first: a module may import the package's modules of its own rank or below, never
#: above. Deprecated alias modules (``module``, ``predict`` ...) import lazily and are left out.
RANKS = {
    "_utils": 0,
    "_version": 0,
    "losses": 1,
    "batch": 1,
    "networks": 1,
    "checkpointing": 1,
    "distributed": 1,
    "loggers": 1,
    "data": 2,
    "methods": 2,
    "callbacks": 3,
    "inference": 3,
    "testing": 3,
    "__init__": 4,
    "pipelines": 5,
    "tools": 5,
    "cli": 6,
    "__main__": 7,
}
ALIASES = {
    "_io",
    "module",
    "baselines",
    "predict",
    "export",
    "evaluate",
    "reproduce",
    "report",
    "provenance",
    "bench",
}


def _package_imports(path: Path) -> set[str]:
    """Every module name imported by ``path`` (absolute imports only; the package uses no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= set(names)
    return found


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if parts[-1] == "bench_loader.py" and parts[0] == "data":
        return "alias"
    return parts[0].removesuffix(".py") if len(parts) == 1 else parts[0]


def test_every_module_has_a_layer() -> None:
    layers = {_layer(p) for p in PACKAGE.rglob("*.py")} - ALIASES - {"alias"}
    assert layers <= set(RANKS), sorted(layers - set(RANKS))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_downwards_only(path: Path) -> None:
    layer = _layer(path)
    if layer in ALIASES or layer == "alias":
        return
    problems = []
    for name in _package_imports(path):
        if layer == "losses" and name.split(".")[0] == "lightning":
            problems.append(f"imports {name}: the losses are plain torch")
        if not name.startswith("gpcps_lightning"):
            continue
        parts = name.split(".")
        target = parts[1] if len(parts) > 1 else "__init__"
        if target in ALIASES:
            problems.append(f"imports the deprecated alias {name}")
        elif target != layer and RANKS[target] > RANKS[layer]:
            problems.append(f"imports {name} (layer {target}, rank {RANKS[target]} > {RANKS[layer]})")
    assert not problems, problems


def test_importing_the_package_warns_nothing() -> None:
    code = (
        "import importlib, pkgutil, warnings; warnings.simplefilter('error', DeprecationWarning); "
        "import gpcps_lightning as g; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(g.__path__, 'gpcps_lightning.')]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- old paths
OLD_MODULE_NAMES = {
    "gpcps_lightning.module": ["GPCPSLosses", "GPCPSModule", "SegmentationModule", "_segmentation_metrics"],
    "gpcps_lightning.baselines": [
        "CPSLosses",
        "CPSModule",
        "MeanTeacherLosses",
        "MeanTeacherModule",
        "SupervisedLosses",
        "SupervisedModule",
        "add_gaussian_noise",
        "ema_decay_at",
        "ema_update",
    ],
    "gpcps_lightning.reproduce": ["run_one", "main"],
    "gpcps_lightning.report": ["make_tables"],
    "gpcps_lightning.provenance": ["settings_id", "code_version"],
    "gpcps_lightning.bench": ["BenchConfig", "run_benchmark"],
    "gpcps_lightning.data.bench_loader": ["main"],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in OLD_MODULE_NAMES.items() for n in names])
def test_old_module_paths_still_import_with_a_warning(module: str, name: str) -> None:
    old = importlib.import_module(module)
    with pytest.warns(
        DeprecationWarning, match=rf"{module} is deprecated[:;] import \w+ from gpcps_lightning\.[\w.]+"
    ):
        value = getattr(old, name)
    if isinstance(value, type) and name in gpcps_lightning.__all__:
        assert value is getattr(gpcps_lightning, name)
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_losses_package_keeps_every_old_name_without_warning() -> None:
    old_names = [
        "authors_background_mask",
        "authors_dice_loss",
        "background_mask",
        "fuse_images",
        "fused_pseudo_labels",
        "gradient_penalty",
        "input_gradient",
        "penalty_precision_context",
        "sample_eps",
        "soft_dice_loss",
        "consistency_loss",
        "cps_loss",
        "hard_pseudo_labels",
        "sigmoid_rampup",
        "EpsMode",
    ]
    losses = importlib.import_module("gpcps_lightning.losses")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in old_names:
            assert getattr(losses, name) is not None, name


# ---------------------------------------------------------------- class paths in records and checkpoints
def _exported_classes() -> list[type]:
    return [c for n in gpcps_lightning.__all__ if isinstance(c := getattr(gpcps_lightning, n), type)]


@pytest.mark.parametrize("cls", _exported_classes(), ids=lambda c: c.__name__)
def test_every_path_of_an_exported_class_has_one_public_name(cls: type) -> None:
    public = f"gpcps_lightning.{cls.__name__}"
    paths = {f"{cls.__module__}.{cls.__qualname__}", public}
    if cls.__name__ in ("GPCPSModule", "SegmentationModule"):
        paths.add(f"gpcps_lightning.module.{cls.__name__}")
    if cls.__name__ in ("CPSModule", "MeanTeacherModule", "SupervisedModule"):
        paths.add(f"gpcps_lightning.baselines.{cls.__name__}")
    assert {public_class_path(p) for p in paths} == {public}


def test_other_class_paths_are_left_as_they_are() -> None:
    for path in (
        "my_project.GPCPSModule",
        "gpcps_lightning.testing.RandomSquaresDataModule",
        "gpcps_lightningx.A",
    ):
        assert public_class_path(path) == path


def test_committed_record_compares_equal_to_the_settings_computed_now(tmp_path: Path) -> None:
    record = json.loads(RECORD.read_text())
    assert record["settings"]["model.class_path"] == "gpcps_lightning.module.GPCPSModule"  # the legacy path
    config = record["config"]
    module = GPCPSModule(**config["model"]["init_args"])
    datamodule = KvasirSEGDataModule(**{**config["data"]["init_args"], "root": str(tmp_path)})
    trainer = config["trainer"]
    now = run_settings(
        module,
        datamodule,
        max_steps=trainer["max_steps"],
        val_every=trainer["val_check_interval"],
        precision=trainer["precision"],
    )
    assert now["model.class_path"] == "gpcps_lightning.GPCPSModule"
    assert settings_differences(record["settings"], now) == []
    assert settings_id(now) == settings_id(record["settings"])
    assert settings_id(now, per_fraction=True) == settings_id(record["settings"], per_fraction=True)
    moved = {**record["settings"], "model.class_path": "gpcps_lightning.methods.gpcps.GPCPSModule"}
    assert settings_id(moved) == settings_id(record["settings"])
    other = {**record["settings"], "model.class_path": "gpcps_lightning.CPSModule"}
    assert settings_differences(record["settings"], other) != []


def test_checkpoints_stamped_with_a_legacy_class_path_still_load() -> None:
    """Old stamps name the module a class was defined in; they load, without a deprecation warning."""
    for legacy, cls, other in [
        ("gpcps_lightning.module.GPCPSModule", GPCPSModule, SupervisedModule),
        ("gpcps_lightning.baselines.CPSModule", CPSModule, GPCPSModule),
    ]:
        buffer = io.BytesIO()
        torch.save({"state_dict": {}, CHECKPOINT_KEY: {"class": legacy}}, buffer)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            buffer.seek(0)
            assert read_checkpoint(buffer, expected_class=cls)[CHECKPOINT_KEY]["class"] == public_class_path(
                legacy
            )
            buffer.seek(0)
            public = f"gpcps_lightning.{cls.__name__}"
            with pytest.raises(
                ValueError, match=rf"holds a {public} checkpoint, not a gpcps_lightning\.{other.__name__}"
            ):
                read_checkpoint(buffer, expected_class=other)
