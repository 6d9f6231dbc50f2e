"""Callbacks: drawing, checkpoint selection, image logging, prediction writing, progress bar, W&B mode."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from gpcps_lightning import GPCPSModule, PredictionBatch
from gpcps_lightning import loggers as gp_loggers
from gpcps_lightning.callbacks import (
    GROUND_TRUTH_COLOR,
    PANEL_COLUMN_TITLES,
    PREDICTION_COLOR,
    BestCheckpoint,
    LossProgressBar,
    PredictionsPicture,
    PredictionWriter,
    ValidationImagePanel,
    display_images,
    overlay_mask,
    panel_scale,
    prediction_panel,
    selection_head,
)
from gpcps_lightning.testing import RandomSquaresDataModule
from gpcps_lightning.tools.wandb_reader import _wandb_records

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*smaller than the logging interval.*", "ignore:.*isinstance\\(treespec, LeafSpec\\).*"
)


# ----------------------------------------------------------------------------- drawing
def test_overlay_mask_hand_worked() -> None:
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:3, 0:3] = True  # a 3x3 square: only its centre (1, 1) is interior, the rest is outline
    out = overlay_mask(image, mask, color=(200, 0, 50), alpha=0.5)
    assert out[1, 1].tolist() == [150, 50, 75]  # 0.5 * 100 + 0.5 * colour
    for r, c in [(0, 0), (0, 2), (2, 0), (2, 2), (1, 2), (2, 1)]:
        assert out[r, c].tolist() == [200, 0, 50]
    assert (out[3] == 100).all() and (out[:, 3] == 100).all()
    assert (image == 100).all()  # the input is not modified


def test_overlay_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mask"):
        overlay_mask(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="alpha"):
        overlay_mask(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool), alpha=1.5)


def test_prediction_panel_layout() -> None:
    images = np.stack([np.full((5, 6, 3), 10, np.uint8), np.full((5, 6, 3), 20, np.uint8)])
    masks = np.zeros((2, 5, 6), bool)
    preds = np.zeros((2, 5, 6), bool)
    masks[1], preds[0] = True, True
    panel = prediction_panel(images, masks, preds, gap=2)
    assert panel.shape == (2 * 5 + 2, 3 * 6 + 2 * 2, 3)
    assert (panel[0:5, 0:6] == 10).all()  # row 0: image
    assert (panel[0:5, 8:14] == 10).all()  # row 0: empty ground truth
    assert panel[0, 16].tolist() == list(PREDICTION_COLOR)  # row 0: full prediction, outline ...
    assert panel[2, 18].tolist() == [109, 19, 19]  # ... and fill: 0.55 * 10 + 0.45 * (230, 30, 30)
    assert (panel[7:12, 8:14][0, 0] == GROUND_TRUTH_COLOR).all()  # row 1: ground truth outline
    assert (panel[5:7] == 255).all() and (panel[:, 6:8] == 255).all()  # white gaps
    with pytest.raises(ValueError, match="masks"):
        prediction_panel(images, masks[:1], preds)


def test_prediction_panel_enlarges_tiles_and_titles_columns() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 10, 3), dtype=np.uint8)
    masks, preds = rng.random((2, 2, 8, 10)) > 0.5
    assert panel_scale(8, 10, 192) == 24 and panel_scale(64, 64, 192) == 3
    assert panel_scale(352, 400, 192) == 1 and panel_scale(64, 64, 1) == 1
    plain = prediction_panel(images, masks, preds, gap=2)
    big = prediction_panel(images, masks, preds, gap=2, scale=24)
    assert big.shape == (2 * 192 + 2, 3 * 240 + 2 * 2, 3)
    for i in range(2):  # nearest neighbour: each pixel of a tile becomes a 24 x 24 block
        for j in range(3):
            tile = plain[i * 10 : i * 10 + 8, j * 12 : j * 12 + 10]
            enlarged = big[i * 194 : i * 194 + 192, j * 242 : j * 242 + 240]
            assert (enlarged == tile.repeat(24, axis=0).repeat(24, axis=1)).all()
    assert PANEL_COLUMN_TITLES == ("image", "ground truth", "prediction")
    titled = prediction_panel(images, masks, preds, gap=2, scale=24, titles=PANEL_COLUMN_TITLES)
    header = titled.shape[0] - big.shape[0]
    assert header == 32 and (titled[header:] == big).all()  # a 20 px font on a 32 px header
    for j in range(3):  # each title in dark pixels above its own column, the gaps left white
        assert (titled[:header, j * 242 : j * 242 + 240].min(axis=-1) < 100).any()
    assert (titled[:header, 240:242] == 255).all() and (titled[:header, 482:484] == 255).all()
    other = prediction_panel(images, masks, preds, gap=2, scale=24, titles=("a", "b", "c"))
    assert (other[:header] != titled[:header]).any() and (other[header:] == big).all()
    with pytest.raises(ValueError, match="`scale` must be a positive integer, got 0"):
        prediction_panel(images, masks, preds, scale=0)
    with pytest.raises(ValueError, match="`titles` must be three column titles"):
        prediction_panel(images, masks, preds, titles=("image", "prediction"))


def test_predictions_picture_tiles_are_large_and_titled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (2, 64, 64, 3), dtype=np.uint8)  # no white: tiles stand out
    masks, preds = rng.random((2, 2, 64, 64)) > 0.5
    PredictionsPicture().write(images, masks, preds, str(tmp_path / "p.png"))
    picture = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
    drawn = picture.sum(axis=-1) < 3 * 250
    rows = np.flatnonzero(drawn[:, picture.shape[1] // 6])  # down the middle of the first column
    top = rows[0]
    while not drawn[top : top + 100, picture.shape[1] // 6].all():  # skip the title to the tile
        top += 1
    middle = drawn[top + 50]
    edges = np.flatnonzero(np.diff(middle.astype(int)))
    widths = edges[1::2] - edges[::2]
    assert len(widths) == 3 and (widths >= 192).all(), widths  # three columns of 64 px images, enlarged
    # Column titles ("image", "ground truth", "prediction (Dice …)") in dark pixels above each tile.
    for left, right in zip(edges[::2], edges[1::2], strict=True):
        assert (picture[:top, left + 1 : right + 1].max(axis=-1) < 100).any()


def test_display_images_denormalizes_or_rescales() -> None:
    dm = RandomSquaresDataModule(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = 2.0  # 0.5 + 0.25 * 2 = 1.0 -> 255
    out = display_images(x, dm)
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0, 0].tolist() == [255, 255, 255] and out[0, 1, 1].tolist() == [128, 128, 128]
    scaled = display_images(torch.tensor([[[[-1.0, 3.0]]]]))  # 1 channel, no datamodule: min-max, gray
    assert scaled.shape == (1, 1, 2, 3) and scaled[0, 0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_selection_head() -> None:
    assert selection_head(SimpleNamespace(selection_head="net2", head_names=("net1", "net2"))) == "net2"
    assert selection_head(SimpleNamespace(head_names=("net1", "net2", "ensemble"))) == "ensemble"
    assert selection_head(SimpleNamespace(head_names=("student",))) == "student"
    assert selection_head(SimpleNamespace()) == "ensemble"


# ----------------------------------------------------------------------------- a training run
def test_checkpoint_panels_and_picture_in_one_run(tmp_path: Path, tiny_net: dict[str, Any]) -> None:
    """Two epochs with a score that never improves after epoch 0, a CSV and a TensorBoard logger."""
    checkpoint = BestCheckpoint(monitor="epoch", mode="min")  # best = epoch 0, never improves
    panel = ValidationImagePanel(every_n_epochs=1, num_images=3)
    picture = PredictionsPicture(path=str(tmp_path / "pictures" / "predictions.png"), num_images=3)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=[CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
        callbacks=[checkpoint, panel, picture],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    module = GPCPSModule(**tiny_net)
    trainer.fit(module, RandomSquaresDataModule(num_train=4, num_val=4))

    folder = tmp_path / "checkpoints"
    assert checkpoint.dirpath == str(folder.resolve())
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    step = {
        p.name: torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in folder.iterdir()
    }
    # Stock ModelCheckpoint (Lightning 2.6) would leave last.ckpt at step 2 here.
    assert step == {"best.ckpt": 2, "last.ckpt": 4}

    # Panels: PNG files for the CSV logger (a title header of 31 px, then 3 rows of 32 px images enlarged
    # six times to 192 px + 2 gaps; 3 tiles + 2 gaps) ...
    pngs = sorted((Path(trainer.loggers[0].log_dir) / "panels").glob("*.png"))
    assert [p.name for p in pngs] == [
        "val_predictions_epoch0000_step0000002.png",
        "val_predictions_epoch0001_step0000004.png",
    ]
    assert np.asarray(Image.open(pngs[0])).shape == (31 + 3 * 192 + 2 * 2, 3 * 192 + 2 * 2, 3)
    # ... and images in TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.loggers[1].log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("val/predictions")] == [2, 4]

    picture_file = tmp_path / "pictures" / "predictions.png"
    with Image.open(picture_file) as image:
        assert image.size == (660, 690)  # 3 tiles of 2.2 in wide; 3 rows of 2.2 in + 0.3 in, at 100 dpi


def test_predictions_picture_warns_without_validation(
    tmp_path: Path, tiny_net: dict[str, Any], tiny_trainer: Any
) -> None:
    picture = PredictionsPicture(path=str(tmp_path / "p.png"))
    trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=1, callbacks=[picture])
    with pytest.warns(UserWarning, match="no validation batch"):
        trainer.fit(GPCPSModule(**tiny_net), RandomSquaresDataModule(num_train=2))
    assert not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------- prediction writer
def _writer_call(writer: PredictionWriter, tmp_path: Path, prediction: torch.Tensor, batch: Any) -> None:
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), datamodule=None)
    writer.write_on_batch_end(trainer, SimpleNamespace(threshold=0.5), prediction, None, batch, 0, 0)


def test_prediction_writer_sizes_threshold_and_names(tmp_path: Path) -> None:
    prediction = torch.stack([torch.full((1, 4, 4), 0.7), torch.full((1, 4, 4), 0.3)])
    prediction[0, 0, :, :2] = 0.2  # left half of image 0 is background
    batch = PredictionBatch(
        image=torch.zeros(2, 3, 4, 4), original_sizes=[(5, 8), (9, 3)], names=["a.jpg", "sub/b.tif"]
    )
    writer = PredictionWriter(output_dir=str(tmp_path / "out"))
    _writer_call(writer, tmp_path, prediction, batch)
    a = np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "masks" / "sub" / "b.png"))
    assert a.shape == (5, 8) and b.shape == (9, 3)
    # Bilinear upsampling of [0.2, 0.2, 0.7, 0.7] to 8 columns crosses 0.5 between columns 3 and 4.
    assert (a[:, :4] == 0).all() and (a[:, 4:] == 255).all()
    assert (b == 0).all()
    # A threshold of its own.
    PredictionWriter(output_dir=str(tmp_path / "t"), threshold=0.1).write_on_batch_end(
        SimpleNamespace(default_root_dir=str(tmp_path), datamodule=None), SimpleNamespace(threshold=0.5),
        prediction, None, batch, 0, 0,
    )  # fmt: skip
    assert (np.asarray(Image.open(tmp_path / "t" / "masks" / "sub" / "b.png")) == 255).all()


def test_prediction_writer_rejects_clashes_and_bad_batches(tmp_path: Path) -> None:
    writer = PredictionWriter(output_dir=str(tmp_path))
    probs = torch.full((2, 1, 4, 4), 0.9)
    clash = PredictionBatch(
        image=torch.zeros(2, 3, 4, 4), original_sizes=[(4, 4)] * 2, names=["x.png", "x.jpg"]
    )
    with pytest.raises(ValueError, match=r"would both be written as 'x\.png'"):
        _writer_call(writer, tmp_path, probs, clash)
    escape = PredictionBatch(image=torch.zeros(1, 3, 4, 4), original_sizes=[(4, 4)], names=["../evil.png"])
    with pytest.raises(ValueError, match="relative path"):
        _writer_call(PredictionWriter(output_dir=str(tmp_path)), tmp_path, probs[:1], escape)
    with pytest.raises(TypeError, match="PredictionBatch"):
        _writer_call(writer, tmp_path, probs, torch.zeros(2, 3, 4, 4))
    short = PredictionBatch(image=torch.zeros(2, 3, 4, 4), original_sizes=[(4, 4)], names=["p", "q"])
    with pytest.raises(ValueError, match="1 sizes and 2 names for 2 images"):
        _writer_call(PredictionWriter(output_dir=str(tmp_path)), tmp_path, probs, short)


def test_prediction_writer_overlay_uses_original_file(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((6, 10, 3), 40, np.uint8)).save(folder / "img.png")
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), datamodule=SimpleNamespace(predict_dir=str(folder))
    )
    batch = PredictionBatch(image=torch.zeros(1, 3, 4, 4), original_sizes=[(6, 10)], names=["img.png"])
    writer = PredictionWriter(output_dir=str(tmp_path / "out"), overlay=True)
    writer.write_on_batch_end(
        trainer, SimpleNamespace(threshold=0.5), torch.zeros(1, 1, 4, 4), None, batch, 0, 0
    )
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / "img.png"))
    assert overlay.shape == (6, 10, 3) and (overlay == 40).all()  # empty prediction: the original image


# ----------------------------------------------------------------------------- progress bar
def test_progress_bar_short_names() -> None:
    trainer = SimpleNamespace(
        progress_bar_metrics={"train/loss_sup": 0.5, "train/loss_semi": 0.25, "train/loss_grad": 0.125},
        loggers=[],
        callback_metrics={"val/dice_ensemble": torch.tensor(0.75)},
    )
    module = SimpleNamespace(head_names=("net1", "net2", "ensemble"))
    items = LossProgressBar().get_metrics(trainer, module)  # type: ignore[arg-type]
    assert items == {"loss_sup": 0.5, "loss_semi": 0.25, "loss_grad": 0.125, "val_dice": 0.75}
    assert "val_dice" not in LossProgressBar(show_val_dice=False).get_metrics(trainer, module)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- W&B without login
@pytest.fixture
def no_wandb_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_goes_offline_without_key(no_wandb_login: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    assert not gp_loggers.wandb_api_key_configured()
    assert gp_loggers.resolve_wandb_mode("runs/x") == "offline"
    assert os.environ["WANDB_MODE"] == "offline"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no W&B API key found" in err and "runs/x/wandb" in err
    # Once set, WANDB_MODE is respected and nothing more is printed.
    assert gp_loggers.resolve_wandb_mode() == "offline" and capsys.readouterr().err == ""


def test_wandb_mode_respects_key_netrc_and_env(
    no_wandb_login: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    no_wandb_login.write_text("machine example.com login user password secret\n")
    assert not gp_loggers.wandb_api_key_configured()  # an entry for another host does not count
    no_wandb_login.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert gp_loggers.wandb_api_key_configured()
    assert gp_loggers.resolve_wandb_mode() == "online" and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.org")
    assert not gp_loggers.wandb_api_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert gp_loggers.wandb_api_key_configured()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert gp_loggers.resolve_wandb_mode() == "disabled"
    assert capsys.readouterr().err == ""


def test_wandb_logger_subclass(no_wandb_login: Path) -> None:
    import os

    logger = gp_loggers.OfflineFallbackWandbLogger(project="p", save_dir=str(no_wandb_login.parent))
    assert os.environ["WANDB_MODE"] == "offline" and logger.name == "p"
    with pytest.raises(ValueError, match="log_model"):
        gp_loggers.OfflineFallbackWandbLogger(project="p", log_model=True)


def test_wandb_init_arguments_provoke_no_warning(no_wandb_login: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    save_dir = no_wandb_login.parent / "runs" / "x"
    stock = WandbLogger(project="p", save_dir=str(save_dir))
    assert stock._wandb_init["anonymous"] is None  # Lightning's default, which W&B warns about
    gp_loggers.quiet_wandb_init(stock)
    assert "anonymous" not in stock._wandb_init
    assert save_dir.is_dir()  # W&B warned "git root ... does not exist" when it looked for git there
    # The library's logger does it itself; a user's own choice is kept.
    logger = gp_loggers.OfflineFallbackWandbLogger(project="p", save_dir=str(save_dir), anonymous=True)
    assert logger._wandb_init["anonymous"] == "allow"
    assert "anonymous" not in gp_loggers.OfflineFallbackWandbLogger(project="p")._wandb_init


def _chunk(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IHB", zlib.crc32(payload), len(payload), kind) + payload


def test_wandb_log_reader_joins_chunks_across_blocks(tmp_path: Path) -> None:
    # A hand-built log: one small record, then a 40000-byte record split over two 32 KiB blocks.
    small, big = b"a" * 10, bytes(range(256)) * 156 + b"z" * 64  # 40000 bytes
    data = b":W&B" + struct.pack("<HB", 0xBEE1, 0) + _chunk(1, small)
    first = 32768 - len(data) - 7
    data += _chunk(2, big[:first])
    assert len(data) == 32768
    data += _chunk(4, big[first:])
    path = tmp_path / "run-x.wandb"
    path.write_bytes(data)
    assert _wandb_records(path) == [small, big]
    path.write_bytes(data[:-5])  # the last chunk still being written
    assert _wandb_records(path) == [small]
    path.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        _wandb_records(path)
