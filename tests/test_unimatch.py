"""UniMatch: its losses on hand-worked tensors, its views and forward passes, and short Trainer runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpcps_lightning import SupervisedModule, UniMatchModule
from gpcps_lightning.losses import (
    cutmix_box,
    pseudo_labels_and_confidence,
    soft_dice_loss,
    two_class_dice_loss,
    unimatch_objective,
)
from gpcps_lightning.losses.unimatch import apply_cutmix
from tests.conftest import TINY_NET, RandomSemiDataModule, random_semi_batch

LN3, LN99 = math.log(3.0), math.log(99.0)
S = 1e-5  # the code's Dice smoothing
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def _map(rows: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, 2, 2).requires_grad_(requires_grad)


def _net(**kwargs: Any) -> dict[str, Any]:
    return {**TINY_NET, **kwargs}


def _normalised_batch(n: int = 2, size: int = 32, seed: int = 0) -> Any:
    """A random batch whose images are normalised [0, 1] images, as the datamodules give them."""
    batch = random_semi_batch(n, size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch.labeled = (torch.rand(n, 3, size, size, generator=g) - IMAGENET_MEAN) / IMAGENET_STD
    batch.unlabeled = (torch.rand(n, 3, size, size, generator=g) - IMAGENET_MEAN) / IMAGENET_STD
    return batch


# ------------------------------------------------------------------------------------- CutMix
def test_cutmix_box_draws_one_fitting_rectangle_per_image() -> None:
    boxes = cutmix_box((64, 3, 24, 40), torch.Generator().manual_seed(0), p=1.0)
    assert boxes.shape == (64, 1, 24, 40) and boxes.dtype == torch.float32
    assert set(boxes.unique().tolist()) <= {0.0, 1.0}
    for box in boxes[:, 0]:
        rows, cols = box.any(dim=1).nonzero()[:, 0], box.any(dim=0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        # one solid rectangle, inside the image
        assert h > 0 and w > 0 and box.sum() == h * w
        assert torch.equal(rows, torch.arange(rows[0], rows[0] + h))
        assert torch.equal(cols, torch.arange(cols[0], cols[0] + w))
        # area U(0.02, 0.4) * H * W, rounded down side by side: at most 0.4 of the image
        assert h * w <= 0.4 * 24 * 40
    # Reproducible from a generator; torch's global state when none is given.
    again = cutmix_box((64, 24, 40), torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(boxes, again)
    torch.manual_seed(5)
    a = cutmix_box((4, 16, 16))
    torch.manual_seed(5)
    assert torch.equal(a, cutmix_box((4, 16, 16)))


def test_cutmix_box_probability_and_clipping() -> None:
    assert cutmix_box((8, 16, 16), p=0.0).sum() == 0
    boxes = cutmix_box((400, 8, 8), torch.Generator().manual_seed(1), p=0.5)
    share = (boxes.flatten(1).sum(1) > 0).float().mean().item()
    assert 0.4 < share < 0.6  # about half the images get a box
    # A 2 x 200 image cannot hold an area of 160 at ratio >= 0.3 (height >= 6.9): clipped after the tries.
    (box,) = cutmix_box((1, 2, 200), torch.Generator().manual_seed(0), p=1.0, size=(0.4, 0.4))
    assert box.shape == (1, 2, 200) and box.sum() > 0


def test_apply_cutmix_hand_worked() -> None:
    inputs = torch.zeros(1, 2, 2, 2)
    partner = torch.arange(8.0).reshape(1, 2, 2, 2)
    box = _map([[1.0, 0.0], [0.0, 1.0]])
    # Both channels take the partner's pixels at (0, 0) and (1, 1): 0 and 3, 4 and 7.
    expected = torch.tensor([[[[0.0, 0.0], [0.0, 3.0]], [[4.0, 0.0], [0.0, 7.0]]]])
    assert torch.equal(apply_cutmix(inputs, partner, box), expected)
    with pytest.raises(ValueError, match="must have the same shape"):
        apply_cutmix(inputs, partner[:, :1], box)
    with pytest.raises(ValueError, match=r"`box` must have shape \(1, 1, 2, 2\)"):
        apply_cutmix(inputs, partner, torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (2, 2)}, "shape"),
        ({"shape": (2, 4, 4), "p": 1.5}, "`p` must be in"),
        ({"shape": (2, 4, 4), "size": (0.5, 0.2)}, "`size` must be"),
        ({"shape": (2, 4, 4), "ratio": (0.0, 1.0)}, "`ratio` must be"),
    ],
)
def test_cutmix_box_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cutmix_box(**kwargs)


# ------------------------------------------------------------------------------ pseudo labels
def test_pseudo_labels_and_confidence_hand_worked() -> None:
    logits = _map([[0.0, LN3], [-LN3, -40.0]], requires_grad=True)
    labels, confidence = pseudo_labels_and_confidence(logits)
    # p = 0.5, 0.75, 0.25, ~0: labels 1[p >= 0.5]; confidence max(p, 1 - p) = 0.5, 0.75, 0.75, ~1.
    assert torch.equal(labels, _map([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(confidence, _map([[0.5, 0.75], [0.75, 1.0]]))
    assert not labels.requires_grad and not confidence.requires_grad


# ------------------------------------------------------------------------------------ the Dice
def test_two_class_dice_loss_hand_worked() -> None:
    p = _map([[0.8, 0.4], [0.1, 0.6]])
    t = _map([[1.0, 0.0], [0.0, 1.0]])
    # Foreground: sum(p t) = 0.8 + 0.6 = 1.4, sum(p^2) = 0.64 + 0.16 + 0.01 + 0.36 = 1.17, sum(t^2) = 2.
    # Background q = 1 - p = [0.2, 0.6, 0.9, 0.4], u = [0, 1, 1, 0]:
    # sum(q u) = 1.5, sum(q^2) = 1.37, sum(u^2) = 2.
    fg = 1 - (2.8 + S) / (3.17 + S)
    bg = 1 - (3.0 + S) / (3.37 + S)
    torch.testing.assert_close(two_class_dice_loss(p, t), torch.tensor((fg + bg) / 2))
    # Pixel (0, 1) ignored: foreground sum(p t) = 1.4, sum(p^2) = 1.01, sum(t^2) = 2;
    # background q = [0.2, 0.9, 0.4], u = [0, 1, 0]: sum(q u) = 0.9, sum(q^2) = 1.01, sum(u^2) = 1.
    valid = _map([[1.0, 0.0], [1.0, 1.0]]).bool()
    fg = 1 - (2.8 + S) / (3.01 + S)
    bg = 1 - (1.8 + S) / (2.01 + S)
    torch.testing.assert_close(two_class_dice_loss(p, t, valid), torch.tensor((fg + bg) / 2))


def test_two_class_dice_loss_is_the_codes_softmax_dice() -> None:
    """The code's DiceLoss(n_classes=2) of softmax over logits (0, z) with its ignore mask, by its formula."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 5, 7, generator=g)
    target = (torch.rand(3, 1, 5, 7, generator=g) > 0.5).float()
    ignore = (torch.rand(3, 5, 7, generator=g) > 0.7).float()
    score = torch.softmax(torch.cat([torch.zeros_like(z), z], dim=1), dim=1)
    one_hot = torch.cat([target == 0, target == 1], dim=1).float()
    loss = 0.0
    for i in range(2):
        s, y = score[:, i][ignore != 1], one_hot[:, i][ignore != 1]
        loss += 1 - (2 * (s * y).sum() + S) / ((s * s).sum() + (y * y).sum() + S)
    valid = (ignore != 1).unsqueeze(1)
    torch.testing.assert_close(two_class_dice_loss(torch.sigmoid(z), target, valid), loss / 2)


