"""`gpcps evaluate`: checkpoints scored on other folders with the library's own test metric."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_NET
from PIL import Image
from torch import Tensor

from gpcps_lightning import (
    CPSModule,
    FolderDataModule,
    GPCPSModule,
    MeanTeacherModule,
    SegmentationModule,
    SupervisedModule,
)
from gpcps_lightning.cli import main as gpcps
from gpcps_lightning.data import generate_synthetic_polyps
from gpcps_lightning.inference.evaluate import (
    EvaluationReport,
    bootstrap_interval,
    evaluate_checkpoints,
    evaluate_module,
    read_evaluation_folder,
    resolve_heads,
)
from gpcps_lightning.inference.predict import Preprocessing, load_module

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*`weights_only` was not set"),
    pytest.mark.filterwarnings("ignore:.*(litlogger|val_dataloader|LeafSpec)"),
]

SIZE = 32  # training size of the checkpoint


def _tiff_masks(root: Path) -> Path:
    """Replace the PNG masks of a generated folder by 16-bit TIFFs (0/65535)."""
    for png in sorted((root / "masks").glob("*.png")):
        mask = np.asarray(Image.open(png)) > 127
        tifffile.imwrite(png.with_suffix(".tif"), mask.astype(np.uint16) * 65535)
        png.unlink()
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three folders: the training draw, another draw of the synthetic data, one with TIFF masks."""
    base = tmp_path_factory.mktemp("folders")
    kwargs: dict[str, Any] = {"min_size": 40, "max_size": 64}
    return {
        "train": generate_synthetic_polyps(base / "train", num_images=6, seed=0, **kwargs),
        "draw": generate_synthetic_polyps(base / "draw", num_images=4, seed=1, **kwargs),
        "tiff": _tiff_masks(generate_synthetic_polyps(base / "tiff", num_images=4, seed=2, **kwargs)),
    }


@pytest.fixture(scope="module")
def checkpoint(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, tiny_trainer: Any) -> Path:
    """A tiny GP-CPS trained two steps on the training draw, saved by the Trainer (datamodule included)."""
    torch.manual_seed(0)
    datamodule = FolderDataModule(
        str(folders["train"]),
        image_size=SIZE,
        batch_size=2,
        num_workers=0,
        labeled_fraction=0.5,
        val_fraction=0.2,
        test_fraction=0.2,
        augment=False,
    )
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(GPCPSModule(**TINY_NET, lambda_grad=0.0), datamodule=datamodule)
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    trainer.save_checkpoint(path)
    return path


