"""ST++: reliability on hand-worked masks, TTA, the ignore-aware Dice, strong augmentation, and the pipeline.

The pipeline test runs all six stages on the generated dataset with the tiny network (about 20 s on one
CPU thread), then calls it again to check that every stage is reused, and checks the refusals.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import write_kvasir_standin

from gpcps_lightning import CPSModule, SemiSupervisedBatch, SupervisedModule, SyntheticPolypDataModule
from gpcps_lightning.checkpointing import read_checkpoint
from gpcps_lightning.data import (
    DataSplit,
    FolderDataModule,
    ImageMaskPair,
    KvasirSEGDataModule,
    PseudoLabelDataModule,
    SemiSupervisedDataModule,
    SemiSupervisedPairSampler,
    StrongAugmentation,
    labeled_stream_indices,
)
from gpcps_lightning.data.datasets import CompactTrainBatch
from gpcps_lightning.data.io import read_image_size, read_mask
from gpcps_lightning.data.transforms import cutout
from gpcps_lightning.inference.tta import scaled_size, tta_probabilities
from gpcps_lightning.losses import dice_loss_with_ignore, soft_dice_loss, supervised_objective
from gpcps_lightning.pipelines import (
    STAGES,
    STPPConfig,
    STPPOptions,
    foreground_iou,
    pseudo_label_stage,
    reliability_scores,
    reliability_stage,
    retrain_stage,
    select_reliable,
)
from gpcps_lightning.pipelines.stpp import _retraining_datamodule, _unlabeled_images, _write_training_folder
from gpcps_lightning.tools.stpp import stpp_run
from tests.conftest import TINY_NET, tiny_trainer


def _masks(*rows: list[list[int]]) -> torch.Tensor:
    """2x2 binary masks, one per argument, as an (N, 1, 2, 2) bool tensor."""
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), 1, 2, 2)


# ============================================================================ reliability
def test_foreground_iou_by_hand() -> None:
    a = _masks([[1, 1], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 1]])
    b = _masks([[1, 0], [0, 0]], [[1, 1], [1, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]])
    # |a & b| / |a | b|: 1/2, 3/4, empty (0/0), 0/2.
    assert foreground_iou(a, b).tolist() == [0.5, 0.75, 0.0, 0.0]
    assert foreground_iou(a, b, empty=1.0).tolist() == [0.5, 0.75, 1.0, 0.0]
    # Numbers are binarised at 0.5.
    assert foreground_iou(a.float() * 0.6, b.float()).tolist() == [0.5, 0.75, 0.0, 0.0]


def test_reliability_ranking_by_hand_with_all_empty_predictions_not_most_reliable() -> None:
    # Four images (A, B, C, D); two early checkpoints and the final one.
    early1 = _masks([[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 1]])
    early2 = _masks([[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 0]], [[0, 0], [0, 1]])
    final = _masks([[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]], [[1, 0], [0, 0]])
    # A: IoUs 2/2 and 1/2 -> 0.75. B: nothing predicted anywhere -> empty IoU 0 twice -> 0.
    # C: 4/4 and 3/4 -> 0.875. D: disjoint -> 0.
    scores = reliability_scores([early1, early2], final)
    assert scores.tolist() == [0.75, 0.0, 0.875, 0.0]
    reliable, unreliable = select_reliable(dict(zip("ABCD", scores.tolist(), strict=True)))
    assert reliable == ["C", "A"]
    assert unreliable == ["B", "D"]  # the tie at 0 goes by name
    # The pitfall: the mean of background and foreground IoU (the official multi-class meanIOU, which
    # leaves out a class absent from both masks) gives B background IoU 4/4 and no foreground IoU, i.e. 1,
    # the best score of all, so B (a model that finds nothing) would be the most reliable image.
    b_early, b_final = early1[1], final[1]
    background = ((~b_early) & (~b_final)).sum() / ((~b_early) | (~b_final)).sum()
    assert float(background) == 1.0 > float(scores.max())
    # With empty_iou=1 the pitfall comes back: B ranks first.
    assert select_reliable(
        dict(zip("ABCD", reliability_scores([early1, early2], final, empty=1.0).tolist(), strict=True)), 0.25
    )[0] == ["B"]


def test_select_reliable_fraction_and_minimum() -> None:
    scores = {"a": 0.1, "b": 0.9, "c": 0.5}
    assert select_reliable(scores, 0.5) == (["b"], ["c", "a"])  # floor(3 * 0.5) = 1, the official n // 2
    assert select_reliable(scores, 1.0) == (["b", "c", "a"], [])
    assert select_reliable({"a": 0.3}, 0.5) == (["a"], [])  # at least one reliable image
    with pytest.raises(ValueError, match=r"`reliable_fraction` must be in \(0, 1\]"):
        select_reliable(scores, 0.0)
    with pytest.raises(ValueError, match="no reliability scores"):
        select_reliable({}, 0.5)


def test_reliability_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"`a` and `b` must be masks of one shape \(N, 1, H, W\)"):
        foreground_iou(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="`early` must hold at least one"):
        reliability_scores([], torch.zeros(1, 1, 2, 2))


# ============================================================================ ignore-aware Dice
def test_dice_loss_with_ignore_by_hand() -> None:
    p = torch.tensor([[0.8, 0.6], [0.2, 0.4]]).reshape(1, 1, 2, 2).requires_grad_(True)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    v = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    # Valid pixels: (0.8, 1), (0.6, 0), (0.4, 0). sum(p*t) = 0.8, sum(p) = 1.8, sum(t) = 1.
    # Soft Dice (smooth 1): 1 - (2 * 0.8 + 1) / (1.8 + 1 + 1) = 1 - 2.6 / 3.8.
    loss = dice_loss_with_ignore(p, y, v)
    assert loss.item() == pytest.approx(1 - 2.6 / 3.8, abs=1e-6)
    # Without the ignore region: sum(p*t) = 1.0, sum(p) = 2.0, sum(t) = 2 -> 1 - 3 / 5.
    assert soft_dice_loss(p, y).item() == pytest.approx(0.4, abs=1e-6)
    # Authors' variant (batch, squared, smooth 1e-5): sum(p^2) = 0.64 + 0.36 + 0.16 = 1.16, sum(t^2) = 1.
    authors = dice_loss_with_ignore(p, y, v, "authors")
    assert authors.item() == pytest.approx(1 - (1.6 + 1e-5) / (1.16 + 1 + 1e-5), abs=1e-6)
    # The ignored pixel gets no gradient; the others do.
    loss.backward()
    assert p.grad is not None
    assert p.grad[0, 0, 1, 0].item() == 0.0
    assert (p.grad.flatten()[[0, 1, 3]] != 0).all()
    # All valid: exactly the plain loss.
    q = p.detach()
    assert torch.equal(dice_loss_with_ignore(q, y, torch.ones_like(y)), soft_dice_loss(q, y))


def test_dice_loss_with_ignore_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    y = (torch.rand(2, 1, 3, 3, generator=g) > 0.5).double()
    v = (torch.rand(2, 1, 3, 3, generator=g) > 0.3).double()
    assert torch.autograd.gradcheck(lambda x: dice_loss_with_ignore(x, y, v), (p,))
    assert torch.autograd.gradcheck(lambda x: dice_loss_with_ignore(x, y, v, "authors"), (p,))


def test_dice_loss_with_ignore_rejects_bad_input() -> None:
    p = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="`probs` and `valid` must have the same shape"):
        dice_loss_with_ignore(p, p, torch.ones(1, 1, 2, 3))
    with pytest.raises(ValueError, match="`dice` must be 'soft' or 'authors'"):
        dice_loss_with_ignore(p, p, torch.ones_like(p), "other")  # type: ignore[arg-type]


def test_supervised_module_trains_on_valid_pixels_only_and_others_refuse() -> None:
    module = SupervisedModule(**TINY_NET)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    valid = torch.ones_like(mask)
    valid[:, :, :8, :8] = 0.0
    batch = SemiSupervisedBatch(labeled=images, mask=mask, unlabeled=images, valid=valid)
    losses = module.compute_losses(batch)
    probs = torch.sigmoid(module.net1(images))
    assert torch.allclose(losses.total, dice_loss_with_ignore(probs, mask, valid))
    assert torch.allclose(losses.total, supervised_objective(probs, mask, valid=valid).total)
    # A valid mask of ones trains exactly as no valid mask.
    plain = module.compute_losses(SemiSupervisedBatch(labeled=images, mask=mask, unlabeled=images))
    ones = module.compute_losses(
        SemiSupervisedBatch(labeled=images, mask=mask, unlabeled=images, valid=torch.ones_like(mask))
    )
    assert torch.equal(plain.total, ones.total)
    with pytest.raises(ValueError, match="cannot train on batches with ignore regions"):
        CPSModule(**TINY_NET).compute_losses(batch)
    with pytest.raises(ValueError, match=r"`valid` must have shape \(2, 1, 32, 32\)"):
        SemiSupervisedBatch(labeled=images, mask=mask, unlabeled=images, valid=valid[:1]).validate()


# ============================================================================ TTA
@pytest.fixture(scope="module")
def tiny_module() -> SupervisedModule:
    torch.manual_seed(0)
    return SupervisedModule(**TINY_NET).eval()


def test_tta_is_flip_equivariant(tiny_module: SupervisedModule) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    p = tta_probabilities(tiny_module, x, size_divisor=8)
    assert p.shape == (2, 1, 32, 32) and p.dtype == torch.float32
    assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0
    # Property: the pseudo-label of the flipped image is the flipped pseudo-label.
    assert torch.allclose(tta_probabilities(tiny_module, x.flip(-1), size_divisor=8), p.flip(-1), atol=1e-6)
    # The network alone is not flip-equivariant, so the property comes from the flip averaging.
    with torch.no_grad():
        assert not torch.allclose(tiny_module(x.flip(-1)), tiny_module(x).flip(-1), atol=1e-4)
    no_flip = tta_probabilities(tiny_module, x, flip=False, size_divisor=8)
    assert not torch.allclose(
        tta_probabilities(tiny_module, x.flip(-1), flip=False, size_divisor=8), no_flip.flip(-1)
    )


def test_tta_by_hand(tiny_module: SupervisedModule) -> None:
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = tiny_module(x)
        flipped = tiny_module(x.flip(-1)).flip(-1)
    assert torch.equal(tta_probabilities(tiny_module, x, scales=(1.0,), flip=False), plain)
    assert torch.allclose(tta_probabilities(tiny_module, x, scales=(1.0,)), (plain + flipped) / 2)
    # The official scales on 32 px with output stride 8: 16, 24, 32, 48, 64.
    assert [scaled_size(32, s, 8) for s in (0.5, 0.75, 1.0, 1.5, 2.0)] == [16, 24, 32, 48, 64]
    assert scaled_size(20, 0.5, 8) == 8 and scaled_size(256, 0.75, 32) == 192
    with pytest.raises(ValueError, match="`scales` must be positive numbers"):
        tta_probabilities(tiny_module, x, scales=())
    with pytest.raises(ValueError, match="`size_divisor` must be at least 1"):
        tta_probabilities(tiny_module, x, size_divisor=0)


# ============================================================================ strong augmentation
def test_cutout_marks_its_box_as_ignored() -> None:
    images = torch.full((8, 3, 20, 30), 0.5)
    torch.manual_seed(0)
    out, valid = cutout(images, p=1.0)
    assert valid.shape == (8, 1, 20, 30)
    for i in range(8):
        box = valid[i, 0] == 0
        assert box.any()
        rows, cols = torch.nonzero(box, as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(box.sum()) == h * w  # one rectangle
        assert 0.02 * 600 * 0.5 <= h * w <= 0.4 * 600  # area U(0.02, 0.4) * H * W, less int() rounding
        assert torch.equal(out[i][:, ~box], images[i][:, ~box])  # untouched outside the box
        assert not torch.equal(out[i][:, box], images[i][:, box])  # noise inside
    same, all_valid = cutout(images, p=0.0)
    assert torch.equal(same, images) and bool((all_valid == 1).all())
    with pytest.raises(ValueError, match="Probability `cutout` must be in"):
        cutout(images, p=1.5)
    with pytest.raises(ValueError, match=r"`cutout_area` must be a \(min, max\) pair"):
        cutout(images, area=(0.5, 0.2))


def test_strong_augmentation_defaults_and_determinism() -> None:
    aug = StrongAugmentation()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    a, va = aug(images)
    torch.manual_seed(3)
    b, vb = aug(images)
    assert torch.equal(a, b) and torch.equal(va, vb)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    jitter = aug.photometric[0]
    assert jitter.p == 0.8
    with pytest.raises(ValueError, match="Probability `grayscale` must be in"):
        StrongAugmentation(grayscale=2.0)
    with pytest.raises(ValueError, match=r"`blur_sigma` must be a \(min, max\) pair"):
        StrongAugmentation(blur_sigma=(0.0, 1.0))


def test_labeled_stream_indices_match_the_sampler() -> None:
    sampler = SemiSupervisedPairSampler(5, 7, batch_size=3, steps_per_epoch=4, seed=11)
    for epoch in (0, 2):
        pairs = sampler.pairs(epoch)
        positions = sampler.positions(epoch)
        assert labeled_stream_indices(5, 11, positions).tolist() == pairs[:, 0].tolist()


def test_pseudo_label_datamodule_augments_only_the_strong_pairs(tmp_path: Path) -> None:
    data = SyntheticPolypDataModule(root=str(tmp_path / "data"), num_images=12, image_size=32)
    data.prepare_data()
    names = sorted(p.stem for p in (tmp_path / "data" / "images").iterdir())
    (tmp_path / "train.txt").write_text("\n".join(names[:8]))
    (tmp_path / "val.txt").write_text("\n".join(names[8:]))
    (tmp_path / "labeled.txt").write_text("\n".join(names[:6]))
    (tmp_path / "strong.txt").write_text("\n".join(names[3:6]))
    common: dict[str, Any] = dict(
        root=str(tmp_path / "data"),
        train_split=str(tmp_path / "train.txt"),
        val_split=str(tmp_path / "val.txt"),
        labeled_split=str(tmp_path / "labeled.txt"),
        image_size=32,
        batch_size=4,
        num_workers=0,
        seed=5,
    )
    plain = FolderDataModule(**common)
    strong = PseudoLabelDataModule(
        strong_split=str(tmp_path / "strong.txt"), strong_augmentation={"cutout": 1.0}, **common
    )
    plain.setup("fit")
    strong.setup("fit")
    assert strong.strong_flags.tolist() == [False] * 3 + [True] * 3
    seen = 0
    for compact in list(strong.train_dataloader())[:3]:
        flags = strong.strong_flags[labeled_stream_indices(6, 5, compact.positions)]
        weak, both = plain.make_train_batch(compact), strong.make_train_batch(compact)
        if not flags.any():
            assert both.valid is None and torch.equal(both.labeled, weak.labeled)
            continue
        seen += int(flags.sum())
        assert both.valid is not None and torch.equal(both.mask, weak.mask)
        for i, flag in enumerate(flags):
            if flag:  # strongly augmented, with a cutout box ignored
                assert not torch.allclose(both.labeled[i], weak.labeled[i]) and bool(
                    (both.valid[i] == 0).any()
                )
            else:  # the weak batch exactly, everywhere valid
                assert torch.equal(both.labeled[i], weak.labeled[i]) and bool((both.valid[i] == 1).all())
        # The strong draws are a function of the seed and positions: the same batch again is the same.
        again = strong.make_train_batch(compact)
        assert torch.equal(again.labeled, both.labeled) and torch.equal(again.valid, both.valid)
    assert seen > 0
    # Without augmentation, no strong augmentation either.
    off = strong.make_train_batch(compact, augment=False)
    assert off.valid is None
    # Batches without stream positions cannot say which samples are pseudo-labelled.
    with pytest.raises(ValueError, match="finds the pseudo-labelled samples of a batch by their stream"):
        strong.make_train_batch(CompactTrainBatch(compact.labeled, compact.mask, compact.unlabeled))
    (tmp_path / "bad.txt").write_text(names[7])
    bad = PseudoLabelDataModule(strong_split=str(tmp_path / "bad.txt"), **common)
    with pytest.raises(ValueError, match=r"lists 1 name\(s\) that are not labeled training pairs"):
        bad.setup("fit")


def test_kvasir_works_as_the_source_of_the_retraining_folder(tmp_path: Path) -> None:
    root = tmp_path / "kvasir"
    write_kvasir_standin(root / "Kvasir-SEG")
    source = KvasirSEGDataModule(
        root=str(root), labeled_fraction=0.125, verify=False, num_workers=0, image_size=8, batch_size=4
    )
    source.prepare_data()
    split = source.split
    unlabeled = _unlabeled_images(split)
    masks_dir = tmp_path / "pseudo"
    masks_dir.mkdir()
    pseudo = {}
    for name in sorted(unlabeled)[:30]:
        h, w = read_image_size(unlabeled[name])
        pseudo[name] = masks_dir / f"{name}.png"
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(pseudo[name])
    args = _write_training_folder(tmp_path / "folder", split, unlabeled, pseudo, oversample=True)
    datamodule = _retraining_datamodule(source, args, STPPOptions())
    datamodule.setup("fit")
    # 100 labeled pairs (30 pseudo-labelled need no repeat), 30 pseudo-labelled ones, Kvasir's val/test.
    assert datamodule.num_labeled == 130 and datamodule.num_unlabeled == 700
    assert int(datamodule.strong_flags.sum()) == 30
    assert [p.name for p in datamodule.split.val] == [p.name for p in split.val]
    assert [p.name for p in datamodule.split.test] == [p.name for p in split.test]
    batch = datamodule.make_train_batch(next(iter(datamodule.train_dataloader())))
    assert batch.labeled.shape == (4, 3, 8, 8)


def test_retraining_takes_every_option_of_the_source(tmp_path: Path) -> None:
    """Every SemiSupervisedDataModule argument but predict_dir reaches the retraining, none by hand."""
    import inspect

    root = tmp_path / "kvasir"
    write_kvasir_standin(root / "Kvasir-SEG")
    changed = {
        "batch_size": 3,
        "image_size": (8, 12),
        "labeled_fraction": 0.25,
        "steps_per_epoch": 7,
        "num_workers": 0,
        "augment": False,
        "cache": True,
        "eval_at_original_size": False,
        "seed": 5,
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
        "check_files": "full",
    }
    names = set(inspect.signature(SemiSupervisedDataModule.__init__).parameters) - {"self", "predict_dir"}
    assert names == set(changed), "a new argument: give it a non-default value here"
    source = KvasirSEGDataModule(root=str(root), verify=False, **changed)
    source.prepare_data()
    unlabeled = _unlabeled_images(source.split)
    args = _write_training_folder(tmp_path / "folder", source.split, unlabeled, {}, oversample=True)
    retraining = _retraining_datamodule(source, args, STPPOptions())
    for name in names:
        assert getattr(retraining, name) == getattr(source, name), name

    class Forgetful(KvasirSEGDataModule):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            del self.steps_per_epoch

    forgetful = Forgetful(root=str(root), verify=False, num_workers=0)
    with pytest.raises(TypeError, match=r"Forgetful keeps no `steps_per_epoch` attribute"):
        _retraining_datamodule(forgetful, args, STPPOptions())


# ============================================================================ options
def test_options_and_config_are_checked(
    tmp_path: Path, tiny_synthetic_datamodule: Callable[..., Any]
) -> None:
    assert STPPOptions.from_mapping({"tta_scales": [1.0, 2.0]}).tta_scales == (1.0, 2.0)
    settings = STPPOptions(strong_augmentation={"cutout": 0.0}).settings()
    assert settings["stpp.reliable_fraction"] == 0.5 and settings["stpp.relabel"] == "unreliable"
    assert settings["stpp.strong_augmentation"]["cutout"] == 0.0
    assert settings["stpp.strong_augmentation"]["color"] == 0.8  # the defaults resolved
    with pytest.raises(ValueError, match=r"Unknown ST\+\+ option\(s\) \['threshold'\]"):
        STPPOptions.from_mapping({"threshold": 0.5})
    with pytest.raises(ValueError, match="`relabel` must be 'unreliable' or 'all'"):
        STPPOptions(relabel="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`empty_iou` must be in \[0, 1\]"):
        STPPOptions(empty_iou=2.0)
    with pytest.raises(ValueError, match="`tta_scales` must be positive numbers"):
        STPPOptions(tta_scales=(0.0,))
    with pytest.raises(ValueError, match="`reliable_fraction` must be in"):
        STPPOptions(reliable_fraction=1.5)
    with pytest.raises(ValueError, match="`strong_augmentation` takes the arguments of StrongAugmentation"):
        STPPOptions(strong_augmentation={"solarize": 0.2})
    dm = tiny_synthetic_datamodule(tmp_path / "data")
    with pytest.raises(ValueError, match="`max_steps` must be one integer or three"):
        STPPConfig(dm, max_steps=2, val_every=1)
    with pytest.raises(ValueError, match="`max_steps` must be one integer or three"):
        STPPConfig(dm, max_steps=(6, 3), val_every=1)
    with pytest.raises(ValueError, match="`val_every`=4 exceeds the shortest training"):
        STPPConfig(dm, max_steps=(6, 3, 3), val_every=4)
    with pytest.raises(ValueError, match="`val_every` must be a positive integer"):
        STPPConfig(dm, max_steps=6, val_every=0)
    with pytest.raises(ValueError, match="`module_args` are not SupervisedModule arguments"):
        STPPConfig(dm, max_steps=6, val_every=3, module_args={"seeds": (1, 2)})
    with pytest.raises(TypeError, match=r"ST\+\+ needs a gpcps_lightning datamodule"):
        STPPConfig(object(), max_steps=6, val_every=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either as `datamodule` or as `datamodule_class`"):
        stpp_run(max_steps=6, val_every=3, out_dir=tmp_path / "out")
    assert STPPConfig(dm, max_steps=(7, 3, 3), val_every=3).snapshot_steps == (2, 4, 7)


def test_names_must_be_unique(tmp_path: Path) -> None:
    split = DataSplit(labeled=[], unlabeled=[tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png"], val=[])
    with pytest.raises(ValueError, match="several unlabeled images share a name: x"):
        _unlabeled_images(split)
    pair = ImageMaskPair("p", tmp_path / "p.jpg", tmp_path / "p.png")
    split = DataSplit(labeled=[pair], unlabeled=[tmp_path / "u.jpg"], val=[pair])
    with pytest.raises(ValueError, match="some names occur in more than one of them: p"):
        _write_training_folder(tmp_path / "folder", split, {"u": tmp_path / "u.jpg"}, {}, oversample=True)


# ============================================================================ the pipeline
MAX_STEPS = (6, 3, 3)


def _run(root: Path, out: Path, **overrides: Any) -> Any:
    from tests.conftest import tiny_synthetic_datamodule

    kwargs: dict[str, Any] = dict(
        module_args=dict(TINY_NET), max_steps=MAX_STEPS, val_every=3, accelerator="cpu", out_dir=out
    )
    kwargs.update(overrides)
    return stpp_run(tiny_synthetic_datamodule(root), **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("stpp")
    result = _run(root / "data", root / "out")
    return root / "data", root / "out", result


def test_stpp_end_to_end_on_the_generated_data(finished: tuple[Path, Path, Any]) -> None:
    data, out, result = finished
    assert [s.name for s in result.stages] == list(STAGES) and result.skipped == []
    assert set(result.stage_seconds) == set(STAGES)
    for k, name in enumerate(STAGES, start=1):
        manifest = json.loads((out / f"{k}_{name}" / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["settings"] and manifest["fingerprint"]
    # Stage 1: best, last and the three snapshots (6 // 3, 2 * 6 // 3, 6).
    checkpoints = out / "1_supervised" / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {
        "best.ckpt",
        "last.ckpt",
        "step2.ckpt",
        "step4.ckpt",
        "step6.ckpt",
    }
    # Stage 2: one score per unlabeled image, the better half reliable.
    dm = SyntheticPolypDataModule(root=str(data), num_images=20, labeled_fraction=0.25)
    unlabeled = sorted(p.stem for p in dm.split.unlabeled)
    scores = json.loads(result.reliability.read_text())
    assert sorted(scores["images"]) == unlabeled and len(unlabeled) == 12
    assert len(scores["reliable"]) == 6 and sorted(scores["reliable"] + scores["unreliable"]) == unlabeled
    ranked = [scores["images"][n]["score"] for n in scores["reliable"] + scores["unreliable"]]
    assert ranked == sorted(ranked, reverse=True)
    # Stage 3: pseudo-labels of the reliable images; stage 5: of all, at each image's size.
    assert sorted(p.stem for p in (out / "3_pseudo_reliable" / "masks").iterdir()) == sorted(
        scores["reliable"]
    )
    assert sorted(p.stem for p in result.pseudo_labels.iterdir()) == unlabeled
    for path in dm.split.unlabeled:
        mask = read_mask(result.pseudo_labels / f"{path.stem}.png")
        assert mask.shape == read_image_size(path)
    # The reliable images keep their stage-3 labels (the official code relabels the unreliable ones).
    for name in scores["reliable"]:
        assert (result.pseudo_labels / f"{name}.png").read_bytes() == (
            out / "3_pseudo_reliable" / "masks" / f"{name}.png"
        ).read_bytes()
    # Stage 4 trained on 4 labeled pairs, twice each (ceil(6 / 4)), and 6 pseudo-labelled ones.
    train4 = (out / "4_retrain_reliable" / "data" / "splits" / "train.txt").read_text().split()
    assert len(train4) == 14 and sorted(
        (out / "4_retrain_reliable" / "data" / "splits" / "strong.txt").read_text().split()
    ) == sorted(scores["reliable"])
    # The result is a SupervisedModule checkpoint that tests like any other run's.
    checkpoint = read_checkpoint(result.checkpoint, expected_class=SupervisedModule)
    assert checkpoint["global_step"] == 3
    module = SupervisedModule.load_from_checkpoint(result.checkpoint)
    source = SyntheticPolypDataModule(
        root=str(data), num_images=20, labeled_fraction=0.25, image_size=32, batch_size=2, num_workers=0
    )
    (metrics,) = tiny_trainer().test(module, source, verbose=False)
    assert 0.0 <= metrics["test/dice_net1"] <= 1.0


def test_each_stage_is_a_function_that_runs_alone(finished: tuple[Path, Path, Any], tmp_path: Path) -> None:
    """The stage functions, called on the pipeline's inputs without it, make what its stages made."""
    from tests.conftest import tiny_synthetic_datamodule

    data, out, result = finished
    config = STPPConfig(
        tiny_synthetic_datamodule(data), max_steps=MAX_STEPS, val_every=3, module_args=dict(TINY_NET),
        accelerator="cpu",
    )  # fmt: skip
    snapshots = [out / "1_supervised" / "checkpoints" / f"step{s}.ckpt" for s in (2, 4, 6)]
    made = reliability_stage(config, tmp_path, snapshots)
    assert made.artefacts == [tmp_path / "reliability.json"] and made.outputs == {
        "reliability": "reliability.json"
    }
    assert json.loads(made.artefacts[0].read_text()) == json.loads(result.reliability.read_text())
    scores = json.loads(result.reliability.read_text())
    best = out / "1_supervised" / "checkpoints" / "best.ckpt"
    labelled = pseudo_label_stage(config, tmp_path / "labels", best, scores["reliable"][:2])
    assert labelled.outputs == {"masks": "masks", "relabelled": 2} and len(labelled.artefacts) == 2
    for path in labelled.artefacts:
        assert path.read_bytes() == (out / "3_pseudo_reliable" / "masks" / path.name).read_bytes()
    # `keep` copies earlier labels in beside the new ones
    keep = {name: path for name, path in zip(scores["reliable"][:2], labelled.artefacts, strict=True)}
    more = pseudo_label_stage(config, tmp_path / "more", best, scores["unreliable"][:1], keep)
    assert sorted(p.name for p in more.artefacts) == sorted(
        [*(p.name for p in keep.values()), f"{scores['unreliable'][0]}.png"]
    )
    assert more.outputs["relabelled"] == 1
    # a retraining on two pseudo-labelled images: 4 labeled pairs (no repeat needed) and the 2
    retrained = retrain_stage(config, tmp_path / "retrain", keep, max_steps=3)
    assert retrained.outputs == {"best": "checkpoints/best.ckpt", "pseudo_labelled": 2}
    assert len((tmp_path / "retrain" / "data" / "splits" / "train.txt").read_text().split()) == 6
    assert read_checkpoint(retrained.artefacts[0], expected_class=SupervisedModule)["global_step"] == 3


