"""TorchScript and ONNX exports match PyTorch and are written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpcps_lightning import GPCPSModule
from gpcps_lightning.checkpointing import CHECKPOINT_KEY
from gpcps_lightning.inference.export import ExportedHead, export_onnx, export_torchscript, main
from gpcps_lightning.inference.predict import Preprocessing

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

PRE = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture
def module(tiny_net: dict[str, Any]) -> GPCPSModule:
    torch.manual_seed(0)
    m = GPCPSModule(**tiny_net).eval()
    # Random-init BatchNorm statistics are trivial (mean 0, var 1); give them real values to compare.
    for net in (m.net1, m.net2):
        for layer in net.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    return m


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_exported_head_selects_heads(module: GPCPSModule) -> None:
    x = (inputs(2, 3, 32, 32) - 0.5) / 0.25
    with torch.no_grad():
        heads = module.head_probabilities(x)
        assert torch.equal(ExportedHead(module)(x), heads["ensemble"])
        assert torch.equal(ExportedHead(module, "net2")(x), heads["net2"])
        raw = inputs(2, 3, 32, 32)
        expected = module(
            (raw - torch.tensor(PRE.mean).view(1, 3, 1, 1)) / torch.tensor(PRE.std).view(1, 3, 1, 1)
        )
        assert torch.allclose(ExportedHead(module, preprocessing=PRE)(raw), expected, atol=1e-6)
    with pytest.raises(ValueError, match="`head` must be one of"):
        ExportedHead(module, "teacher")


@pytest.mark.parametrize("head", [None, "net1"])
def test_torchscript_matches_pytorch(module: GPCPSModule, tmp_path: Path, head: str | None) -> None:
    path = export_torchscript(module, tmp_path / "m.pt", head=head, image_size=32)
    extra = {"gpcps.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["gpcps.json"])["gpcps.head"] == (head or "predicting head (forward)")
    for shape in [(3, 3, 32, 32), (1, 3, 64, 48)]:
        x = inputs(*shape)
        with torch.no_grad():
            expected = module(x) if head is None else module.head_probabilities(x)[head]
            torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=0)
    assert module.training is False and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_onnx_matches_pytorch_with_dynamic_shapes(module: GPCPSModule, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    path = export_onnx(module, tmp_path / "m.onnx", preprocessing=PRE, normalize=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one file, weights inside, no temporaries
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["gpcps.mean"]) == pytest.approx(list(PRE.mean))
    assert meta["gpcps.input"].startswith("images in [0, 1]")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1), torch.tensor(PRE.std).view(1, 3, 1, 1)
    for shape in [(3, 3, 32, 32), (1, 3, 64, 48)]:  # batch and image size are dynamic
        x = inputs(*shape)
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = module((x - mean) / std)
        torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=0)


def test_failed_check_leaves_no_file(module: GPCPSModule, tmp_path: Path) -> None:
    target = tmp_path / "m.pt"
    target.write_bytes(b"previous export")
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_torchscript(module, target, image_size=32, atol=-1.0)  # no difference passes atol < 0
    assert target.read_bytes() == b"previous export"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_export_argument_errors(module: GPCPSModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        export_torchscript(module, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="normalize=True"):
        export_torchscript(module, tmp_path / "m.pt", image_size=32, normalize=True)


@pytest.mark.slow
def test_gpcps_export_command(
    module: GPCPSModule, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpcps_lightning.cli import main as gpcps

    ckpt: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {**module.hparams, "_class_path": "gpcps_lightning.GPCPSModule"},
        "datamodule_hyper_parameters": {"image_size": 32, "mean": list(PRE.mean), "std": list(PRE.std)},
        CHECKPOINT_KEY: {"class": "gpcps_lightning.GPCPSModule"},
    }
    torch.save(ckpt, tmp_path / "best.ckpt")
    assert (
        gpcps(["export", str(tmp_path / "best.ckpt"), "--output", str(tmp_path / "m.onnx"), "--normalize"])
        == 0
    )
    assert "Exported onnx model" in capsys.readouterr().out
    assert main([str(tmp_path / "best.ckpt"), "-o", str(tmp_path / "n.pt"), "--head", "net2"]) == 0
    loaded = torch.jit.load(str(tmp_path / "n.pt"))
    x = inputs(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.head_probabilities(x)["net2"], atol=1e-4, rtol=0)
