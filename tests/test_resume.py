"""Exact resume: an interrupted and resumed run ends with the same weights as an uninterrupted one (CPU).

The data side's draws (augmentation, fusion weights) come from private streams keyed by the data seed and
the stream position, so they replay without saved state; what a method draws from the global random
state (Mean Teacher's noise) replays from the random states saved in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_NET, tiny_synthetic_datamodule, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from gpcps_lightning import GPCPSModule, MeanTeacherModule, SegmentationModule, SyntheticPolypDataModule
from gpcps_lightning.cli import GPCPSCLI

STEPS_PER_EPOCH = 3
TINY = str(Path(__file__).parent / "conf" / "tiny_gpcps.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _datamodule(root: Path) -> SyntheticPolypDataModule:
    # augmentation on: its random draws are part of what must be replayed
    return tiny_synthetic_datamodule(root, steps_per_epoch=STEPS_PER_EPOCH, augment=True)


def _run(
    root: Path,
    out: Path,
    ckpt_path: Path | None = None,
    extra_callbacks: list | None = None,
    method: type[SegmentationModule] = GPCPSModule,
    **trainer_kwargs,
) -> tuple[SegmentationModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    if method is MeanTeacherModule:  # noise drawn from the global random state at every step
        module: SegmentationModule = MeanTeacherModule(rampup_steps=0, **TINY_NET)
    else:
        module = method(**TINY_NET)  # GP-CPS: the penalty and pseudo labels use the batch's eps
    checkpoint = ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)
    trainer = tiny_trainer(
        deterministic=True,
        enable_checkpointing=True,
        limit_val_batches=1,
        num_sanity_val_steps=2,  # Lightning's default, as in real runs
        callbacks=[checkpoint, *(extra_callbacks or [])],
        default_root_dir=out,
        **trainer_kwargs,
    )
    trainer.fit(module, _datamodule(root), ckpt_path=ckpt_path)
    return module, trainer


def _differing_weights(a: SegmentationModule, b: SegmentationModule) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def _assert_identical(a: SegmentationModule, b: SegmentationModule) -> None:
    different = _differing_weights(a, b)
    assert not different, different[:5]


def test_resume_at_an_epoch_boundary_is_bit_identical(data_root: Path, tmp_path: Path) -> None:
    full, full_trainer = _run(data_root, tmp_path / "full", max_epochs=2)
    assert full_trainer.global_step == 2 * STEPS_PER_EPOCH
    _, first = _run(data_root, tmp_path / "part", max_epochs=1)
    assert first.global_step == STEPS_PER_EPOCH
    # A different global random state before resuming: the checkpoint's must replace it.
    torch.manual_seed(12345)
    resumed, trainer = _run(
        data_root, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt", max_epochs=2
    )
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    _assert_identical(full, resumed)


def test_resume_mid_epoch_is_bit_identical(data_root: Path, tmp_path: Path) -> None:
    # The uninterrupted run also writes a checkpoint after step 4, i.e. after the first step of epoch 2.
    mid = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=STEPS_PER_EPOCH + 1, save_top_k=-1)
    full, _ = _run(data_root, tmp_path / "full", max_epochs=2, extra_callbacks=[mid])
    (written,) = (tmp_path / "mid").glob("*.ckpt")
    assert "step=4" in written.name
    resumed, trainer = _run(data_root, tmp_path / "part", ckpt_path=written, max_epochs=2)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    _assert_identical(full, resumed)


def test_gpcps_resume_needs_no_saved_random_state(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GP-CPS draws nothing from the global random state: its augmentations and eps replay by position."""
    full, _ = _run(data_root, tmp_path / "full", max_epochs=2)
    _run(data_root, tmp_path / "part", max_epochs=1)
    monkeypatch.setattr("gpcps_lightning.methods.base.restore_rng_state", lambda state: None)
    torch.manual_seed(12345)
    resumed, _ = _run(data_root, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt", max_epochs=2)
    _assert_identical(full, resumed)


def test_mean_teacher_resume_replays_its_noise(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved random states matter for a method that draws; without them the resumed run drifts."""
    full, _ = _run(data_root, tmp_path / "full", max_epochs=2, method=MeanTeacherModule)
    _run(data_root, tmp_path / "part", max_epochs=1, method=MeanTeacherModule)
    last = tmp_path / "part" / "last.ckpt"
    torch.manual_seed(12345)
    resumed, _ = _run(data_root, tmp_path / "resumed", ckpt_path=last, max_epochs=2, method=MeanTeacherModule)
    _assert_identical(full, resumed)
    # Control: without restoring the saved states, the noise differs and so do the weights.
    monkeypatch.setattr("gpcps_lightning.methods.base.restore_rng_state", lambda state: None)
    torch.manual_seed(12345)
    drifted, _ = _run(data_root, tmp_path / "drifted", ckpt_path=last, max_epochs=2, method=MeanTeacherModule)
    with pytest.raises(AssertionError):
        _assert_identical(full, drifted)


def test_resume_with_another_data_seed_is_refused() -> None:
    data = SyntheticPolypDataModule(root="unused", num_images=4, seed=1)
    data.load_state_dict({})  # a checkpoint without data position (e.g. another datamodule's) is fine
    with pytest.raises(ValueError, match="trained with data seed 0, this datamodule has seed 1"):
        data.load_state_dict({"epoch": 0, "steps_done": 2, "seed": 0})


# ----------------------------------------------------------------------------- through the command line
def _cli_fit(root: Path, out: Path, limit: str, *args: str) -> GPCPSCLI:
    """`gpcps fit` of the tiny GP-CPS on the module's synthetic images, 8 steps per epoch cut by `limit`.

    Like the quickstart: `max_steps` set (which changes how Lightning resumes), a worker process (which
    builds the first batches as soon as Lightning creates the loader's iterator) and augmentation on.
    """
    return GPCPSCLI(
        args=[
            "fit",
            "--config",
            TINY,
            "--data",
            "gpcps_lightning.SyntheticPolypDataModule",
            "--data.root",
            str(root),
            "--data.num_images",
            "20",
            "--data.image_size",
            "32",
            "--data.batch_size",
            "2",
            "--data.labeled_fraction",
            "0.25",
            "--data.num_workers",
            "1",
            "--trainer.limit_train_batches",
            limit,
            "--trainer.limit_val_batches",
            "1",
            "--trainer.max_steps",
            "100",
            "--trainer.deterministic",
            "true",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(out),
            *args,
        ]
    )


@pytest.mark.filterwarnings(
    "ignore:LightningCLI's args parameter is intended",
    "ignore:.*callbacks used to create the checkpoint need to be provided.*",
)
@pytest.mark.parametrize(("limit", "epoch_steps"), [("3", 3), ("0.5", 4)])
@pytest.mark.slow  # five CLI trainings per case; the resume tests above stay in the default tier
def test_cli_resume_with_limit_train_batches_is_bit_identical(
    data_root: Path, tmp_path: Path, limit: str, epoch_steps: int
) -> None:
    """Epochs cut short by `--trainer.limit_train_batches` (int or fraction) resume exactly.

    From the `last.ckpt` of a run stopped by `max_epochs` (epoch boundary), from a checkpoint written after
    the last step of the cut epoch and from one written in the middle of the next epoch: the same global
    step and bit-identical weights as the uninterrupted run.
    """
    every_step = tmp_path / "every_step"
    full = _cli_fit(
        data_root,
        tmp_path / "full",
        limit,
        "--trainer.max_epochs",
        "2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(every_step),
        "--trainer.callbacks.filename",
        "{step}",
        "--trainer.callbacks.every_n_train_steps",
        "1",
        "--trainer.callbacks.save_top_k",
        "-1",
    )
    assert full.trainer.num_training_batches == epoch_steps
    assert full.trainer.global_step == 2 * epoch_steps

    part = _cli_fit(data_root, tmp_path / "part", limit, "--trainer.max_epochs", "1")
    assert part.trainer.global_step == epoch_steps
    starts = {
        "epoch-boundary": tmp_path / "part" / "checkpoints" / "last.ckpt",
        "after-last-step-of-cut-epoch": every_step / f"step={epoch_steps}.ckpt",
        "mid-epoch": every_step / f"step={epoch_steps + 1}.ckpt",
    }
    wrong = {}
    for where, ckpt in starts.items():
        resumed = _cli_fit(
            data_root, tmp_path / where, limit, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)
        )
        step, different = resumed.trainer.global_step, _differing_weights(full.model, resumed.model)
        if step != 2 * epoch_steps or different:
            wrong[where] = f"global_step {step}, {len(different)} tensors differ"
    assert not wrong, wrong
