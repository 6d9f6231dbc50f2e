"""The package layout: layers import downwards only, no alias modules, old records and checkpoints load."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_NET, RandomSemiDataModule
from lightning.pytorch.callbacks import ModelCheckpoint

import gpcps_lightning
from gpcps_lightning import CPSModule, GPCPSModule, KvasirSEGDataModule, SegmentationModule, SupervisedModule
from gpcps_lightning._utils import import_object
from gpcps_lightning.checkpointing import CHECKPOINT_KEY, read_checkpoint
from gpcps_lightning.inference.predict import load_module
from gpcps_lightning.tools.provenance import (
    public_class_path,
    run_settings,
    settings_differences,
    settings_id,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gpcps_lightning"
RECORDS = REPO / "docs" / "records"
RECORD = RECORDS / "fast-cpu" / "gpcps_1of8_seed0.json"

#: The layers, bottom first: a module may import the package's modules of its own rank or below, never
#: above.
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

#: Modules that moved before the first release and whose deprecated aliases were removed (0.1.0.dev0
#: had no users to protect). They must not come back: import from the new place (the value) instead.
#: Records and checkpoints that name a class by one of these paths still load: ``public_class_path``
#: maps the path as a string, importing nothing.
REMOVED_ALIASES = {
    "gpcps_lightning._io": "gpcps_lightning._utils",
    "gpcps_lightning.module": "gpcps_lightning (the modules), gpcps_lightning.losses",
    "gpcps_lightning.baselines": "gpcps_lightning (the modules), gpcps_lightning.losses.baselines",
    "gpcps_lightning.predict": "gpcps_lightning.inference.predict",
    "gpcps_lightning.export": "gpcps_lightning.inference.export",
    "gpcps_lightning.evaluate": "gpcps_lightning.inference.evaluate",
    "gpcps_lightning.reproduce": "gpcps_lightning.tools.reproduce",
    "gpcps_lightning.report": "gpcps_lightning.tools.report",
    "gpcps_lightning.provenance": "gpcps_lightning.tools.provenance",
    "gpcps_lightning.bench": "gpcps_lightning.tools.bench",
    "gpcps_lightning.data.bench_loader": "gpcps_lightning.tools.bench_loader",
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
    return parts[0].removesuffix(".py") if len(parts) == 1 else parts[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    layers = {_layer(p) for p in MODULES}
    assert layers <= set(RANKS), sorted(layers - set(RANKS))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_downwards_only(path: Path) -> None:
    layer = _layer(path)
    problems = []
    for name in _package_imports(path):
        if layer == "losses" and name.split(".")[0] == "lightning":
            problems.append(f"imports {name}: the losses are plain torch")
        if not name.startswith("gpcps_lightning"):
            continue
        parts = name.split(".")
        target = parts[1] if len(parts) > 1 else "__init__"
        if name in REMOVED_ALIASES or target not in RANKS:
            problems.append(f"imports {name}, which is not a module of the package")
        elif target != layer and RANKS[target] > RANKS[layer]:
            problems.append(f"imports {name} (layer {target}, rank {RANKS[target]} > {RANKS[layer]})")
    assert not problems, problems


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path: Path) -> None:
    """A helper that two modules share has a public name in its home module; none is re-exported privately."""
    own = _module_name(path)
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpcps_lightning"):
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and node.module != own:
                    problems.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    assert not problems, problems


def test_importing_the_package_warns_nothing() -> None:
    code = (
        "import importlib, pkgutil, warnings; warnings.simplefilter('error', DeprecationWarning); "
        "import gpcps_lightning as g; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(g.__path__, 'gpcps_lightning.')]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- no alias layer
@pytest.mark.parametrize("module", sorted(REMOVED_ALIASES))
def test_removed_alias_modules_stay_gone(module: str) -> None:
    relative = Path(*module.split(".")[1:])
    assert not (PACKAGE / relative.with_suffix(".py")).exists(), f"import from {REMOVED_ALIASES[module]}"
    assert not (PACKAGE / relative).exists(), f"import from {REMOVED_ALIASES[module]}"
    assert importlib.util.find_spec(module) is None, f"import from {REMOVED_ALIASES[module]}"


def test_no_module_serves_deprecated_names() -> None:
    """No module-level ``__getattr__`` hands out moved names (the alias hook ``testing`` had is gone)."""
    hooks = [
        str(path.relative_to(PACKAGE))
        for path in MODULES
        if any(
            isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            for node in ast.parse(path.read_text()).body
        )
    ]
    assert hooks == []
    testing = importlib.import_module("gpcps_lightning.testing")
    assert not hasattr(testing, "read_wandb_run")
    assert not hasattr(importlib.import_module("gpcps_lightning._utils"), "moved_attribute")


def test_python_m_of_the_removed_modules_fails_and_the_tools_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpcps_lightning.reproduce", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "No module named gpcps_lightning.reproduce" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "gpcps_lightning.tools.reproduce", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_losses_package_exports_the_loss_functions_without_warning() -> None:
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
    """Old stamps name the module a class was defined in, which is gone; they load, warning nothing."""
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


def _class_paths(value: object) -> list[str]:
    """Every ``class_path`` / ``*.class_path`` string value in a JSON document."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("class_path") and isinstance(item, str):
                found.append(item)
            found += _class_paths(item)
    elif isinstance(value, list):
        for item in value:
            found += _class_paths(item)
    return found


def test_every_class_path_of_the_committed_records_names_a_class_that_imports() -> None:
    """Records name classes by public, methods.* and legacy module.* / baselines.* paths: all resolve."""
    paths = {p for f in sorted(RECORDS.rglob("*.json")) for p in _class_paths(json.loads(f.read_text()))}
    assert "gpcps_lightning.module.GPCPSModule" in paths  # the legacy paths are still in the records
    assert "gpcps_lightning.baselines.CPSModule" in paths
    for path in sorted(paths):
        public = public_class_path(path)
        cls = import_object(public)
        assert isinstance(cls, type), path
        assert cls.__name__ == path.rpartition(".")[2], path
        if path.startswith("gpcps_lightning.") and issubclass(cls, SegmentationModule):
            assert public == f"gpcps_lightning.{cls.__name__}", path


@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")
def test_a_checkpoint_stamped_with_a_legacy_class_path_loads_in_full(tmp_path: Path) -> None:
    """A real checkpoint whose stamp names ``gpcps_lightning.module.GPCPSModule`` loads with its weights."""
    from conftest import tiny_trainer

    trainer = tiny_trainer(
        max_steps=1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    )
    trainer.fit(GPCPSModule(**TINY_NET), RandomSemiDataModule())
    data = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert data[CHECKPOINT_KEY]["class"] == "gpcps_lightning.GPCPSModule"
    data[CHECKPOINT_KEY]["class"] = "gpcps_lightning.module.GPCPSModule"
    torch.save(data, tmp_path / "legacy.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for module in (
            GPCPSModule.load_from_checkpoint(tmp_path / "legacy.ckpt"),
            load_module(tmp_path / "legacy.ckpt"),
        ):
            assert type(module) is GPCPSModule
            for name, value in module.state_dict().items():
                torch.testing.assert_close(value, data["state_dict"][name])
