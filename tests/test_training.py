"""The one Trainer factory (gpcps_lightning.training) and the checkpoint policy it shares with the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_NET, RandomSemiDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from gpcps_lightning import SupervisedModule
from gpcps_lightning.callbacks import BestCheckpoint, LRSchedule, TrainingClock
from gpcps_lightning.checkpointing import SafeCheckpointIO
from gpcps_lightning.training import TrainingSpec, build_trainer, evaluation_trainer


class _Scored(SupervisedModule):
    """Logs ``val/score``, chosen by the test: ``scores[k]`` at the k-th validation of this module."""

    def __init__(self, scores: list[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scores = scores
        self.validations = 0

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/score", self.scores[self.validations])
        self.validations += 1


def test_the_record_is_the_trainers_arguments(tmp_path: Path) -> None:
    spec = TrainingSpec(max_steps=12, val_every=4, precision="bf16-mixed", accelerator="cpu")
    trainer, checkpoint = build_trainer(spec, tmp_path, monitor="val/dice_net1")
    record = spec.record()
    assert record == {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "bf16-mixed",
        "max_steps": 12,
        "val_check_interval": 4,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "lr_schedule": "constant",
    }
    assert trainer.max_steps == 12 and trainer.val_check_interval == 4 and trainer.num_sanity_val_steps == 0
    assert trainer.check_val_every_n_epoch is None and trainer.precision == "bf16-mixed"
    assert trainer.callbacks[0] is checkpoint and checkpoint.monitor == "val/dice_net1"
    assert Path(checkpoint.dirpath or "") == tmp_path / "checkpoints" and checkpoint.save_last
    assert not any(isinstance(c, LRSchedule) for c in trainer.callbacks)
    assert isinstance(trainer.logger, CSVLogger) and Path(trainer.logger.root_dir) == tmp_path / "logs"
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    cosine, _ = build_trainer(TrainingSpec(8, 4, lr_schedule="cosine", accelerator="cpu"), tmp_path / "c")
    assert [type(c) for c in cosine.callbacks if isinstance(c, LRSchedule)] == [LRSchedule]
    assert evaluation_trainer(spec, tmp_path).logger is None
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \('constant', 'cosine'\), got 'step'"):
        TrainingSpec(8, 4, lr_schedule="step")  # type: ignore[arg-type]


def test_last_checkpoint_is_the_latest_validation_not_the_last_best(tmp_path: Path) -> None:
    class Falling(L.LightningModule):
        """A score that only falls: the best is the first validation, the latest the third."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return (self.weight * batch[0]).sum()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/score", 1.0 / (1 + self.global_step))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=1)
    trainer, _ = build_trainer(TrainingSpec(3, 1, accelerator="cpu"), tmp_path, monitor="val/score")
    trainer.fit(Falling(), loader, loader)
    folder = tmp_path / "checkpoints"
    steps = {
        name: torch.load(folder / f"{name}.ckpt", map_location="cpu", weights_only=False)["global_step"]
        for name in ("best", "last")
    }
    assert steps == {"best": 1, "last": 3}
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_run_saved_by_the_old_runners_callbacks_resumes_with_its_best_score(tmp_path: Path) -> None:
    """The runner kept two plain ModelCheckpoints before the factory: their best score carries over."""
    data = RandomSemiDataModule(length=4)
    scores = [0.2, 0.9, 0.5]
    folder = tmp_path / "run"
    # the old runner's Trainer, stopped at step 4 (validations at 2 and 4)
    best = ModelCheckpoint(
        dirpath=folder / "checkpoints", filename="best", monitor="val/score", mode="max",
        auto_insert_metric_name=False,
    )  # fmt: skip
    latest = ModelCheckpoint(
        dirpath=folder / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    old = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, check_val_every_n_epoch=None, val_check_interval=2,
        num_sanity_val_steps=0, callbacks=[best, latest], logger=False, plugins=[SafeCheckpointIO()],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
    )  # fmt: skip
    torch.manual_seed(0)
    old.fit(_Scored(scores, **TINY_NET), data)
    assert best.best_model_score == pytest.approx(0.9)
    trainer, checkpoint = build_trainer(
        TrainingSpec(max_steps=6, val_every=2, accelerator="cpu"), folder, monitor="val/score"
    )
    module = _Scored(scores[2:], **TINY_NET)
    with pytest.warns(UserWarning, match="Please add the following callbacks"):  # the `last` one's state
        trainer.fit(module, data, ckpt_path=str(folder / "checkpoints" / "last.ckpt"))
    # step 6 scored 0.5 < 0.9: without the old state the first validation after the restart would be best
    assert checkpoint.best_model_score == pytest.approx(0.9)
    assert Path(checkpoint.best_model_path).name == "best.ckpt"
    assert (folder / "checkpoints" / "last.ckpt").is_file() and trainer.global_step == 6


