"""Datamodules: batches (shapes, dtypes, ranges), augmentation alignment, evaluation, prediction, cache,
unlabeled masks never decoded, option errors, the synthetic dataset, and a Trainer run."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_NET
from PIL import Image
from test_data_helpers import record_decodes, record_opens, write_images, write_pairs

from gpcps_lightning import (
    EvaluationBatch,
    FolderDataModule,
    GPCPSModule,
    PredictionBatch,
    SemiSupervisedBatch,
    SyntheticPolypDataModule,
)
from gpcps_lightning.data import (
    CompactEvaluationBatch,
    CompactTrainBatch,
    SegmentationAugmentation,
    generate_synthetic_polyps,
    read_image,
    read_mask,
)
from gpcps_lightning.losses import fuse_images


def _folder_dm(root: Path, **kwargs) -> FolderDataModule:  # type: ignore[no-untyped-def]
    args = {"image_size": 16, "batch_size": 3, "num_workers": 0, "labeled_fraction": 0.25} | kwargs
    return FolderDataModule(root=str(root), **args)


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    # On a small machine shared with other jobs, two intra-op threads can make a GP-CPS step ~50x
    # slower (OpenMP threads spin-waiting for a core); one thread keeps the Trainer tests fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_pairs(tmp_path / "data", 20, image_ext=".jpg", mask_ext=".png")
    return tmp_path / "data"


# ----------------------------------------------------------------------------- batches
def test_train_batches_shapes_dtypes_ranges(folder: Path) -> None:
    dm = _folder_dm(folder, image_size=(16, 24))
    dm.setup("fit")
    assert (dm.num_labeled, dm.num_unlabeled) == (4, 12)
    assert dm.train_steps_per_epoch == 6  # ceil(16 / 3)
    loader = dm.train_dataloader()
    assert len(loader) == 6
    compact = next(iter(loader))
    assert isinstance(compact, CompactTrainBatch)
    assert compact.labeled.dtype == compact.mask.dtype == compact.unlabeled.dtype == torch.uint8
    assert compact.labeled.shape == compact.unlabeled.shape == (3, 3, 16, 24)
    assert compact.mask.shape == (3, 1, 16, 24) and set(compact.mask.unique().tolist()) <= {0, 1}
    for augment in (False, True):
        batch = dm.make_train_batch(compact, augment=augment)
        assert isinstance(batch, SemiSupervisedBatch)
        batch.validate()
        # The datamodule draws the fusion weights (per sample); the method fuses.
        assert batch.fused is None and batch.eps is not None and batch.eps.shape == (3, 1, 1, 1)
        assert ((batch.eps >= 0) & (batch.eps < 1)).all()
        assert batch.labeled.dtype == batch.unlabeled.dtype == batch.mask.dtype == torch.float32
        assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
        images = dm.denormalize(torch.cat([batch.labeled, batch.unlabeled]))
        assert images.min() >= -1e-5 and images.max() <= 1 + 1e-5
    # Without augmentation, the batch is exactly the normalised uint8 images.
    plain = dm.make_train_batch(compact, augment=False)
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    torch.testing.assert_close(plain.labeled, (compact.labeled / 255.0 - mean) / std)
    torch.testing.assert_close(dm.denormalize(plain.unlabeled), compact.unlabeled / 255.0)
    torch.testing.assert_close(plain.mask, compact.mask.float())


def test_on_after_batch_transfer_dispatches(folder: Path) -> None:
    dm = _folder_dm(folder, augment=False)
    dm.setup("fit")
    train = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert isinstance(train, SemiSupervisedBatch) and isinstance(val, EvaluationBatch)
    assert dm.on_after_batch_transfer("other", 0) == "other"


def test_fused_batch_is_eps_weighted_sum(folder: Path) -> None:
    # The datamodule leaves fusion to the method; fusing its batch with its weights gives
    # f = eps*l + (1-eps)*u per sample.
    dm = _folder_dm(folder)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    eps = batch.eps
    assert eps is not None
    fused = fuse_images(batch.labeled, batch.unlabeled, eps)
    for i in range(batch.batch_size):
        e = float(eps[i])
        torch.testing.assert_close(fused[i], e * batch.labeled[i] + (1 - e) * batch.unlabeled[i])
    SemiSupervisedBatch(batch.labeled, batch.mask, batch.unlabeled, fused, eps).validate()


def test_training_stream_pairs_labeled_with_masks(folder: Path) -> None:
    # Labeled images come with their own masks: compare with the files.
    dm = _folder_dm(folder, image_size=(24, 28), augment=False)
    dm.setup("fit")
    ds = dm.train_dataset
    assert ds is not None
    image, mask, unlabeled = ds[(1, 5)]
    pair = ds.labeled.pairs[1]
    expected_image = np.asarray(
        Image.fromarray(read_image(pair.image)).resize((28, 24), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected_image)
    assert mask.shape == (1, 24, 28)
    big = read_mask(pair.mask)
    assert abs(mask.float().mean().item() - big.mean()) < 0.05
    assert unlabeled.shape == (3, 24, 28)


def test_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    # Images equal to their masks (white shapes on black): after augmentation the image, thresholded,
    # must still be the mask (up to the interpolated border of the shape).
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[0:48, 0:48]
    for k in range(12):
        m = (((yy - 14 - k) ** 2 + (xx - 20) ** 2) < 80) | ((yy > 30) & (xx > 8 + k) & (xx < 20 + k))
        Image.fromarray(np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1)).save(
            root / "images" / f"{k}.png"
        )
        Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / f"{k}.png")
    dm = _folder_dm(
        root, image_size=48, batch_size=8, labeled_fraction=0.75, val_fraction=0.1, test_fraction=0.0
    )
    dm.augmentation = SegmentationAugmentation(affine=1.0, hflip=0.5, vflip=0.5, degrees=90.0, blur=0.0)
    dm.setup("fit")
    compact = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    batch = dm.make_train_batch(compact)
    assert not torch.equal(batch.mask, compact.mask.float())  # the geometry did change
    image = dm.denormalize(batch.labeled).mean(1, keepdim=True)
    disagreement = ((image > 0.5).float() != batch.mask).float().mean().item()
    assert disagreement < 0.02
    # Misaligned (e.g. a mask of another sample) would disagree on far more pixels.
    assert ((image > 0.5).float() != batch.mask.roll(1, 0)).float().mean().item() > 0.05


def test_evaluation_batches_at_original_size(folder: Path) -> None:
    dm = _folder_dm(folder, image_size=16)
    dm.setup("validate")
    compact = next(iter(dm.val_dataloader()))
    assert isinstance(compact, CompactEvaluationBatch)
    batch = dm.on_after_batch_transfer(compact, 0)
    assert isinstance(batch, EvaluationBatch)
    assert batch.image.shape == (2, 3, 16, 16) and batch.image.dtype == torch.float32
    assert batch.mask.shape == (2, 1, 16, 16)
    assert batch.original_masks is not None and len(batch.original_masks) == 2
    for name, original in zip(batch.names, batch.original_masks, strict=True):
        expected = read_mask(folder / "masks" / f"{name}.png")
        assert original.shape == (1, *expected.shape) and original.dtype == torch.float32
        np.testing.assert_array_equal(original[0].numpy(), expected)
    dm2 = _folder_dm(folder, image_size=16, eval_at_original_size=False)
    dm2.setup("test")
    batch2 = dm2.on_after_batch_transfer(next(iter(dm2.test_dataloader())), 0)
    assert batch2.original_masks is None and batch2.mask.shape[-2:] == (16, 16)


def test_prediction_batches(folder: Path, tmp_path: Path) -> None:
    pred = tmp_path / "predict"
    pred.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(pred / "a.jpg")
    Image.fromarray(np.zeros((17, 9), np.uint8)).save(pred / "b.png")
    Image.fromarray(np.zeros((5, 7, 4), np.uint8), "RGBA").save(pred / "c.tif")
    dm = _folder_dm(folder, predict_dir=str(pred))
    dm.setup("predict")
    batch = dm.on_after_batch_transfer(next(iter(dm.predict_dataloader())), 0)
    assert isinstance(batch, PredictionBatch)
    assert batch.image.shape == (3, 3, 16, 16)
    assert batch.names == ["a", "b", "c"]
    assert batch.original_sizes == [(30, 40), (17, 9), (5, 7)]
    with pytest.raises(ValueError, match="set `predict_dir`"):
        _folder_dm(folder).predict_dataloader()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _folder_dm(folder, predict_dir=str(tmp_path / "none")).setup("predict")


def test_denormalize_inverts_normalize(folder: Path) -> None:
    dm = _folder_dm(folder, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(dm.denormalize(dm.normalize(x)), x)
    torch.testing.assert_close(dm.denormalize(dm.normalize(x)[0]), x[0])
    assert dm.mean == (0.5, 0.4, 0.3) and dm.std == (0.2, 0.3, 0.4)


# ----------------------------------------------------------------------------- unlabeled masks never decoded
def test_unlabeled_masks_never_decoded(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setup reads the unlabeled pairs' mask headers (to check the sizes); nothing decodes those masks."""
    dm = _folder_dm(folder, labeled_fraction=0.25)
    with record_opens(monkeypatch) as at_setup, record_decodes(monkeypatch) as decoded:
        dm.setup("fit")
        with record_opens(monkeypatch) as in_training:
            loader = dm.train_dataloader()
            for epoch in range(2):
                loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
                for compact in loader:
                    dm.on_after_batch_transfer(compact, 0)
    unlabeled_masks = {str((folder / "masks" / f"{p.stem}.png").resolve()) for p in dm.split.unlabeled}
    labeled_masks = {str(p.mask.resolve()) for p in dm.split.labeled}
    unlabeled_images = {str(p.resolve()) for p in dm.split.unlabeled}
    assert len(unlabeled_masks) == 12
    assert unlabeled_masks <= set(at_setup)  # their headers: the size check
    assert not unlabeled_masks & set(decoded)
    assert not unlabeled_masks & set(in_training)
    # the spies do see opens and decodes
    assert labeled_masks <= set(decoded) and unlabeled_images <= set(in_training) & set(decoded)


