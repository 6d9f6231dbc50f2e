"""The ``gpcps`` command: options, help, fit/resume/test/predict, W&B offline, extra commands."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from test_data_helpers import write_pairs

from gpcps_lightning import GPCPSModule, SegmentationModule, __version__
from gpcps_lightning import cli as cli_module
from gpcps_lightning.callbacks import BestCheckpoint, LossProgressBar, ValidationImagePanel
from gpcps_lightning.checkpointing import SafeCheckpointIO
from gpcps_lightning.cli import GPCPSCLI, main
from gpcps_lightning.inference.predict import Segmenter
from gpcps_lightning.tools.wandb_reader import read_wandb_run

CONF = Path(__file__).parent / "conf"
TINY = str(CONF / "tiny_gpcps.yaml")

pytestmark = pytest.mark.filterwarnings(
    "ignore:LightningCLI's args parameter is intended",
    "ignore:.*smaller than the logging interval.*",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
)


def run_cli(*args: str) -> GPCPSCLI:
    return GPCPSCLI(args=list(args))


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny GP-CPS training run (1 epoch = 2 steps) through the command line, shared by the tests."""
    root = tmp_path_factory.mktemp("run")
    cli = run_cli("fit", "--config", TINY, "--trainer.default_root_dir", str(root))
    assert cli.trainer.global_step == 2
    return root


# ----------------------------------------------------------------------------- version and help
def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpcps_lightning {__version__}"


@pytest.mark.slow
def test_python_dash_m_version() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "gpcps_lightning", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == f"gpcps_lightning {__version__}"


def test_fit_help_lists_library_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--model.help",
        "gpcps_lightning.GPCPSModule",
        "--data.help",
        "--checkpoint.monitor",
        "--checkpoint.dirpath",
        "--image_panel.every_n_epochs",
        "--progress_bar.show_val_dice",
        "--ckpt_path",
        "--version",
    ):
        assert option in out, option


def test_model_help_documents_every_gpcps_argument(capsys: pytest.CaptureFixture[str]) -> None:
    # GPCPSModule forwards **kwargs to SegmentationModule; the help must still list (and document) them.
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "GPCPSModule"])
    out = " ".join(capsys.readouterr().out.split())
    names = [
        p
        for cls in (GPCPSModule, SegmentationModule)
        for p, param in inspect.signature(cls.__init__).parameters.items()
        if p != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
    ]
    assert {"lambda_grad", "lambda_semi", "encoder_name", "lr", "threshold"} <= set(names)
    for name in names:
        assert f"--model.{name} " in out, name
    assert "Weight of the gradient penalty" in out
    assert "Adam learning rate" in out


def test_predict_help_lists_prediction_writer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "--prediction_writer.output_dir" in out
    assert "--prediction_writer.overlay" in out


def test_fit_rejects_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, "--model.lambda_gradd", "1"])
    assert exit_info.value.code != 0
    assert "lambda_gradd" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors as one message