def _test_stage(
    trainer: L.Trainer, module: SegmentationModule, root: Path, test: list[str], tmp_path: Path
) -> dict[str, float]:
    """What `Trainer.test` logs for `module` on the images `test` of `root` (FolderDataModule test split)."""
    names = sorted(p.stem for p in (root / "images").iterdir())
    rest = [n for n in names if n not in test]
    splits = {"train": rest[1:], "val": rest[:1], "test": test}
    for key, listed in splits.items():
        (tmp_path / f"{key}.txt").write_text("\n".join(listed) + "\n")
    datamodule = FolderDataModule(
        str(root),
        train_split=str(tmp_path / "train.txt"),
        val_split=str(tmp_path / "val.txt"),
        test_split=str(tmp_path / "test.txt"),
        image_size=SIZE,
        batch_size=1,
        num_workers=0,
        labeled_fraction=0.5,
    )
    (result,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return dict(result)


# ============================================================================ the metric is the library's
@pytest.mark.parametrize("folder", ["draw", "tiff"])
def test_per_image_scores_are_the_test_stage_metric(
    checkpoint: Path, folders: dict[str, Path], folder: str, tmp_path: Path, tiny_trainer: Any
) -> None:
    root = folders[folder]
    report = evaluate_checkpoints([checkpoint], [root], "all", batch_size=1, device="cpu")
    assert [r.head for r in report.results] == ["net1", "net2", "ensemble"]
    module = load_module(checkpoint)
    for i, name in enumerate(sorted(p.stem for p in (root / "images").iterdir())):
        logged = _test_stage(tiny_trainer(), module, root, [name], tmp_path)
        for result in report.results:
            score = result.images[i]
            assert score.name == name
            assert score.dice is not None and score.iou is not None
            assert score.dice == pytest.approx(logged[f"test/dice_{result.head}"], abs=1e-6)
            assert score.iou == pytest.approx(logged[f"test/iou_{result.head}"], abs=1e-6)
    # The scores are not trivial: the comparison above would pass for a constant model otherwise.
    assert len({s.dice for r in report.results for s in r.images if 0.0 < s.dice < 1.0}) >= 4  # type: ignore[operator]


class _Brightness(SegmentationModule):
    """Foreground everywhere on bright images (normalised mean > 0), nowhere on dark ones."""

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:
        bright = (images.mean(dim=(1, 2, 3), keepdim=True) > 0).float()
        return {"net1": bright.expand(-1, 1, *images.shape[-2:]).contiguous()}


def _write(root: Path, name: str, value: int, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*mask.shape, 3), value, np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(mask * np.uint8(255)).save(root / "masks" / f"{name}.png")


def test_empty_prediction_and_mask_are_left_out_as_the_test_stage_does(
    tmp_path: Path, tiny_trainer: Any
) -> None:
    empty, rect = np.zeros((30, 40), np.uint8), np.zeros((30, 40), np.uint8)
    rect[5:15, 10:30] = 1  # 200 of 1200 pixels
    root = tmp_path / "data"
    _write(root, "a_dark_empty", 20, empty)  # prediction and mask empty: no score
    _write(root, "b_dark_rect", 20, rect)  # empty prediction: Dice 0
    _write(root, "c_bright_empty", 230, empty)  # empty mask: Dice 0
    _write(root, "d_bright_rect", 230, rect)  # full prediction: Dice 2*200/(200+1200), IoU 200/1200
    for k in range(3):
        _write(root, f"z{k}", 230, rect)
    module = _Brightness()
    preprocessing = Preprocessing(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pairs = read_evaluation_folder(root)[:4]
    (scores,) = evaluate_module(module, pairs, preprocessing, device="cpu").values()
    assert [(s.name, s.dice, s.iou) for s in scores] == [
        ("a_dark_empty", None, None),
        ("b_dark_rect", 0.0, 0.0),
        ("c_bright_empty", 0.0, 0.0),
        ("d_bright_rect", pytest.approx(400 / 1400), pytest.approx(200 / 1200)),
    ]
    logged = _test_stage(tiny_trainer(), module, root, [p.name for p in pairs], tmp_path)
    assert logged["test/dice_net1"] == pytest.approx((400 / 1400) / 3, abs=1e-6)  # mean of three, not four
    assert logged["test/iou_net1"] == pytest.approx((200 / 1200) / 3, abs=1e-6)
    assert math.isnan(_test_stage(tiny_trainer(), module, root, ["a_dark_empty"], tmp_path)["test/dice_net1"])
    # A module still attached to its Trainer (as after trainer.test) is scored the same and left as it
    # was: its Trainer, metrics, threshold and mode.
    trainer = module.trainer
    module.train()
    assert evaluate_module(module, pairs, preprocessing, "net1", device="cpu") == {"net1": scores}
    assert module.trainer is trainer and module.threshold == 0.5 and module.training
    assert all(type(m).__name__ == "MetricCollection" for m in module.test_metrics.values())


def test_threshold_defaults_to_the_checkpoint_and_can_be_overridden(
    checkpoint: Path, folders: dict[str, Path]
) -> None:
    default = evaluate_checkpoints([checkpoint], [folders["draw"]], device="cpu").results[0]
    high = evaluate_checkpoints([checkpoint], [folders["draw"]], device="cpu", threshold=0.9).results[0]
    assert default.threshold == 0.5 and high.threshold == 0.9
    assert default.image_size == (SIZE, SIZE) and default.method == "GPCPSModule"
    assert [s.dice for s in high.images] != [s.dice for s in default.images]


# ============================================================================ heads, bootstrap, JSON
def test_default_head_is_the_selection_head() -> None:
    expected: dict[type[SegmentationModule], str] = {
        GPCPSModule: "ensemble",
        CPSModule: "ensemble",
        MeanTeacherModule: "teacher",
        SupervisedModule: "net1",
    }
    for cls, head in expected.items():
        assert resolve_heads(cls) == (head,)
        assert resolve_heads(cls, "all") == cls.head_names
        assert resolve_heads(cls, cls.head_names[-1]) == cls.head_names[-1:]
    assert resolve_heads(SupervisedModule(**TINY_NET)) == ("net1",)  # an instance works too
    with pytest.raises(ValueError, match=r"Unknown head 'ensemble' for MeanTeacherModule, whose heads are"):
        resolve_heads(MeanTeacherModule, "ensemble")


def test_bootstrap_interval() -> None:
    values = np.random.default_rng(0).uniform(0.2, 0.9, 40)
    low, high = bootstrap_interval(values, resamples=2000, seed=3)
    assert low < values.mean() < high and high - low < 0.2
    assert bootstrap_interval(values, resamples=2000, seed=3) == (low, high)  # reproducible
    assert bootstrap_interval(values, resamples=2000, seed=4) != (low, high)
    narrow = bootstrap_interval(values, resamples=2000, seed=3, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_interval([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.7))
    assert bootstrap_interval([0.4]) == (pytest.approx(0.4), pytest.approx(0.4))


def test_report_interval_table_and_json_round_trip(
    checkpoint: Path, folders: dict[str, Path], tmp_path: Path
) -> None:
    folders_ = [folders["draw"], folders["tiff"]]
    report = evaluate_checkpoints([checkpoint], folders_, device="cpu", resamples=500, seed=1)
    assert report == evaluate_checkpoints([checkpoint], folders_, device="cpu", resamples=500, seed=1)
    for result in report.results:
        assert result.head == "ensemble" and result.n_images == 4 and result.n_both_empty == 0
        assert result.dice_interval is not None and result.mean_dice is not None
        assert result.dice_interval[0] <= result.mean_dice <= result.dice_interval[1]
        dice = [s.dice for s in result.images]
        assert result.dice_interval == bootstrap_interval(dice, 500, 0.95, 1)  # type: ignore[arg-type]
    table = report.to_markdown().splitlines()
    assert table[0].startswith("| checkpoint | folder | head | images |") and len(table) == 2 + 2 + 2
    assert f"| {report.results[1].mean_dice:.4f} |" in table[3]

    path = report.save_json(tmp_path / "out" / "external.json")
    assert EvaluationReport.load_json(path) == report
    data = json.loads(path.read_text())
    assert data["bootstrap"] == {"resamples": 500, "confidence": 0.95, "seed": 1}
    first = data["results"][0]
    assert first["folder"] == str(folders["draw"]) and first["n_images"] == 4
    assert [s["name"] for s in first["images"]] == [f"synth_{k:05d}" for k in range(4)]
    assert set(first["images"][0]) == {"name", "dice", "iou"}
    # A missing score is written as null and read back as None.
    empty = EvaluationReport.from_dict(
        {**data, "results": [{**first, "images": [{"name": "x", "dice": None, "iou": None}]}]}
    )
    assert empty.results[0].mean_dice is None and empty.results[0].n_both_empty == 1
    assert "| n/a |" in EvaluationReport(empty.results).to_markdown()


# ============================================================================ command line
def test_command_line(
    checkpoint: Path, folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "external.json"
    argv = [str(checkpoint), "--folders", str(folders["draw"]), str(folders["tiff"]), "--device", "cpu"]
    assert gpcps(["evaluate", *argv, "--batch-size", "3", "--json", str(out), "--head", "all"]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith(f"| {checkpoint} |")]
    assert len(rows) == 6 and "Per-image scores written to" in captured.err
    report = EvaluationReport.load_json(out)
    api = evaluate_checkpoints(
        [checkpoint], [folders["draw"], folders["tiff"]], "all", batch_size=3, device="cpu"
    )
    assert report == api
    assert gpcps(["evaluate", *argv[:3], "--head", "net2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {checkpoint} |")]
    assert len(rows) == 1 and "| net2 |" in rows[0]


# ============================================================================ errors
def _exit_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert gpcps(["evaluate", *argv]) == 2
    return capsys.readouterr().err


def test_evaluate_rejections(
    checkpoint: Path,
    folders: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draw = str(folders["draw"])
    err = _exit_message([str(tmp_path / "nope.ckpt"), "--folders", draw], capsys)
    assert "gpcps evaluate: error: Checkpoint file not found:" in err and "nope.ckpt" in err
    monkeypatch.setenv("GPCPS_TRACEBACK", "1")  # the traceback on request
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        gpcps(["evaluate", str(tmp_path / "nope.ckpt"), "--folders", draw])
    monkeypatch.delenv("GPCPS_TRACEBACK")
    err = _exit_message([str(checkpoint), "--folders", draw, "--head", "teacher"], capsys)
    assert "Unknown head 'teacher' for GPCPSModule, whose heads are net1, net2, ensemble" in err

    no_masks = tmp_path / "no_masks"
    (no_masks / "images").mkdir(parents=True)
    err = _exit_message([str(checkpoint), "--folders", str(no_masks)], capsys)
    assert f"Evaluation folder {no_masks} has no masks/ folder" in err
    with pytest.raises(FileNotFoundError, match="has no images/ and no masks/ folder"):
        read_evaluation_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_evaluation_folder(tmp_path / "missing")

    unpaired = tmp_path / "unpaired"
    _write(unpaired, "a", 100, np.ones((8, 8), np.uint8))
    _write(unpaired, "b", 100, np.ones((8, 8), np.uint8))
    (unpaired / "masks" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) in .* have no mask in .*: b"):
        read_evaluation_folder(unpaired)
    (unpaired / "masks" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Cannot read .*b\.png"):
        read_evaluation_folder(unpaired)

    run: dict[str, Any] = {"device": "cpu"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"threshold": 1.0}, r"`threshold` must be in \(0, 1\)"),
        ({"num_workers": -1}, "`num_workers` must be a non-negative integer"),
        ({"device": "gpu"}, "`device` must be 'cpu', 'cuda' or 'cuda:N'"),
        ({"resamples": 0}, "`resamples` must be a positive integer"),
        ({"confidence": 1.0}, r"`confidence` must be in \(0, 1\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            evaluate_checkpoints([checkpoint], [draw], **{**run, **kwargs})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            evaluate_checkpoints([checkpoint], [draw], device="cuda")
    with pytest.raises(ValueError, match="Give at least one checkpoint"):
        evaluate_checkpoints([], [draw])
    with pytest.raises(ValueError, match="Give at least one folder"):
        evaluate_checkpoints([checkpoint], [])
    for values in ([], [0.5, float("nan")]):
        with pytest.raises(ValueError, match="`values` must be a non-empty sequence of finite numbers"):
            bootstrap_interval(values)

    with pytest.raises(FileNotFoundError, match=r"Evaluation report .* does not exist"):
        EvaluationReport.load_json(tmp_path / "none.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not an evaluation report written by `gpcps evaluate --json`"):
        EvaluationReport.load_json(tmp_path / "other.json")
    with pytest.raises(SystemExit):
        gpcps(["evaluate", str(checkpoint), "--folders", draw, "--model-class", "GPCPSModule"])
    assert "--model-class 'GPCPSModule' cannot be imported" in capsys.readouterr().err
