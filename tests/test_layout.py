"""The package layout: layers import downwards only, no alias modules, old records and checkpoints load."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import json
import re
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
from gpcps_lightning._utils import import_object, public_class_path
from gpcps_lightning.checkpointing import CHECKPOINT_KEY, read_checkpoint
from gpcps_lightning.inference.predict import load_module
from gpcps_lightning.settings import run_settings, settings_differences, settings_id

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gpcps_lightning"
RECORDS = REPO / "docs" / "records"
RECORD = RECORDS / "fast-cpu" / "gpcps_1of8_seed0.json"

#: The layers, bottom first: a module may import the package's modules of its own rank or below, never
#: above.
RANKS = {
    "_lightning_internals": 0,
    "_utils": 0,
    "_version": 0,
    "threads": 0,
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
    "settings": 3,
    "training": 3,
    "pipelines": 5,
    "tools": 6,
    "cli": 7,
    "__main__": 8,
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


@pytest.mark.slow  # three interpreter subprocesses
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


# ---------------------------------------------------------------- Lightning's private API in one module
INTERNALS = PACKAGE / "_lightning_internals.py"

#: Public attributes whose values are Lightning's private classes (the loops and their progress counters).
LIGHTNING_PRIVATE_TYPED = frozenset(
    {"fit_loop", "validate_loop", "test_loop", "predict_loop", "epoch_loop"}
    | {"batch_progress", "epoch_progress"}
)

#: The package's own private names that Lightning also uses, each with why it is not Lightning's.
OWN_PRIVATE_NAMES = {
    "_evaluation_step": "SegmentationModule's own method; Lightning's is one of its evaluation loop's",
}

_LIGHTNING_DEFINITION = re.compile(
    r"\bself\.(_[A-Za-z]\w*)\s*[:=](?!=)"  # an attribute set on an instance
    r"|\bdef (_[A-Za-z]\w*)\(\s*(?:self|cls)\b"  # a private method
    r"|^class (_[A-Za-z]\w*)"  # a private class
    r"|^    (_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)",  # a class attribute
    re.MULTILINE,
)


@functools.cache
def _lightning_private_names() -> frozenset[str]:
    """The private attributes, methods and classes that the installed Lightning defines."""
    import lightning

    names = set()
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        for match in _LIGHTNING_DEFINITION.finditer(path.read_text(encoding="utf-8")):
            names.add(next(group for group in match.groups() if group))
    return frozenset(names)


def _lightning_private_uses(source: str) -> list[str]:
    """Where ``source`` names a private Lightning attribute, method (defined or called) or class."""
    private = _lightning_private_names() - set(OWN_PRIVATE_NAMES)
    attributes = private | LIGHTNING_PRIVATE_TYPED
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr in attributes:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            methods = [f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            found += [f"line {f.lineno}: overrides {f.name}" for f in methods if f.name in private]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in private
        ):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


@pytest.mark.parametrize(
    "path", [p for p in MODULES if p != INTERNALS], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_only_the_internals_module_uses_lightnings_private_api(path: Path) -> None:
    """Lightning's private names live in ``_lightning_internals``; the other modules call its functions."""
    assert _lightning_private_uses(path.read_text()) == [], f"move it to {INTERNALS.relative_to(REPO)}"


def test_the_private_api_scan_finds_each_kind_of_use() -> None:
    assert _lightning_private_uses(INTERNALS.read_text())  # the scan sees what the internals module uses
    for source in (
        "x = trainer.fit_loop.epoch_loop._batches_that_stepped",
        "x = trainer.fit_loop.epoch_progress.current.ready",
        "from lightning.pytorch.loops.loop import _Loop",
        "x = module._trainer",
        "x = getattr(logger, '_wandb_init', None)",
        "class C(ModelCheckpoint):\n    def _save_last_checkpoint(self, trainer, candidates): ...",
    ):
        assert _lightning_private_uses(source), source
    assert _lightning_private_uses("self._command_line = None\nx = module.trainer") == []


# ---------------------------------------------------------------- the map matches the house
ARCHITECTURE = REPO / "docs" / "architecture.md"


def _layer_table() -> str:
    """The layer table of docs/architecture.md (its first fenced block)."""
    return ARCHITECTURE.read_text().split("```")[1]


def test_every_layer_of_the_doc_has_the_tests_rank() -> None:
    """The doc's table names every package and top-level module at its rank in ``RANKS``, and no other."""
    lines = [line for line in _layer_table().splitlines() if line.strip()]
    # The columns: "rank N", the modules and packages, what they hold (the first row fixes the widths).
    first = re.match(r"(\s*rank [\d-]+\s+)(\S.*?\s{2,})\S", lines[0])
    assert first, lines[0]
    names_at, about_at = len(first[1]), len(first[1]) + len(first[2])
    ranks: dict[str, tuple[int, int]] = {}
    rank = (-1, -1)
    for line in lines:
        head = re.match(r"\s*rank (\d)(?:-(\d))?", line[:names_at])
        if head:
            rank = (int(head[1]), int(head[2] or head[1]))
        for name in filter(None, (n.strip() for n in line[names_at:about_at].split(","))):
            ranks[name.removesuffix("/").removesuffix(".py")] = rank
    assert set(ranks) == set(RANKS), (sorted(set(ranks) - set(RANKS)), sorted(set(RANKS) - set(ranks)))
    for name, (low, high) in ranks.items():
        assert low <= RANKS[name] <= high, f"{name}: rank {RANKS[name]} in RANKS, {low}-{high} in the doc"


def test_every_module_is_in_the_docs_map() -> None:
    """Every module of the package and of its subpackages, and every nested package, is in the table."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", _layer_table()))
    missing = []
    for path in MODULES:
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = parts[1] if len(parts) > 2 else parts[-1]  # a nested package is named by its folder
        if name != "__init__" and name not in words:
            missing.append(str(path.relative_to(PACKAGE)))
    assert missing == [], f"add them to the table of {ARCHITECTURE.relative_to(REPO)}"