@pytest.mark.parametrize(
    ("args", "config", "shown"),
    [
        (
            ["--model.init_args.lamda_grad", "1"],
            None,
            "gpcps fit: error: model: gpcps_lightning.GPCPSModule has no option 'lamda_grad'; "
            "did you mean 'lambda_grad'?",
        ),
        (
            [],
            "model:\n  init_args:\n    lamda_grad: 1\n",
            "has no option 'lamda_grad'; did you mean 'lambda_grad'?",
        ),
        (
            [],
            "trainr:\n  max_steps: 3\n",
            "gpcps fit: error: unknown key 'trainr' (in trainr.max_steps); did you mean 'trainer'?",
        ),
        (
            [],
            "trainer:\n  max_stepz: 3\n",
            "unknown key 'trainer.max_stepz'; did you mean 'trainer.max_steps'?",
        ),
        (
            ["--trainer.max_stepz", "3"],
            None,
            "gpcps fit: error: unknown option --trainer.max_stepz; did you mean '--trainer.max_steps'?",
        ),
        (
            ["--data.init_args.batch_size", "two"],
            None,
            "gpcps fit: error: data.batch_size: Expected a <class 'int'>. Got value: two",
        ),
    ],
)
def test_misspelt_option_names_the_closest_valid_one(
    args: list[str],
    config: str | None,
    shown: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("GPCPS_TRACEBACK", raising=False)
    if config is not None:
        (tmp_path / "typo.yaml").write_text(config)
        args = [*args, "--config", str(tmp_path / "typo.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert shown in err
    # The message and a hint, not the usage (~70 lines) nor jsonargparse's Union report.
    assert len(err.strip().splitlines()) == 2, err
    assert "usage:" not in err and "Union subtypes" not in err and "Given value" not in err
    assert "`gpcps fit --help` lists the options" in err


def test_parse_error_full_report_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPCPS_TRACEBACK", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, "--model.init_args.lamda_grad", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gpcps [options] fit" in err and "Option 'lamda_grad' is not accepted" in err


def _folder_with_an_unpaired_image(root: Path) -> Path:
    write_pairs(root, 6)
    (root / "images" / "extra.png").write_bytes((root / "images" / "img000.png").read_bytes())
    return root


def test_library_errors_are_one_message_with_traceback_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPCPS_TRACEBACK", "0")  # "0" is off; monkeypatch restores what --traceback sets
    root = _folder_with_an_unpaired_image(tmp_path / "data")
    args = [
        "fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data", "gpcps_lightning.FolderDataModule", "--data.root", str(root), "--data.image_size", "32",
    ]  # fmt: skip
    assert main(args) == 2  # found in setup, during fit
    err = capsys.readouterr().err
    assert "gpcps fit: error: 1 image(s) in " in err and "have no mask in" in err and "extra" in err
    assert "Traceback" not in err and "GPCPS_TRACEBACK=1 shows the traceback" in err
    # A value the class rejects comes back as the class's message alone, not inside jsonargparse's report.
    assert main(["fit", "--config", TINY, "--model.lambda_grad", "-1"]) == 2
    err = capsys.readouterr().err
    assert "gpcps fit: error: `lambda_grad` must be >= 0, got -1.0." in err and "Union" not in err
    # The traceback on request: the option (removed before parsing) or the environment variable.
    with pytest.raises(ValueError, match="have no mask in"):
        main(["--traceback", *args])
    assert os.environ["GPCPS_TRACEBACK"] == "1"  # the option sets it for this process
    monkeypatch.setenv("GPCPS_TRACEBACK", "1")
    with pytest.raises(ValueError, match="have no mask in"):
        main(args)


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPCPS_TRACEBACK", raising=False)

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("raised outside the library")  # a ValueError, but not one of the library's

    monkeypatch.setattr(GPCPSCLI, "__init__", broken)
    with pytest.raises(ValueError, match="raised outside the library"):
        main(["fit", "--config", TINY])

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(GPCPSCLI, "__init__", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["fit", "--config", TINY])


def test_reported_error_unwraps_only_the_librarys_own_errors() -> None:
    from gpcps_lightning.checkpointing import read_checkpoint

    with pytest.raises(FileNotFoundError) as own:
        read_checkpoint("no/such/file.ckpt")
    assert cli_module.reported_error(own.value) is own.value
    try:  # jsonargparse wraps a class's error in its Union report, with the error as the cause
        raise ValueError("Does not validate against any of the Union subtypes\nErrors: ...") from own.value
    except ValueError as wrapped:
        assert cli_module.reported_error(wrapped) is own.value
    with pytest.raises(ValueError) as foreign:
        int("not a number")  # Python's own error: no `raise` of the library
    assert cli_module.reported_error(foreign.value) is None
    with pytest.raises(IndexError) as other_type:
        [][0]
    assert cli_module.reported_error(other_type.value) is None


# ----------------------------------------------------------------------------- defaults, no training
def test_default_callbacks_and_their_opt_outs() -> None:
    cli = GPCPSCLI(args=["--config", TINY], run=False)
    types_ = [type(c) for c in cli.trainer.callbacks]
    assert BestCheckpoint in types_ and LossProgressBar in types_ and ValidationImagePanel in types_
    assert isinstance(cli.model, GPCPSModule)
    assert cli.model.hparams["encoder_name"] == "tu-resnet18"
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)

    cli = GPCPSCLI(
        args=[
            "--config",
            TINY,
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
        run=False,
    )
    assert not any(isinstance(c, (ModelCheckpoint, LossProgressBar)) for c in cli.trainer.callbacks)


def test_loader_workers_are_counted_by_use_on_the_cpu_unless_threads_are_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gpcps_lightning.callbacks import LoaderWorkerThreads

    def counted(*args: str) -> bool:
        data = ["--data", "gpcps_lightning.SyntheticPolypDataModule", "--data.root", str(tmp_path)]
        cli = GPCPSCLI(args=["--config", TINY, *data, *args], run=False)
        return any(isinstance(c, LoaderWorkerThreads) for c in cli.trainer.callbacks)

    before = torch.get_num_threads()
    try:
        assert not counted("--data.num_workers", "1")  # conftest sets GPCPS_NUM_THREADS
        monkeypatch.delenv("GPCPS_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert counted("--data.num_workers", "1")
        assert not counted("--data.num_workers", "0")
    finally:
        torch.set_num_threads(before)  # the policy chose threads from this machine's load


def test_model_defaults_to_gpcps(tmp_path: Path) -> None:
    cli = GPCPSCLI(
        args=[
            "--data",
            "gpcps_lightning.testing.RandomSquaresDataModule",
            "--model.encoder_name",
            "tu-resnet18",
            "--model.network_kwargs",
            "{encoder_depth: 3, decoder_channels: [16, 8, 4]}",
            "--model.lambda_semi",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert isinstance(cli.model, GPCPSModule)
    assert cli.model.lambda_semi == 0.0


# ----------------------------------------------------------------------------- fit, resume, test
def test_fit_writes_best_and_last_checkpoints(trained: Path) -> None:
    best, last = trained / "checkpoints" / "best.ckpt", trained / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # The checkpoint records the module class and the datamodule's preprocessing.
    assert ckpt["hyper_parameters"]["_class_path"] == "gpcps_lightning.GPCPSModule"
    assert ckpt["datamodule_hyper_parameters"]["image_size"] == 32
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("BestCheckpoint")]
    assert states and states[0]["monitor"] == "val/dice_ensemble"
    assert (trained / "config.yaml").is_file()
    assert sorted(p.name for p in (trained / "panels").iterdir()) == [
        "val_predictions_epoch0000_step0000002.png"
    ]


def test_resume_from_last_continues_the_run(tmp_path: Path) -> None:
    root = str(tmp_path)
    run_cli("fit", "--config", TINY, "--trainer.default_root_dir", root)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 2
    cli = run_cli(
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        root,
        "--trainer.max_epochs",
        "2",
        "--ckpt_path",
        "last",
    )
    assert Path(cli.trainer.ckpt_path) == last.resolve()
    assert cli.trainer.global_step == 4
    assert ckpt_step(last) == 4
    # The second process trained epoch 1 only: it added epoch 1's panel to the first process's epoch 0 panel.
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == [
        "val_predictions_epoch0000_step0000002.png",
        "val_predictions_epoch0001_step0000004.png",
    ]


def test_resume_last_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no last checkpoint"):
        cli = run_cli(
            "fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last",
            "--trainer.max_steps", "1",
        )  # fmt: skip
    assert cli.trainer.global_step == 1


def test_test_with_best_in_a_new_process(trained: Path, tmp_path: Path) -> None:
    cli = run_cli("test", "--config", TINY, "--trainer.default_root_dir", str(trained), "--ckpt_path", "best")
    assert Path(cli.trainer.ckpt_path).name == "best.ckpt"
    assert "test/dice_ensemble" in cli.trainer.callback_metrics

    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        run_cli("test", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "best")


# ----------------------------------------------------------------------------- predict
def _write_images(folder: Path) -> dict[str, tuple[int, int]]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (40, 56), "b.jpg": (23, 31), "c.png": (64, 64), "d.tif": (50, 20)}
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (23, 31), dtype=np.uint8)).save(folder / "b.jpg")  # grayscale JPEG
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "c.png")
    Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).save(folder / "d.tif")
    return sizes