def test_two_class_dice_loss_gradient_and_empty_mask() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    t = (torch.rand(2, 1, 3, 3, generator=g) > 0.5).double()
    valid = torch.rand(2, 1, 3, 3, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda q: two_class_dice_loss(q, t, valid), (p,))
    # Ignored pixels get no gradient; with none valid the loss is 0 (smoothing over smoothing).
    two_class_dice_loss(p, t, valid).backward()
    assert p.grad is not None and torch.all(p.grad[~valid] == 0)
    nothing = torch.zeros_like(valid)
    p.grad = None
    out = two_class_dice_loss(p, t, nothing)
    out.backward()
    assert out.item() == 0.0 and torch.all(p.grad == 0)
    with pytest.raises(ValueError, match="`smooth` must be positive"):
        two_class_dice_loss(p, t, smooth=0.0)


# ---------------------------------------------------------------------------------- objective
def _objective_inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        "logits_labeled": _map([[0.0, 0.0], [0.0, 0.0]], requires_grad),
        "y": _map([[1.0, 0.0], [0.0, 0.0]]),
        # weak: p = 0.99, 0.01, ~0.525, ~0.475 -> labels [[1, 0], [1, 0]],
        # confidence [[.99, .99], [.525, .525]]
        "logits_weak": _map([[LN99, -LN99], [0.1, -0.1]], requires_grad),
        # partner: labels [[0, 1], [1, 1]], confidence 0.99 everywhere
        "logits_partner": _map([[-LN99, LN99], [LN99, LN99]]),
        "logits_strong1": _map([[0.0, 0.0], [0.0, 0.0]], requires_grad),
        "logits_strong2": _map([[0.0, 0.0], [0.0, 0.0]], requires_grad),
        "logits_fp": _map([[0.0, 0.0], [0.0, 0.0]], requires_grad),
        "box1": _map([[0.0, 0.0], [0.0, 1.0]]),
        "box2": _map([[0.0, 0.0], [0.0, 0.0]]),
    }


