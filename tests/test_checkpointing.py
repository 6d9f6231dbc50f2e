"""Checkpoints: atomic writes, weights-only reads, clear errors for truncated and foreign files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_NET, RandomSemiDataModule, checkpointing_trainer

from gpcps_lightning import GPCPSModule, SupervisedModule
from gpcps_lightning.checkpointing import (
    CHECKPOINT_KEY,
    SafeCheckpointIO,
    atomic_write_bytes,
    read_checkpoint,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_trainer) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    L.seed_everything(0, verbose=False)
    checkpointing_trainer(root).fit(GPCPSModule(**TINY_NET), RandomSemiDataModule())
    return root / "last.ckpt"


def test_checkpoint_is_stamped_and_reads_weights_only(checkpoint: Path) -> None:
    data = read_checkpoint(checkpoint, expected_class=GPCPSModule)
    assert data[CHECKPOINT_KEY]["class"] == "gpcps_lightning.GPCPSModule"
    assert "optimizer_states" in data
    module = GPCPSModule.load_from_checkpoint(checkpoint)
    assert isinstance(module, GPCPSModule)
    assert not list(checkpoint.parent.glob(".*.tmp"))  # no temporary file left behind


def test_truncated_checkpoint_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"broken\.ckpt cannot be read.*truncated"):
        GPCPSModule.load_from_checkpoint(broken)
    with pytest.raises(ValueError, match="truncated"):
        SafeCheckpointIO().load_checkpoint(broken)


@pytest.mark.parametrize(
    ("content", "start"),
    [
        (b"model:\n  class_path: gpcps_lightning.GPCPSModule\n", "the text 'model:' (a text file?)"),
        (b'{"lr": 0.001}', "the text '{\"lr\": 0.001}' (a text file?)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(32), r"the bytes b'\x89PNG\r\n\x1a\n'"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path: Path, content: bytes, start: str) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    for read in (read_checkpoint, SafeCheckpointIO().load_checkpoint, GPCPSModule.load_from_checkpoint):
        with pytest.raises(ValueError) as info:
            read(path)
        message = str(info.value)
        assert f"Checkpoint {path} cannot be read: it is not a PyTorch checkpoint" in message, message
        assert f"starts with {start}." in message
        # PyTorch's advice (load with weights_only=False) is wrong for a file that is no checkpoint.
        assert "weights_only" not in message
    # The checks look at the first bytes only; a real checkpoint's start passes them.
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="was not written by a gpcps_lightning module"):
        read_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        GPCPSModule.load_from_checkpoint(tmp_path / "nope.ckpt")
    # Only the Trainer's checkpoint I/O (reached through --ckpt_path) names that option.
    with pytest.raises(FileNotFoundError) as info:
        read_checkpoint(tmp_path / "nope.ckpt")
    assert str(info.value) == f"Checkpoint file not found: {tmp_path / 'nope.ckpt'}. Check the path."
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt\. Check the path \(and --ckpt_path\)\."):
        SafeCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")


def test_foreign_checkpoints_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"holds a gpcps_lightning.GPCPSModule checkpoint.*GPCPSModule\.load"
    ):
        SupervisedModule.load_from_checkpoint(checkpoint)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, plain)
    with pytest.raises(ValueError, match="not written by a gpcps_lightning module"):
        GPCPSModule.load_from_checkpoint(plain)
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        read_checkpoint(weights)


class _Payload:
    pass


def test_pickled_objects_are_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=False only if you trust"):
        read_checkpoint(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(b"new content", target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # the temporary file was removed
    monkeypatch.undo()
    atomic_write_bytes(b"new content", target)
    assert target.read_bytes() == b"new content"