def test_predict_writes_binary_masks_at_original_size(trained: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    sizes = _write_images(images)
    out = tmp_path / "out"
    best = trained / "checkpoints" / "best.ckpt"
    main(
        [
            "predict",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--ckpt_path",
            str(best),
            "--data.predict_dir",
            str(images),
            "--prediction_writer.output_dir",
            str(out),
            "--prediction_writer.overlay",
            "true",
        ]
    )
    segmenter = Segmenter.from_checkpoint(best, device="cpu")
    for name, (h, w) in sizes.items():
        stem = Path(name).stem
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (h, w), name
        assert set(np.unique(mask)) <= {0, 255}
        overlay = Image.open(out / "overlays" / f"{stem}.png")
        assert overlay.size == (w, h) and overlay.mode == "RGB"
        # The in-memory API gives the same masks as the command.
        with Image.open(images / name) as image:
            expected = segmenter(image)[0]
        assert np.mean((mask == 255) == expected) > 0.999, name


def test_predict_folder_example(trained: Path, tmp_path: Path) -> None:
    example = _load_example("predict_folder")
    images = tmp_path / "images"
    sizes = _write_images(images)
    out = tmp_path / "out"
    ckpt = str(trained / "checkpoints" / "best.ckpt")
    written = example.main([ckpt, str(images), "--out", str(out), "--overlay", "--device", "cpu"])
    assert len(written) == len(sizes)
    for name, (h, w) in sizes.items():
        assert Image.open(out / "masks" / f"{Path(name).stem}.png").size == (w, h)
        assert Image.open(out / "overlays" / f"{Path(name).stem}.png").size == (w, h)


def _load_example(name: str) -> types.ModuleType:
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_own_project_example(tmp_path: Path) -> None:
    example = _load_example("train_own_project")
    args = [
        "--out",
        str(tmp_path / "run"),
        "--max-epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--image-size",
        "32",
    ]
    args += ["--batch-size", "2", "--encoder", "tu-resnet18", "--num-images", "20"]
    results = example.main([*args, "--data-root", str(tmp_path / "data")])
    assert 0.0 <= results["test/dice_ensemble"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "run" / "predictions.png").is_file()


# ----------------------------------------------------------------------------- W&B
def test_wandb_offline_without_login_logs_metrics_and_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import wandb

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLE_GIT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    save_dir = tmp_path / "logs"  # not there yet: W&B used to warn "git root ... does not exist"
    try:
        run_cli(
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.project",
            "gpcps-test",
            "--trainer.logger.save_dir",
            str(save_dir),
            "--trainer.log_every_n_steps",
            "1",
        )
        assert os.environ["WANDB_MODE"] == "offline"
    finally:
        wandb.finish()
        wandb.teardown()  # stop the W&B service: everything is on disk after this
    err = capfd.readouterr().err
    assert "no W&B API key found" in err
    # The library's defaults provoke no W&B warning (Lightning's anonymous=None, a missing run folder).
    assert "anonymous setting" not in err and "git root" not in err and "wandb: WARNING" not in err
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    run = read_wandb_run(run_dir)
    assert run["finished"]
    logged = {k for row in run["history"] for k in row}
    for key in ("train/loss_sup", "train/loss_semi", "train/loss_grad", "train/loss", "val/dice_ensemble"):
        assert key in logged, key
    dice = [row["val/dice_ensemble"] for row in run["history"] if "val/dice_ensemble" in row]
    assert len(dice) == 1 and 0.0 <= dice[0] <= 1.0
    assert run["config"]["lambda_grad"] == pytest.approx(1e-3)
    assert run["config"]["image_size"] == 32  # the datamodule's hyperparameters too
    panels = [row for row in run["history"] if "val/predictions/filenames" in row]
    assert len(panels) == 1
    assert (run_dir / "files" / panels[0]["val/predictions/filenames"][0]).is_file()


@pytest.mark.parametrize(
    ("subcommand", "extra", "logger"),
    [
        ("fit", [], "from_config"),
        ("validate", [], None),
        ("test", [], None),
        ("predict", [], None),
        ("predict", ["--trainer.logger.init_args.name", "other"], None),  # a tweak is no request
        ("test", ["--trainer.logger", "CSVLogger"], "from_config"),  # the config's init_args are kept
        ("predict", ["--trainer.logger=true"], "lightning_logs"),  # Lightning's default logger
    ],
)
def test_evaluation_and_prediction_log_nowhere_unless_asked(
    subcommand: str, extra: list[str], logger: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A config that logs, as the shipped ones do (with CSV instead of W&B: the rule is the same).
    (tmp_path / "logs.yaml").write_text(
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args:\n      save_dir: {tmp_path}\n      name: from_config\n"
    )
    monkeypatch.setattr(GPCPSCLI, "_run_subcommand", lambda self, name: None)  # build only
    args = [subcommand, "--config", TINY, "--config", str(tmp_path / "logs.yaml")]
    cli = run_cli(*args, "--trainer.default_root_dir", str(tmp_path), *extra)
    assert [x.name for x in cli.trainer.loggers] == ([logger] if logger else [])
    # With `logger: null` in the config, Lightning would add its default (TensorBoard/CSV) logger.
    (tmp_path / "default.yaml").write_text("trainer:\n  logger: null\n")
    cli = run_cli(subcommand, "--config", TINY, "--config", str(tmp_path / "default.yaml"))
    assert bool(cli.trainer.loggers) == (subcommand == "fit")


def test_wandb_disabled_falls_back_to_default_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "WandbLogger"]
    cli = GPCPSCLI(args=args, run=False)
    assert isinstance(cli.trainer.logger, (TensorBoardLogger, CSVLogger))
    assert Path(cli.trainer.logger.save_dir) == tmp_path
    assert "WANDB_MODE=disabled, so the W&B logger is replaced" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = GPCPSCLI(args=args, run=False)
    assert isinstance(cli.trainer.logger, WandbLogger)


# ----------------------------------------------------------------------------- other commands
def test_extra_command_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("fake_bench")
    fake.main = lambda argv: received.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(cli_module.EXTRA_COMMANDS, "bench", ("fake_bench", "Benchmark."))
    assert main(["bench", "--steps", "5"]) == 3
    assert received == [["--steps", "5"]]


def test_extra_command_missing_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(
        cli_module.EXTRA_COMMANDS, "reproduce", ("gpcps_lightning._no_such_module", "Reproduce.")
    )
    assert main(["reproduce"]) == 2
    assert "has no gpcps_lightning._no_such_module module" in capsys.readouterr().err