def test_unimatch_objective_hand_worked() -> None:
    losses = unimatch_objective(**_objective_inputs())
    # Strong view 1: the box takes pixel (1, 1) from the partner -> labels [[1, 0], [1, 1]], confidence
    # [[.99, .99], [.525, .99]]: valid (0, 0), (0, 1), (1, 1) with targets 1, 0, 1, all p = 0.5.
    # Foreground: sum(p t) = 1, sum(p^2) = 0.75, sum(t^2) = 2; background: sum(q u) = 0.5, 0.75, 1.
    s1 = ((1 - (2 + S) / (2.75 + S)) + (1 - (1 + S) / (1.75 + S))) / 2
    # Strong view 2 (no box) and the perturbed features: valid (0, 0), (0, 1), targets 1, 0, p = 0.5:
    # each class has sum(q u) = 0.5, sum(q^2) = 0.5, sum(u^2) = 1.
    s2 = fp = 1 - (1 + S) / (1.5 + S)
    # L_sup: the per-sample soft Dice (smoothing 1) of p = 0.5 on y = [[1, 0], [0, 0]]: 1 - 2 / 4.
    sup = 0.5
    torch.testing.assert_close(losses.s1, torch.tensor(s1))
    torch.testing.assert_close(losses.s2, torch.tensor(s2))
    torch.testing.assert_close(losses.fp, torch.tensor(fp))
    torch.testing.assert_close(losses.sup, torch.tensor(sup))
    torch.testing.assert_close(losses.total, torch.tensor((sup + 0.25 * s1 + 0.25 * s2 + 0.5 * fp) / 2))
    assert losses.mask_ratio.item() == 0.5
    # Every weight is the caller's.
    weighted = unimatch_objective(**_objective_inputs(), weight_s1=1.0, weight_s2=2.0, weight_fp=3.0)
    torch.testing.assert_close(weighted.total, torch.tensor((sup + s1 + 2 * s2 + 3 * fp) / 2))
    # A threshold of 0.5 counts every pixel: strong view 2 then has targets [[1, 0], [1, 0]], p = 0.5.
    everything = unimatch_objective(**_objective_inputs(), conf_thresh=0.5)
    torch.testing.assert_close(everything.s2, torch.tensor(1 - (2 + S) / (3 + S)))
    assert everything.mask_ratio.item() == 1.0


