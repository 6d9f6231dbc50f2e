"""Every YAML shipped is parsed and run for a couple of steps; the example scripts run too.

"Shipped" means every YAML under examples/ and the method configs in the package
(``gpcps_lightning/configs/methods``, package data so that ``gpcps reproduce run`` finds them in an
installed wheel). Standalone configs run as they are; the method configs and the files under
``examples/configs/precision`` are overrides and run on top of ``kvasir_gpcps.yaml``, as their headers
say. Sizes are shrunk on the command line (tiny images, a tiny network, two steps), everything else
comes from the shipped files.
Kvasir-SEG configs use the real copy when ``KVASIR_SEG_ROOT`` is set, else a stand-in with the shipped
file names.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from test_data_helpers import write_kvasir_standin

from gpcps_lightning.cli import GPCPSCLI

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "configs"
METHOD_CONFIGS = REPO / "gpcps_lightning" / "configs" / "methods"
KVASIR_BASE = CONFIGS / "kvasir_gpcps.yaml"
OVERRIDE_FOLDERS = ("methods", "precision")


def _all_configs() -> list[Path]:
    found = [*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml"), *(REPO / "gpcps_lightning").rglob("*.y*ml")]
    return sorted(found)


def _is_override(path: Path) -> bool:
    return path.parent.name in OVERRIDE_FOLDERS


def test_every_config_is_either_standalone_or_an_override() -> None:
    from gpcps_lightning.tools.provenance import shipped_method_names

    configs = _all_configs()
    assert KVASIR_BASE in configs and CONFIGS / "quickstart.yaml" in configs
    assert {METHOD_CONFIGS / f"{name}.yaml" for name in shipped_method_names()} <= set(configs)
    for path in configs:
        content = yaml.safe_load(path.read_text())
        if _is_override(path):
            assert "data" not in content, f"{path}: overrides must not change the data protocol"
        else:
            assert {"model", "data", "trainer"} <= content.keys(), path


SHRINK = [
    "--trainer.max_steps=2",
    "--trainer.max_epochs=null",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.limit_val_batches=1",
    "--trainer.check_val_every_n_epoch=null",
    "--trainer.val_check_interval=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.image_size=32",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--model.encoder_name=tu-resnet18",
    "--model.network_kwargs={encoder_depth: 3, decoder_channels: [16, 8, 4]}",
]


#: Further shrinking of the methods with networks of their own (by the model's class name).
MODEL_SHRINK = {"GCTModule": ["--model.fd_channels=8"]}  # the flaw detector, 64 channels wide by default


def _data_args(config: dict, tmp_path: Path) -> list[str]:
    data_class = config["data"]["class_path"]
    if data_class.endswith("KvasirSEGDataModule"):
        root = os.environ.get("KVASIR_SEG_ROOT")
        if root is None:
            root = str(write_kvasir_standin(tmp_path / "kvasir-standin"))
            return [f"--data.root={root}", "--data.download=false", "--data.verify=false"]
        return [f"--data.root={root}", "--data.download=false"]
    if data_class.endswith("SyntheticPolypDataModule"):
        return ["--data.num_images=24"]
    return []


#: The configs run in the default test tier: a standalone one and an override on the Kvasir-SEG base.
#: Every other config runs in the slow tier (``pytest -m slow``).
FAST_CASES = {CONFIGS / "quickstart.yaml", METHOD_CONFIGS / "gpcps.yaml"}


def _cases() -> list[pytest.param]:
    cases = []
    for path in _all_configs():
        if "stpp" in (yaml.safe_load(path.read_text()) or {}):
            # ST++ is a pipeline of trainings that `gpcps fit` cannot run; test_reproduce.py's
            # test_stpp_runs_through_the_runner_and_its_record_is_tested_like_any_other runs the shipped one.
            continue
        files = [KVASIR_BASE, path] if _is_override(path) else [path]
        marks = () if path in FAST_CASES else pytest.mark.slow
        cases.append(pytest.param(files, id=str(path.relative_to(REPO)), marks=marks))
    return cases


@pytest.mark.parametrize("files", _cases())
def test_config_runs_two_steps(files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths of the configs (runs/, data/) land in tmp_path
    merged: dict = {}
    for f in files:
        merged.update(yaml.safe_load(f.read_text()))
    args = [a for f in files for a in ("--config", str(f))]
    args += [*SHRINK, *_data_args(merged, tmp_path)]
    args += MODEL_SHRINK.get(merged["model"]["class_path"].rsplit(".", 1)[-1], [])
    if merged.get("trainer", {}).get("precision") == "16-mixed":
        # Lightning turns "16-mixed" into bf16 on a CPU; the plugin keeps fp16 autocast and its scaler.
        args += [
            "--trainer.precision=null",
            "--trainer.plugins+={class_path: lightning.pytorch.plugins.precision.MixedPrecision, "
            "init_args: {precision: 16-mixed, device: cpu}}",
        ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = GPCPSCLI(args=["fit", *args])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_sup"])
    assert torch.isfinite(metrics["train/loss"])  # fp16 too: the penalty's graph runs in fp32
    assert any(k.startswith("val/dice_") for k in metrics)
    root = Path(cli.trainer.default_root_dir)
    assert (root / "checkpoints" / "last.ckpt").is_file()
    for callback in merged.get("trainer", {}).get("callbacks") or []:
        if callback["class_path"].endswith("PredictionsPicture"):
            assert (tmp_path / callback["init_args"]["path"]).is_file()
    expected = merged.get("trainer", {}).get("precision")
    if expected is not None:
        assert str(cli.trainer.precision) == str(expected)


def test_module_and_datamodule_arguments_do_not_clash() -> None:
    """Lightning refuses to log a run whose module and datamodule share an argument name with two values."""
    import inspect

    from gpcps_lightning import (
        CPSModule,
        FolderDataModule,
        GCTModule,
        GPCPSModule,
        KvasirSEGDataModule,
        MeanTeacherModule,
        PSMTModule,
        SegmentationModule,
        SupervisedModule,
        SyntheticPolypDataModule,
        UniMatchModule,
    )
    from gpcps_lightning.data import SemiSupervisedDataModule

    def names(*classes: type) -> set[str]:
        return {p for c in classes for p in inspect.signature(c).parameters if p != "kwargs"}

    data = names(SemiSupervisedDataModule, FolderDataModule, KvasirSEGDataModule, SyntheticPolypDataModule)
    for module in (
        GPCPSModule,
        SupervisedModule,
        CPSModule,
        MeanTeacherModule,
        GCTModule,
        PSMTModule,
        UniMatchModule,
    ):
        assert not names(module, SegmentationModule) & data, module.__name__
