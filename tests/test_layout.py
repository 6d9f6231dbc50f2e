"""The package layout: layers import downwards only, old import paths still work, records stay comparable."""

from __future__ import annotations

import ast
import importlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

import gpcps_lightning
from gpcps_lightning import CPSModule, GPCPSModule, KvasirSEGDataModule, SupervisedModule
from gpcps_lightning.checkpointing import CHECKPOINT_KEY, read_checkpoint
from gpcps_lightning.provenance import public_class_path, run_settings, settings_differences, settings_id

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gpcps_lightning"
RECORD = REPO / "docs" / "records" / "fast-cpu" / "gpcps_1of8_seed0.json"

#: What each layer may import from the package (besides itself).
ALLOWED = {
    "losses": set(),
    "methods": {"losses", "batch", "networks", "checkpointing", "_version"},
    "pipelines": {
        "methods",
        "data",
        "inference",
        "callbacks",
        "losses",
        "batch",
        "checkpointing",
        "provenance",
        "_utils",
        "_version",
    },
}

#: The only package modules that may import the pipelines (the command line and the runner, above them).
PIPELINE_USERS = {"cli.py", "reproduce.py", "__main__.py"}


def _package_imports(path: Path) -> set[str]:
    """Top-level modules imported from the package (``gpcps_lightning.<x>``) and third-party roots."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= set(names)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_downwards_only(layer: str) -> None:
    problems = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for name in _package_imports(path):
            if name.split(".")[0] == "lightning" and layer == "losses":
                problems.append(f"{path.name} imports {name}")
            if not name.startswith("gpcps_lightning"):
                continue
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "gpcps_lightning"
            if target != layer and target not in ALLOWED[layer]:
                problems.append(f"{path.name} imports {name}")
    assert not problems, problems


def test_nothing_below_the_pipelines_imports_them() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("pipelines/", "tools/")) or rel in PIPELINE_USERS:
            continue
        problems += [
            f"{rel} imports {n}" for n in _package_imports(path) if n.startswith("gpcps_lightning.pipelines")
        ]
    assert not problems, problems


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
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in OLD_MODULE_NAMES.items() for n in names])
def test_old_module_paths_still_import_with_a_warning(module: str, name: str) -> None:
    old = importlib.import_module(module)
    with pytest.warns(
        DeprecationWarning, match=rf"{module} is deprecated: import \w+ from gpcps_lightning\.\w+"
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
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"class": "gpcps_lightning.module.GPCPSModule"}}, buffer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        buffer.seek(0)
        read_checkpoint(buffer, expected_class=GPCPSModule)
        buffer.seek(0)
        with pytest.raises(ValueError, match=r"holds a gpcps_lightning\.module\.GPCPSModule checkpoint"):
            read_checkpoint(buffer, expected_class=SupervisedModule)
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"class": "gpcps_lightning.baselines.CPSModule"}}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        read_checkpoint(buffer, expected_class=CPSModule)