def test_unimatch_objective_official_supervised_term() -> None:
    losses = unimatch_objective(**_objective_inputs(), supervised="ce_dice")
    # BCE(0, y) = ln 2 per pixel; two-class Dice of p = 0.5 on y = [[1, 0], [0, 0]]:
    # foreground sum(p t) = 0.5, sum(p^2) = 1, sum(t^2) = 1; background 1.5, 1, 3.
    dice = ((1 - (1 + S) / (2 + S)) + (1 - (3 + S) / (4 + S))) / 2
    torch.testing.assert_close(losses.sup, torch.tensor((math.log(2.0) + dice) / 2))


def test_unimatch_objective_gradient_paths() -> None:
    inputs = _objective_inputs(requires_grad=True)
    unimatch_objective(**inputs, conf_thresh=0.5).total.backward()
    # The weak view only gives targets: no gradient flows into it.
    assert inputs["logits_weak"].grad is None
    for name in ("logits_labeled", "logits_strong1", "logits_strong2", "logits_fp"):
        grad = inputs[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"conf_thresh": 1.5}, "`conf_thresh` must be in"),
        ({"weight_fp": -1.0}, "`weight_fp` must be >= 0"),
        ({"supervised": "ce"}, "`supervised` must be 'dice' or 'ce_dice'"),
        ({"dice": "hard"}, "`dice` must be"),
    ],
)
def test_unimatch_objective_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unimatch_objective(**_objective_inputs(), **kwargs)
    inputs = _objective_inputs()
    inputs["logits_fp"] = torch.zeros(1, 1, 2, 3)
    with pytest.raises(ValueError, match="same shape"):
        unimatch_objective(**inputs)


# ------------------------------------------------------------------------------------- module
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"conf_thresh": -0.1}, "conf_thresh"),
        ({"weight_s1": -1.0}, "weight_s1"),
        ({"weight_s2": -1.0}, "weight_s2"),
        ({"weight_fp": -1.0}, "weight_fp"),
        ({"fp_dropout": 1.0}, "fp_dropout"),
        ({"cutmix_p": 2.0}, "cutmix_p"),
        ({"jitter_p": -1.0}, "jitter_p"),
        ({"blur_p": 1.5}, "blur_p"),
        ({"cutmix_size": (0.4, 0.02)}, "cutmix_size"),
        ({"cutmix_ratio": (0.0, 1.0)}, "cutmix_ratio"),
        ({"blur_sigma": (0.0, 2.0)}, "blur_sigma"),
        ({"brightness": -0.5}, "brightness"),
        ({"hue": 0.6}, "hue"),
        ({"image_mean": (0.5,)}, "image_mean"),
        ({"image_std": (0.2, 0.2, 0.0)}, "image_std"),
        ({"supervised": "ce"}, "supervised"),
        ({"dice": "hard"}, "dice"),
    ],
)
def test_module_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UniMatchModule(**_net(**kwargs))


def test_network_without_encoder_and_decoder_is_refused() -> None:
    class Plain(UniMatchModule):
        def make_network(self, seed: int) -> nn.Module:
            return nn.Conv2d(3, 1, 1)

    with pytest.raises(TypeError, match="lacks encoder, decoder, segmentation_head"):
        Plain(**_net())


def test_defaults_and_one_network() -> None:
    module = UniMatchModule(**_net())
    assert (module.conf_thresh, module.weight_s1, module.weight_s2) == (0.95, 0.25, 0.25)
    assert module.weight_fp == 0.5
    assert module.fp_dropout == 0.5 and module.cutmix_p == 0.5 and module.supervised == "dice"
    assert module.head_names == ("net1",) and module.selection_head == "net1"
    assert list(module.trained_networks()) == [module.net1]
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in module.net1.parameters()}


def test_feature_perturbation_forward() -> None:
    torch.manual_seed(0)
    module = UniMatchModule(**_net(fp_dropout=0.0))
    module.eval()  # batch-norm in eval mode: each image's logits independent of the batch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = module.net1(x)
        logits, logits_fp = module.forward_with_feature_perturbation(x)
    # Without dropout both halves are the network's own forward pass.
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(logits_fp, plain)
    module.fp_dropout = 0.5
    with torch.no_grad():
        logits, logits_fp = module.forward_with_feature_perturbation(x)
    torch.testing.assert_close(logits, plain)
    assert not torch.allclose(logits_fp, plain)