def test_the_best_checkpoint_state_is_taken_over_only_when_its_own_is_missing() -> None:
    callback = BestCheckpoint(dirpath="x", monitor="val/score")
    own, legacy = callback.state_key, callback.state_key.replace("BestCheckpoint", "ModelCheckpoint", 1)
    assert own.startswith("BestCheckpoint{") and legacy != own
    checkpoint: dict[str, Any] = {"callbacks": {legacy: {"best_model_score": 1.0}}}
    callback.on_load_checkpoint(None, None, checkpoint)  # type: ignore[arg-type]
    assert checkpoint["callbacks"] == {own: {"best_model_score": 1.0}}
    both: dict[str, Any] = {"callbacks": {legacy: {"best_model_score": 1.0}, own: {"best_model_score": 2.0}}}
    callback.on_load_checkpoint(None, None, both)  # type: ignore[arg-type]
    assert both["callbacks"][own] == {"best_model_score": 2.0} and legacy in both["callbacks"]
    other = BestCheckpoint(dirpath="x", monitor="val/other")
    unrelated: dict[str, Any] = {"callbacks": {legacy: {"best_model_score": 1.0}}}
    other.on_load_checkpoint(None, None, unrelated)  # type: ignore[arg-type]
    assert unrelated["callbacks"] == {legacy: {"best_model_score": 1.0}}


def test_selected_checkpoint_is_the_callbacks_inside_the_folder_else_best_ckpt(tmp_path: Path) -> None:
    from gpcps_lightning.training import selected_checkpoint

    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    callback = BestCheckpoint(dirpath=str(folder / "checkpoints"))
    assert selected_checkpoint(callback, folder) is None  # nothing selected, no best.ckpt
    (folder / "checkpoints" / "best.ckpt").write_bytes(b"x")
    assert selected_checkpoint(callback, folder) == folder / "checkpoints" / "best.ckpt"
    callback.best_model_path = str(folder / "checkpoints" / "best-v1.ckpt")
    assert selected_checkpoint(callback, folder) == folder / "checkpoints" / "best-v1.ckpt"
    # restored from a run whose folder was moved: the state names the old folder
    callback.best_model_path = str(tmp_path / "old" / "checkpoints" / "best.ckpt")
    assert selected_checkpoint(callback, folder) == folder / "checkpoints" / "best.ckpt"


# ---------------------------------------------------------------- the training clock
def test_the_clock_adds_the_restored_seconds_to_this_fits() -> None:
    now = [10.0]
    clock = TrainingClock(clock=lambda: now[0])
    assert clock.seconds == 0.0 and clock.restored_seconds is None
    clock.setup(None, None, "fit")  # type: ignore[arg-type]
    now[0] = 13.0
    saved = clock.state_dict()
    assert saved == {"seconds": 3.0} and clock.restored_seconds is None
    resumed = TrainingClock(clock=lambda: now[0])
    now[0] = 100.0
    resumed.setup(None, None, "fit")  # type: ignore[arg-type]
    resumed.load_state_dict(saved)  # Lightning restores callback states after setup
    now[0] = 104.0
    assert resumed.restored_seconds == 3.0 and resumed.seconds == pytest.approx(7.0)
    resumed.setup(None, None, "validate")  # only fit starts a part
    assert resumed.seconds == pytest.approx(7.0)


def test_a_resumed_fit_restores_the_clock_of_its_checkpoint(tmp_path: Path) -> None:
    data = RandomSemiDataModule(length=4)
    first = TrainingClock()
    trainer, _ = build_trainer(
        TrainingSpec(max_steps=2, val_every=2, accelerator="cpu"), tmp_path, monitor="val/score",
        callbacks=[first],
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(_Scored([0.1, 0.2], **TINY_NET), data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]["TrainingClock"]["seconds"]
    assert 0.0 < saved <= first.seconds
    second = TrainingClock()
    trainer, _ = build_trainer(
        TrainingSpec(max_steps=4, val_every=2, accelerator="cpu"), tmp_path, monitor="val/score",
        callbacks=[second],
    )  # fmt: skip
    trainer.fit(_Scored([0.3], **TINY_NET), data, ckpt_path=str(last))
    assert second.restored_seconds == saved and second.seconds > saved