# ----------------------------------------------------------------------------- cache
def test_cache_gives_identical_items_without_reopening(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, cached = _folder_dm(folder), _folder_dm(folder, cache=True)
    for dm in (plain, cached):
        dm.setup("fit")
    a, b = plain.val_dataset, cached.val_dataset
    assert a is not None and b is not None
    first = [b[i] for i in range(len(b))]
    with record_opens(monkeypatch) as opened:
        second = [b[i] for i in range(len(b))]
        train_items = [cached.train_dataset[(i, i)] for i in range(2)]  # type: ignore[index]
        train_again = [cached.train_dataset[(i, i)] for i in range(2)]  # type: ignore[index]
    train_ds = cached.train_dataset
    assert train_ds is not None
    first_reads = {
        str(p.resolve())
        for i in range(2)
        for p in (train_ds.labeled.pairs[i].image, train_ds.labeled.pairs[i].mask)
    }
    first_reads |= {str(train_ds.unlabeled.paths[i].resolve()) for i in range(2)}
    assert (
        set(opened) == first_reads
    )  # the cached validation items and the second training reads open nothing
    for x, y, z in zip(first, second, [a[i] for i in range(len(a))], strict=True):
        for u, v, w in zip(x[:3], y[:3], z[:3], strict=True):
            assert torch.equal(u, v) and torch.equal(u, w)
    for x, y in zip(train_items, train_again, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    # Items handed out are copies: changing one leaves the cache intact.
    second[0][0].zero_()
    assert torch.equal(b[0][0], first[0][0])


def test_cache_shared_with_workers(folder: Path) -> None:
    dm = _folder_dm(folder, cache=True, num_workers=1)
    dm.setup("validate")
    ds = dm.val_dataset
    assert ds is not None and ds.image_cache is not None and ds.image_cache.buffer.is_shared()
    batches = list(dm.val_dataloader())
    assert bool(ds.image_cache.filled.all())  # filled by the worker, visible here
    assert ds.original_cache is not None and bool(ds.original_cache.filled.all())
    again = list(dm.val_dataloader())
    for x, y in zip(batches, again, strict=True):
        assert torch.equal(x.image, y.image) and x.names == y.names


# ----------------------------------------------------------------------------- setup errors (datamodule)
def test_setup_reports_bad_files(folder: Path) -> None:
    data = folder
    (data / "images" / "img005.jpg").write_bytes(b"garbage")
    dm = _folder_dm(data, labeled_fraction=1.0, unlabeled_dir=str(data / "images"))
    with pytest.raises(ValueError, match=r"img005\.jpg"):
        dm.setup("fit")


def test_size_mismatch_among_the_unlabeled_pairs_is_found_at_setup(folder: Path, tmp_path: Path) -> None:
    """Every pair of the folder is checked, also those the split leaves unlabeled (masks unused in training).

    Otherwise the folder would be accepted with this split and refused with another `labeled_fraction`.
    """
    unlabeled = _folder_dm(folder).split.unlabeled[0]
    bad = folder / "masks" / f"{unlabeled.stem}.png"
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(bad)
    dm = _folder_dm(folder)
    assert unlabeled in dm.split.unlabeled and all(p.name != unlabeled.stem for p in dm.split.labeled)
    with pytest.raises(
        ValueError, match=re.escape(str(bad)) + r" is 9x7\..*fix or remove the pair\..*unlabeled"
    ):
        dm.setup("fit")
    # Unlabeled images without masks (`unlabeled_dir`) have no pair to check.
    write_pairs(tmp_path / "good", 8)
    extra = write_images(tmp_path / "extra", 3)
    dm = _folder_dm(tmp_path / "good", unlabeled_dir=str(tmp_path / "extra"))
    dm.setup("fit")
    assert set(extra) <= set(dm.split.unlabeled)


def test_truncated_file_with_header_check_fails_at_load(tmp_path: Path) -> None:
    write_pairs(tmp_path, 10, sizes=[(64, 64)], image_ext=".jpg")
    path = tmp_path / "images" / "img003.jpg"
    path.write_bytes(path.read_bytes()[:-400])
    dm = _folder_dm(tmp_path, labeled_fraction=1.0, val_fraction=0.1, test_fraction=0.0, unlabeled_dir=None)
    full = _folder_dm(tmp_path, check_files="full", labeled_fraction=0.5, test_fraction=0.0)
    with pytest.raises(ValueError, match=r"img003\.jpg.*truncated"):
        full.setup(None)
    header = _folder_dm(tmp_path, labeled_fraction=0.5, test_fraction=0.0)
    header.setup(None)  # the header is fine
    with pytest.raises(ValueError, match=r"img003\.jpg.*truncated"):
        for name in ("val_dataset", "train_dataset"):
            ds = getattr(header, name)
            if name == "val_dataset":
                [ds[i] for i in range(len(ds))]
            else:
                [ds.labeled[i] for i in range(len(ds.labeled))] + [
                    ds.unlabeled[i] for i in range(len(ds.unlabeled))
                ]
    del dm


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size`"),
        ({"image_size": 0}, "`image_size`"),
        ({"image_size": (16, 0)}, "`image_size`"),
        ({"image_size": (16, 16, 16)}, "`image_size`"),
        ({"labeled_fraction": 0.0}, "`labeled_fraction`"),
        ({"labeled_fraction": 1.5}, "`labeled_fraction`"),
        ({"steps_per_epoch": 0}, "`steps_per_epoch`"),
        ({"num_workers": -1}, "`num_workers`"),
        ({"seed": -2}, "`seed`"),
        ({"mean": (0.5, 0.5)}, "`mean`"),
        ({"std": (0.2, 0.0, 0.2)}, "`std`"),
        ({"check_files": "none"}, "`check_files`"),
    ],
)
def test_common_option_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FolderDataModule(root="x", **kwargs)


def test_steps_per_epoch_option(folder: Path) -> None:
    dm = _folder_dm(folder, steps_per_epoch=4)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 4


def test_no_unlabeled_image_error(folder: Path) -> None:
    dm = _folder_dm(folder, labeled_fraction=1.0)
    with pytest.raises(ValueError, match=r"leaves no unlabeled image"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- synthetic dataset
def test_synthetic_generation_deterministic_and_varied(tmp_path: Path) -> None:
    generate_synthetic_polyps(tmp_path / "a", num_images=6, seed=3, min_size=48, max_size=80)
    generate_synthetic_polyps(tmp_path / "b", num_images=6, seed=3, min_size=48, max_size=80)
    generate_synthetic_polyps(tmp_path / "c", num_images=6, seed=4, min_size=48, max_size=80)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 13  # 6 images, 6 masks, the parameter file
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / "images" / "synth_00000.jpg").read_bytes() != (
        tmp_path / "c" / "images" / "synth_00000.jpg"
    ).read_bytes()
    sizes, coverage = set(), []
    for k in range(6):
        mask = read_mask(tmp_path / "a" / "masks" / f"synth_{k:05d}.png")
        image = read_image(tmp_path / "a" / "images" / f"synth_{k:05d}.jpg")
        assert image.shape[:2] == mask.shape and 48 <= min(mask.shape) and max(mask.shape) <= 80
        sizes.add(mask.shape)
        coverage.append(mask.mean())
        assert 0.0 < mask.mean() < 0.6
        # Polyps share the mucosa's hues: red dominates both inside and outside.
        inside, outside = image[mask == 1].mean(0), image[(mask == 0) & (image.sum(-1) > 60)].mean(0)
        assert inside[0] > inside[1] and outside[0] > outside[1]
    assert len(sizes) > 1 and len(set(np.round(coverage, 3))) > 1


def test_synthetic_datamodule_prepare_reuse_and_errors(tmp_path: Path) -> None:
    dm = SyntheticPolypDataModule(
        root=str(tmp_path / "s"), num_images=10, min_size=32, max_size=48, num_workers=0
    )
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    dm.prepare_data()  # reused
    dm.setup("fit")
    assert dm.num_labeled + dm.num_unlabeled == 8
    other = SyntheticPolypDataModule(root=str(tmp_path / "s"), num_images=11, num_workers=0)
    with pytest.raises(ValueError, match="generated with"):
        other.prepare_data()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a generated dataset"):
        SyntheticPolypDataModule(root=str(tmp_path / "busy"), num_workers=0).prepare_data()
    with pytest.raises(ValueError, match="num_images"):
        SyntheticPolypDataModule(root="x", num_images=0)


def test_gpcps_trains_on_synthetic_data_with_trainer(
    tmp_path: Path,
    one_thread: None,
    tiny_trainer: Callable[..., L.Trainer],
    tiny_synthetic_datamodule: Callable[..., SyntheticPolypDataModule],
) -> None:
    L.seed_everything(0)
    dm = tiny_synthetic_datamodule(
        tmp_path / "synth", num_images=12, min_size=40, max_size=64, steps_per_epoch=2, cache=True
    )
    module = GPCPSModule(**TINY_NET)
    before = [p.detach().clone() for p in module.net1.parameters()]
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 2 and trainer.current_epoch == 1
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_sup", "train/loss_semi", "train/loss_grad", "val/dice_ensemble"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/dice_ensemble"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net1.parameters(), strict=True))
    results = trainer.test(module, dm, verbose=False)
    assert 0.0 <= results[0]["test/dice_net1"] <= 1.0


def test_dataloaders_build_lazily(folder: Path) -> None:
    dm = _folder_dm(folder)
    assert len(dm.val_dataloader().dataset) == 2  # type: ignore[arg-type]
    assert len(dm.train_dataloader()) == 6
    assert len(dm.test_dataloader().dataset) == 2  # type: ignore[arg-type]
    write_images(folder.parent / "p", 2)


@pytest.mark.slow
def test_synthetic_dataset_is_learnable_but_not_trivial(
    tmp_path: Path, one_thread: None, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    # A short supervised run (ablation row I) must beat the all-foreground predictor's Dice clearly
    # without getting near perfect: the generator's masks match its polyps, and the task is not trivial.
    L.seed_everything(0)
    dm = SyntheticPolypDataModule(
        root=str(tmp_path / "synth"),
        num_images=200,
        image_size=64,
        batch_size=8,
        num_workers=0,
        cache=True,
        steps_per_epoch=40,
    )
    dm.prepare_data()
    dm.setup("fit")
    chance = []
    for pair in dm.split.val:
        mask = read_mask(pair.mask)
        chance.append(2 * mask.sum() / (mask.size + mask.sum()))
    module = GPCPSModule(lambda_semi=0.0, lambda_grad=0.0, lr=1e-3, **TINY_NET)
    trainer = tiny_trainer(max_steps=120, limit_val_batches=1.0)
    trainer.fit(module, dm)
    dice = float(trainer.callback_metrics["val/dice_ensemble"])
    assert dice > float(np.mean(chance)) + 0.15
    assert dice < 0.9