def test_strong_view_is_photometric_and_drawn_from_the_global_state() -> None:
    module = UniMatchModule(**_net())
    x01 = torch.rand(8, 3, 16, 16)
    x = (x01 - IMAGENET_MEAN) / IMAGENET_STD
    torch.manual_seed(0)
    a = module.strong_view(x)
    torch.manual_seed(0)
    assert torch.equal(a, module.strong_view(x))
    back = a * IMAGENET_STD + IMAGENET_MEAN
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6  # still a [0, 1] image once denormalised
    assert (a - x).abs().flatten(1).amax(1).gt(1e-3).sum() >= 4  # most images changed (p = 0.8 and 0.5)
    off = UniMatchModule(**_net(jitter_p=0.0, blur_p=0.0))
    torch.testing.assert_close(off.strong_view(x), x, rtol=0, atol=1e-5)


def test_compute_losses_is_the_objective_of_the_module_outputs() -> None:
    """Eval mode and no dropout make the passes repeatable; the boxes are the step's first draws."""
    torch.manual_seed(0)
    module = UniMatchModule(**_net(conf_thresh=0.6, fp_dropout=0.0, cutmix_p=1.0, jitter_p=0.0, blur_p=0.0))
    module.eval()
    batch = _normalised_batch()
    torch.manual_seed(1)
    losses = module.compute_losses(batch)
    torch.manual_seed(1)
    box1 = cutmix_box(batch.unlabeled.shape, p=1.0)
    box2 = cutmix_box(batch.unlabeled.shape, p=1.0)
    # Image i is mixed with image i - 1, its box's labels from that image's own weak view.
    u = batch.unlabeled
    strong1 = apply_cutmix(u, u.roll(1, 0), box1)
    strong2 = apply_cutmix(u, u.roll(1, 0), box2)
    with torch.no_grad():
        z_weak = module.net1(u)
        expected = unimatch_objective(
            module.net1(batch.labeled),
            batch.mask,
            z_weak,
            z_weak.roll(1, 0),
            module.net1(strong1),
            module.net1(strong2),
            z_weak,
            box1,
            box2,
            conf_thresh=0.6,
        )
    for name in ("sup", "s1", "s2", "fp", "total", "mask_ratio"):
        torch.testing.assert_close(getattr(losses, name), getattr(expected, name), rtol=1e-4, atol=1e-5)
    assert 0 < losses.mask_ratio < 1 and losses.s1 != losses.s2
    assert module.training is False  # the partners' eval pass restores the mode it found


def _one_update(seed: int = 0, **kwargs: Any) -> list[torch.Tensor]:
    torch.manual_seed(0)
    module = UniMatchModule(**_net(lr=1e-2, conf_thresh=0.5, **kwargs))
    optimizer = module.configure_optimizers()
    torch.manual_seed(seed)
    module.compute_losses(_normalised_batch()).total.backward()
    optimizer.step()
    return [p.detach().clone() for p in module.net1.parameters()]


def test_one_step_trains_and_every_weight_matters() -> None:
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in UniMatchModule(**_net()).net1.parameters()]
    reference = _one_update()
    assert any(not torch.equal(a, b) for a, b in zip(initial, reference, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reference, _one_update(), strict=True))  # repeatable
    for option in ({"weight_s1": 1.0}, {"weight_s2": 1.0}, {"weight_fp": 2.0}, {"supervised": "ce_dice"}):
        changed = _one_update(**option)
        assert any(not torch.equal(a, b) for a, b in zip(reference, changed, strict=True)), option


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fits_two_steps_and_round_trips(tmp_path: Path, precision: str, tiny_trainer: Any) -> None:
    torch.manual_seed(0)
    module = UniMatchModule(**_net(lr=1e-2))
    before = [p.detach().clone() for p in module.net1.parameters()]
    trainer: L.Trainer = tiny_trainer(
        default_root_dir=tmp_path, max_steps=2, limit_val_batches=1, log_every_n_steps=1, precision=precision
    )
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=4))
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    for key in ("loss", "loss_sup", "loss_s1", "loss_s2", "loss_fp", "mask_ratio"):
        assert f"train/{key}" in metrics and torch.isfinite(metrics[f"train/{key}"]), key
    assert "val/dice_net1" in metrics and "val/iou_net1" in metrics
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, module.net1.parameters(), strict=True))
    path = tmp_path / "unimatch.ckpt"
    trainer.save_checkpoint(path)
    restored = UniMatchModule.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(module.hparams)
    for key, value in module.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    images = torch.rand(2, 3, 32, 32)
    module.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(images), restored(images))


