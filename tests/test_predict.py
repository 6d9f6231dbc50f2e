"""In-memory prediction: preprocessing, resizing back, checkpoint loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gpcps_lightning import GPCPSModule
from gpcps_lightning.checkpointing import read_checkpoint
from gpcps_lightning.inference.predict import (
    Preprocessing,
    Segmenter,
    load_module,
    preprocess,
    resize_to_original,
    to_rgb_array,
)


def test_to_rgb_array_modes() -> None:
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert to_rgb_array(gray).shape == (2, 3, 3) and (to_rgb_array(gray)[..., 2] == gray).all()
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = 7
    assert to_rgb_array(rgba).shape == (2, 3, 3) and to_rgb_array(rgba).max() == 0
    palette = Image.new("P", (5, 4))
    assert to_rgb_array(palette).shape == (4, 5, 3)
    with pytest.raises(TypeError, match="uint8"):
        to_rgb_array(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        to_rgb_array(torch.zeros(2, 2, 3))  # type: ignore[arg-type]


def test_preprocess_hand_worked() -> None:
    image = np.full((2, 2, 3), 128, np.uint8)
    image[0, 0] = (255, 0, 51)
    x, sizes = preprocess([image], Preprocessing(2, mean=0.5, std=0.25))
    assert sizes == [(2, 2)] and x.shape == (1, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == pytest.approx([2.0, -2.0, -1.2])  # (v / 255 - 0.5) / 0.25
    assert x[0, 0, 1, 1].item() == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-6)  # float32


def test_preprocess_resizes_every_image_to_training_size() -> None:
    images = [np.zeros((10, 30, 3), np.uint8), Image.new("L", (7, 13), 255)]
    x, sizes = preprocess(images, Preprocessing((8, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    assert x.shape == (2, 3, 8, 16) and sizes == [(10, 30), (13, 7)]
    assert torch.allclose(x[0], torch.zeros(3, 8, 16)) and torch.allclose(x[1], torch.ones(3, 8, 16))
    with pytest.raises(ValueError, match="empty"):
        preprocess([], Preprocessing(8, 0.5, 0.5))


def test_preprocessing_validation_and_sources() -> None:
    with pytest.raises(ValueError, match="std"):
        Preprocessing(8, 0.5, (0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing((8, 8, 8), 0.5, 0.5)
    with pytest.raises(ValueError, match="does not record the datamodule's mean, std"):
        Preprocessing.from_hparams({"image_size": 64})
    p = Preprocessing.from_hparams(
        {"image_size": 64, "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}, image_size=32
    )
    assert p == Preprocessing((32, 32), (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


def test_resize_to_original() -> None:
    probs = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    (out,) = resize_to_original(probs, [(2, 4)])
    expected = F.interpolate(probs, size=(2, 4), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(out, expected) and out[0].tolist() == [0.0, 0.25, 0.75, 1.0]
    with pytest.raises(ValueError, match="2 original sizes for a batch of 1"):
        resize_to_original(probs, [(2, 2), (3, 3)])


def test_segmenter_masks_match_module_output(tiny_net: dict[str, Any]) -> None:
    module = GPCPSModule(**tiny_net).eval()
    preprocessing = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 24, 3), dtype=np.uint8), Image.new("RGB", (50, 30), (200, 60, 60))]
    segmenter = Segmenter(module, preprocessing, threshold=0.5, device="cpu", batch_size=1)
    masks = segmenter(images)
    assert [m.shape for m in masks] == [(40, 24), (30, 50)] and all(m.dtype == bool for m in masks)
    x, sizes = preprocess(images, preprocessing)
    with torch.no_grad():
        probs = module(x)
    for mask, p in zip(masks, resize_to_original(probs, sizes), strict=True):
        assert np.array_equal(mask, (p >= 0.5).numpy())
    single = segmenter(images[0])  # one image, not a list
    assert len(single) == 1 and np.array_equal(single[0], masks[0])
    with pytest.raises(ValueError, match="threshold"):
        Segmenter(module, preprocessing, threshold=1.0)


def _save_checkpoint(path: Path, module: GPCPSModule, datamodule: bool) -> None:
    ckpt: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # what Lightning calls: stamps the module class
    if datamodule:
        ckpt["datamodule_hyper_parameters"] = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.save(ckpt, path)


def test_segmenter_from_checkpoint(tmp_path: Path, tiny_net: dict[str, Any]) -> None:
    torch.manual_seed(3)
    module = GPCPSModule(**tiny_net, threshold=0.4).eval()
    image = np.random.default_rng(1).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    reference = Segmenter(module, Preprocessing(32, 0.5, 0.25), device="cpu")
    assert reference.threshold == 0.4  # taken from the module

    full = tmp_path / "full.ckpt"
    _save_checkpoint(full, module, datamodule=True)
    loaded = Segmenter.from_checkpoint(full, device="cpu")
    assert isinstance(loaded.module, GPCPSModule) and not loaded.module.training
    assert loaded.preprocessing == Preprocessing(32, 0.5, 0.25)
    assert np.array_equal(loaded(image)[0], reference(image)[0])
    assert np.allclose(loaded.predict_probabilities(image)[0], reference.predict_probabilities(image)[0])

    bare = tmp_path / "bare.ckpt"  # a datamodule without saved hyperparameters
    _save_checkpoint(bare, module, datamodule=False)
    assert isinstance(load_module(bare), GPCPSModule)  # the class is always recorded
    with pytest.raises(ValueError, match="image_size, mean, std"):
        Segmenter.from_checkpoint(bare)
    explicit = Segmenter.from_checkpoint(bare, image_size=32, mean=0.5, std=0.25, device="cpu")
    assert np.array_equal(explicit(image)[0], reference(image)[0])
    with pytest.raises(ValueError, match="model_class=GPCPSModule"):
        load_module({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)})


def test_read_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(broken)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        read_checkpoint(foreign)