def test_stpp_second_call_reuses_every_stage(finished: tuple[Path, Path, Any]) -> None:
    data, out, first = finished
    manifests = {p: p.read_bytes() for p in out.glob("*/manifest.json")}
    again = _run(data, out)
    assert again.skipped == list(STAGES)
    assert again.checkpoint == first.checkpoint
    assert again.stage_seconds == pytest.approx(first.stage_seconds, abs=1e-3)  # the recorded times
    assert all(s.seconds < 1.0 for s in again.stages)  # nothing trained or predicted
    assert {p: p.read_bytes() for p in out.glob("*/manifest.json")} == manifests


def test_stpp_refuses_a_changed_setting_naming_the_key(finished: tuple[Path, Path, Any]) -> None:
    data, out, _ = finished
    manifests = {p: p.read_bytes() for p in out.glob("*/manifest.json")}
    with pytest.raises(
        ValueError,
        match=r"stage 'reliability' .* other settings .*stpp\.reliable_fraction: 0\.5 there, 0\.25 now",
    ):
        _run(data, out, options={"reliable_fraction": 0.25})
    with pytest.raises(
        ValueError, match=r"stage 'supervised' .* other settings .*model\.lr: 0\.0001 there, 0\.001 now"
    ):
        _run(data, out, module_args={**TINY_NET, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"stage 'retrain_all' .*trainer\.max_steps: 3 there, 4 now"):
        _run(data, out, max_steps=(6, 3, 4))
    assert {p: p.read_bytes() for p in out.glob("*/manifest.json")} == manifests


def test_stpp_refuses_changed_artefacts_and_missing_stages(
    finished: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    data, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    mask = next((copy / "5_pseudo_all" / "masks").iterdir())
    Image.fromarray((1 - read_mask(mask)) * np.uint8(255)).save(mask)  # inverted: surely different
    with pytest.raises(ValueError, match=r"stage 'pseudo_all': its artefact .* was changed"):
        _run(data, copy)
    (copy / "6_retrain_all" / "manifest.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"stage 'retrain_all': .* is not valid JSON"):
        _run(data, copy)
    shutil.rmtree(copy / "3_pseudo_reliable")
    with pytest.raises(
        ValueError,
        match=r"stage .pseudo_reliable. has no finished result .* later stages "
        r"\(retrain_reliable, pseudo_all, "
        r"retrain_all\)",
    ):
        _run(data, copy)


def test_stpp_resumes_an_interrupted_training_from_its_last_checkpoint(
    finished: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    data, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    manifest_path = copy / "6_retrain_all" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "status": "started"}))  # as if interrupted
    result = _run(data, copy)
    assert result.skipped == list(STAGES[:-1])
    # Resumed in place from last.ckpt (already at max_steps): the folder was kept, a second log started.
    logs = copy / "6_retrain_all" / "logs"
    assert {p.name for p in logs.iterdir()} == {"version_0", "version_1"}
    assert json.loads(manifest_path.read_text())["status"] == "done"
    assert read_checkpoint(result.checkpoint)["global_step"] == 3