_MEAN, _STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_normalisation_must_match_the_datamodules(tmp_path: Path, tiny_trainer: Any) -> None:
    trainer: L.Trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="differ from the datamodule's `mean`/`std`"):
        trainer.fit(UniMatchModule(**_net()), datamodule=RandomSemiDataModule(mean=_MEAN, std=_STD))
    module = UniMatchModule(**_net(image_mean=_MEAN, image_std=_STD))
    data = RandomSemiDataModule(mean=_MEAN, std=_STD)
    tiny_trainer(default_root_dir=tmp_path, max_steps=1).fit(module, datamodule=data)


def test_binary_objective_equals_the_two_channel_softmax_one() -> None:
    """Sigmoid on z is softmax over (0, z): the labels, confidences and Dice are the code's two-class ones."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 1, 4, 4, generator=g) * 4
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    labels, confidence = pseudo_labels_and_confidence(z)
    torch.testing.assert_close(confidence[:, 0], two.softmax(1).max(1).values)
    assert torch.equal(labels[:, 0].long(), two.argmax(1))  # no exact ties at z = 0 here
    # The library's Dice of the supervised term is not this one (it is GP-CPS's L_sup):
    y = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    assert not torch.isclose(two_class_dice_loss(torch.sigmoid(z), y), soft_dice_loss(torch.sigmoid(z), y))
    assert F.softmax(two, 1)[:, 1:].sub(torch.sigmoid(z)).abs().max() < 1e-6


def test_module_and_datamodule_arguments_do_not_clash() -> None:
    """Lightning refuses to log a run whose module and datamodule share an argument name with two values."""
    import inspect

    from gpcps_lightning import FolderDataModule, KvasirSEGDataModule, SyntheticPolypDataModule
    from gpcps_lightning.data import SemiSupervisedDataModule

    def names(*classes: type) -> set[str]:
        return {p for c in classes for p in inspect.signature(c).parameters if p != "kwargs"}

    data = names(SemiSupervisedDataModule, FolderDataModule, KvasirSEGDataModule, SyntheticPolypDataModule)
    assert not names(UniMatchModule) & data


def test_sees_the_same_batches_as_the_supervised_unet(tmp_path: Path) -> None:
    """Views, boxes and dropout come from the global random state, never from the data streams."""
    from test_same_batches import _assert_same, _train

    reference = _train(UniMatchModule(**TINY_NET), tmp_path, global_seed=0)
    _assert_same(reference, _train(SupervisedModule(**TINY_NET), tmp_path, global_seed=7))


class _AllConfident(UniMatchModule):
    """Every pixel counts (confidence >= 0.5): all the step's draws reach the weights."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(conf_thresh=0.5, **kwargs)


def test_resume_replays_the_views_boxes_and_dropout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_resume import _assert_identical, _run

    data = tmp_path / "data"
    full, _ = _run(data, tmp_path / "full", max_epochs=2, method=_AllConfident)
    _run(data, tmp_path / "part", max_epochs=1, method=_AllConfident)
    last = tmp_path / "part" / "last.ckpt"
    torch.manual_seed(12345)
    resumed, _ = _run(data, tmp_path / "resumed", ckpt_path=last, max_epochs=2, method=_AllConfident)
    _assert_identical(full, resumed)
    # Control: without the saved random states the draws differ, and so do the weights.
    monkeypatch.setattr("gpcps_lightning.methods.base.restore_rng_state", lambda state: None)
    torch.manual_seed(12345)
    drifted, _ = _run(data, tmp_path / "drifted", ckpt_path=last, max_epochs=2, method=_AllConfident)
    with pytest.raises(AssertionError):
        _assert_identical(full, drifted)
