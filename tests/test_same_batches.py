"""Every method sees the same batches: images, masks, augmentations and fusion weights, for one data seed.

The draws of the data side come from private streams keyed by the datamodule's seed and the samples'
stream positions (``gpcps_lightning.data.streams``), so what a method draws from the global random
state (network initialisation, Mean Teacher's noise, ...) cannot change them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_NET, random_semi_batch, tiny_synthetic_datamodule, tiny_trainer

from gpcps_lightning import (
    CPSModule,
    GPCPSModule,
    MeanTeacherModule,
    PSMTModule,
    SemiSupervisedBatch,
    SupervisedModule,
    SyntheticPolypDataModule,
)
from gpcps_lightning.data import CompactTrainBatch, SemiSupervisedPairSampler
from gpcps_lightning.data.streams import AUGMENTATION_STREAM, FUSION_STREAM, fusion_weights, stream_seed

STEPS = 3
BATCH = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _datamodule(root: Path, seed: int = 0) -> SyntheticPolypDataModule:
    # 2 steps per epoch: the 3 steps of a run cross an epoch boundary
    return tiny_synthetic_datamodule(root, batch_size=BATCH, steps_per_epoch=2, seed=seed)


class _Recorder(L.Callback):
    """Keeps a copy of every training batch as the step receives it."""

    def __init__(self) -> None:
        self.batches: list[SemiSupervisedBatch] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(
            SemiSupervisedBatch(
                labeled=batch.labeled.detach().clone(),
                mask=batch.mask.detach().clone(),
                unlabeled=batch.unlabeled.detach().clone(),
                eps=None if batch.eps is None else batch.eps.detach().clone(),
            )
        )


def _train(module: L.LightningModule, root: Path, global_seed: int, data_seed: int = 0) -> list:
    L.seed_everything(global_seed, verbose=False)
    recorder = _Recorder()
    trainer = tiny_trainer(max_steps=STEPS, callbacks=[recorder])
    trainer.fit(module, _datamodule(root, data_seed))
    assert len(recorder.batches) == STEPS
    return recorder.batches


def _fields(batch: SemiSupervisedBatch) -> dict[str, torch.Tensor | None]:
    return {"labeled": batch.labeled, "mask": batch.mask, "unlabeled": batch.unlabeled, "eps": batch.eps}


def _assert_same(a: list[SemiSupervisedBatch], b: list[SemiSupervisedBatch]) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for name, value in _fields(x).items():
            other = _fields(y)[name]
            assert value is not None and other is not None, (step, name)
            assert torch.equal(value, other), (step, name)


def test_every_method_sees_the_same_batches(data_root: Path) -> None:
    # Different global seeds too: nothing the data side draws may come from the global random state.
    reference = _train(SupervisedModule(**TINY_NET), data_root, global_seed=0)
    assert reference[0].eps is not None and reference[0].eps.shape == (BATCH, 1, 1, 1)
    assert not torch.equal(reference[0].eps, reference[1].eps)  # fresh weights every step
    methods = {
        "gpcps": GPCPSModule(**TINY_NET),
        "gpcps_row_I": GPCPSModule(lambda_grad=0.0, lambda_semi=0.0, **TINY_NET),
        "cps": CPSModule(**TINY_NET),
        "mean_teacher": MeanTeacherModule(rampup_steps=0, **TINY_NET),  # draws noise every step
        "psmt": PSMTModule(warmup_steps=0, **TINY_NET),  # draws CutMix boxes and T-VAT directions
    }
    for k, (name, module) in enumerate(methods.items()):
        batches = _train(module, data_root, global_seed=100 + k)
        try:
            _assert_same(reference, batches)
        except AssertionError as err:
            raise AssertionError(f"{name} saw other batches than the supervised UNet: {err}") from err


def test_another_data_seed_gives_other_batches(data_root: Path) -> None:
    a = _train(SupervisedModule(**TINY_NET), data_root, global_seed=0, data_seed=0)
    b = _train(SupervisedModule(**TINY_NET), data_root, global_seed=0, data_seed=1)
    for x, y in zip(a, b, strict=True):
        assert x.eps is not None and y.eps is not None
        assert not torch.equal(x.eps, y.eps)
        assert not torch.equal(x.labeled, y.labeled)


def test_gpcps_fuses_with_the_batch_weights(monkeypatch: pytest.MonkeyPatch, tiny_net: dict) -> None:
    used: list[torch.Tensor] = []
    import gpcps_lightning.methods.gpcps as module_file

    real_fuse = module_file.fuse_images

    def fuse(labeled: torch.Tensor, unlabeled: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        used.append(eps)
        return real_fuse(labeled, unlabeled, eps)

    monkeypatch.setattr(module_file, "fuse_images", fuse)
    batch = random_semi_batch(n=3)
    batch.eps = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1)
    GPCPSModule(**tiny_net).compute_losses(batch)
    torch.testing.assert_close(used[-1], batch.eps, rtol=0, atol=0)
    # The authors' variant: one weight per batch, the first sample's.
    GPCPSModule(eps_mode="per_batch", **tiny_net).compute_losses(batch)
    torch.testing.assert_close(used[-1], torch.full((3, 1, 1, 1), 0.1), rtol=0, atol=0)
    # A batch without weights (a user's own datamodule): the module draws them.
    batch.eps = None
    GPCPSModule(**tiny_net).compute_losses(batch)
    assert used[-1].shape == (3, 1, 1, 1) and ((used[-1] >= 0) & (used[-1] < 1)).all()


def test_draws_are_keyed_by_seed_and_positions_and_leave_the_global_state(data_root: Path) -> None:
    dm = _datamodule(data_root)
    dm.prepare_data()
    dm.setup("fit")
    compact = next(iter(dm.train_dataloader()))
    assert compact.positions == (0, 1)
    before = torch.get_rng_state()
    first = dm.make_train_batch(compact)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from the global state
    torch.manual_seed(1234)  # and nothing read from it
    again = dm.make_train_batch(compact)
    assert torch.equal(first.labeled, again.labeled) and torch.equal(first.unlabeled, again.unlabeled)
    assert first.eps is not None and torch.equal(first.eps, fusion_weights(dm.seed, (0, 1)))
    # Other positions (a later step, another rank): other draws, from the same images.
    moved = dm.make_train_batch(CompactTrainBatch(compact.labeled, compact.mask, compact.unlabeled, (6, 7)))
    assert moved.eps is not None and not torch.equal(first.eps, moved.eps)
    assert not torch.equal(first.labeled, moved.labeled)
    # Kinds of draws and seeds have streams of their own.
    assert len({stream_seed(s, k, (0, 1)) for s in (0, 1) for k in (AUGMENTATION_STREAM, FUSION_STREAM)}) == 4
    # A batch without positions (built by hand): global-state augmentation, and the method draws eps.
    plain = dm.make_train_batch(CompactTrainBatch(compact.labeled, compact.mask, compact.unlabeled))
    assert plain.eps is None


def test_ranks_draw_from_disjoint_positions() -> None:
    ranks = [SemiSupervisedPairSampler(8, 24, 2, 3, seed=5, num_replicas=2, rank=r) for r in range(2)]
    positions = [[p for _, _, p in sampler] for sampler in ranks]
    assert not set(positions[0]) & set(positions[1])
    assert positions[0][:2] == [0, 1] and positions[1][:2] == [2, 3]
