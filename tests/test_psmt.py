"""PS-MT: its losses on hand-worked tensors, T-VAT's direction, the teachers' schedule, and Trainer runs."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

import gpcps_lightning.losses.psmt as psmt_losses
import gpcps_lightning.methods.psmt as psmt_method
from gpcps_lightning import PSMTModule, SupervisedModule
from gpcps_lightning.losses import (
    CutMixBoxes,
    active_teacher,
    bernoulli_kl_with_logits,
    confidence_weighted_ce,
    cosine_rampup,
    cutmix_boxes,
    draw_cutmix,
    psmt_objective,
    soft_dice_loss,
    teacher_target,
    vat_perturbation,
)
from gpcps_lightning.losses.psmt import apply_cutmix
from gpcps_lightning.methods.psmt import teacher_seeds_for
from tests.conftest import TINY_NET, RandomSemiDataModule, random_semi_batch, tiny_synthetic_datamodule

LN2, LN3 = math.log(2.0), math.log(3.0)


def _map(rows: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, 2, 2).requires_grad_(requires_grad)


def _net(**extra: Any) -> dict[str, Any]:
    return {**{k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_NET.items()}, **extra}


# ------------------------------------------------------------------------------------------- schedule
def test_cosine_rampup_values() -> None:
    # (1 - cos(pi t / T)) / 2: 0 at the start, 1/2 half-way, 1 from T on.
    assert cosine_rampup(0, 4) == 0.0
    assert cosine_rampup(1, 4) == pytest.approx((1 - math.sqrt(0.5)) / 2)  # cos(pi/4) = sqrt(1/2)
    assert cosine_rampup(2, 4) == pytest.approx(0.5)
    assert cosine_rampup(3, 4) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert cosine_rampup(4, 4) == 1.0 and cosine_rampup(99, 4) == 1.0
    assert cosine_rampup(0, 0) == 1.0  # no ramp
    with pytest.raises(ValueError, match="`step` must be >= 0"):
        cosine_rampup(-1, 4)
    with pytest.raises(ValueError, match="`rampup_steps` must be >= 0"):
        cosine_rampup(0, -1)


def test_active_teacher_alternates_after_the_warm_up() -> None:
    # warm-up 3 steps, switch every 2: none, none, none, 0, 0, 1, 1, 0, 0, 1
    assert [active_teacher(s, 3, 2) for s in range(10)] == [None, None, None, 0, 0, 1, 1, 0, 0, 1]
    assert [active_teacher(s, 0, 1) for s in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="`step` must be >= 0"):
        active_teacher(-1, 0, 1)
    with pytest.raises(ValueError, match="`warmup_steps` must be >= 0"):
        active_teacher(0, -1, 1)
    with pytest.raises(ValueError, match="`switch_every` must be >= 1"):
        active_teacher(0, 0, 0)


# -------------------------------------------------------------------------------------------- CutMix
def test_cutmix_boxes_hand_worked() -> None:
    # lam = 3/4: sqrt(1 - lam) = 1/2, sides int(8/2) = 4 (H) and int(16/2) = 8 (W): half-sides 2 and 4.
    centres = torch.tensor([[5, 3], [7, 14], [1, 8]])
    boxes = cutmix_boxes(8, 16, 0.75, centres)
    # rows [cy - 2, cy + 2), cols [cx - 4, cx + 4), clipped to [0, 8] x [0, 16]
    expected = torch.tensor([[3, 7, 0, 7], [5, 8, 10, 16], [0, 3, 4, 12]])
    assert torch.equal(boxes, expected) and boxes.dtype == torch.int64
    # lam = 1: no box; lam = 0: sides 8 and 16, half-sides 4 and 8
    assert torch.equal(cutmix_boxes(8, 16, 1.0, centres[:1]), torch.tensor([[5, 5, 3, 3]]))
    assert torch.equal(cutmix_boxes(8, 16, 0.0, centres[:1]), torch.tensor([[1, 8, 0, 11]]))
    with pytest.raises(ValueError, match="`lam` must be in"):
        cutmix_boxes(8, 8, 1.5, centres)
    with pytest.raises(ValueError, match="`centres` must have shape"):
        cutmix_boxes(8, 8, 0.5, torch.zeros(3))


def test_apply_cutmix_hand_worked_on_images_and_targets() -> None:
    # image 0 is all 0, image 1 all 1; image 0 takes rows 0-1, cols 1-2 from image 1, image 1 takes
    # rows 1-3, col 0 from image 0.
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]).requires_grad_(True)
    draw = CutMixBoxes(torch.tensor([[0, 2, 1, 3], [1, 4, 0, 1]]), torch.tensor([1, 0]), 0.5)
    out = apply_cutmix(x, draw)
    expected = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    expected[0, 0, 0:2, 1:3] = 1.0
    expected[1, 0, 1:4, 0:1] = 0.0
    assert torch.equal(out, expected)
    # differentiable: each input pixel gets the count of output pixels copied from it
    out.sum().backward()
    uses = torch.ones_like(x)
    uses[0, 0, 0:2, 1:3] -= 1  # image 0's box is image 1's pixels ...
    uses[1, 0, 0:2, 1:3] += 1
    uses[1, 0, 1:4, 0:1] -= 1  # ... and image 1's box is image 0's
    uses[0, 0, 1:4, 0:1] += 1
    assert x.grad is not None and torch.equal(x.grad, uses)
    # the same draw on a 3-channel image and its 1-channel target moves the same pixels
    image = torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 3, 4, 4)
    target = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4) + 1000
    changed_image = (apply_cutmix(image, draw) != image).any(dim=1, keepdim=True)
    changed_target = apply_cutmix(target, draw) != target
    assert torch.equal(changed_image, changed_target) and changed_target.sum() == 4 + 3
    # an empty box or an image that is its own partner changes nothing
    same = CutMixBoxes(torch.tensor([[2, 2, 0, 4], [0, 4, 0, 4]]), torch.tensor([0, 1]), 1.0)
    assert torch.equal(apply_cutmix(image, same), image)


def test_apply_cutmix_errors() -> None:
    draw = CutMixBoxes(torch.zeros(2, 4, dtype=torch.long), torch.arange(2), 0.5)
    with pytest.raises(ValueError, match=r"`x` must have shape \(N, C, H, W\)"):
        apply_cutmix(torch.zeros(2, 4, 4), draw)
    with pytest.raises(ValueError, match="The CutMix draw is for 2 images, got a batch of 3"):
        apply_cutmix(torch.zeros(3, 1, 4, 4), draw)


def test_draw_cutmix_reproducible_in_bounds_and_beta_sized() -> None:
    before = torch.get_rng_state()
    a = draw_cutmix(5, 64, 48, generator=torch.Generator().manual_seed(3))
    b = draw_cutmix(5, 64, 48, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)  # a generator leaves the global state alone
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.partners, b.partners) and a.lam == b.lam
    assert sorted(a.partners.tolist()) == list(range(5))
    g = torch.Generator().manual_seed(0)
    lams = []
    for _ in range(1500):
        draw = draw_cutmix(4, 64, 48, generator=g)
        lams.append(draw.lam)
        top, bottom, left, right = draw.boxes.unbind(dim=1)
        assert ((0 <= top) & (top <= bottom) & (bottom <= 64)).all()
        assert ((0 <= left) & (left <= right) & (right <= 48)).all()
        half_h = int(64 * math.sqrt(1 - draw.lam)) // 2
        unclipped = (top > 0) & (bottom < 64)
        assert (bottom - top)[unclipped].eq(2 * half_h).all()
        # centres are drawn in [H / 8, H): a box is never clipped at the top unless it is taller than that
        assert ((top > 0) | (torch.tensor(half_h) > 64 // 8 - 1)).all()
    mean = sum(lams) / len(lams)
    var = sum((v - mean) ** 2 for v in lams) / len(lams)
    # Beta(4, 4): mean 1/2, variance ab / ((a + b)^2 (a + b + 1)) = 16 / (64 * 9) = 1/36
    assert mean == pytest.approx(0.5, abs=0.015)
    assert var == pytest.approx(1 / 36, rel=0.15)
    with pytest.raises(ValueError, match="`beta` must be positive"):
        draw_cutmix(2, 8, 8, beta=0.0)
    with pytest.raises(ValueError, match="`n`, `height` and `width` must be >= 1"):
        draw_cutmix(0, 8, 8)


# ------------------------------------------------------------------------------------------- T-VAT
def test_bernoulli_kl_with_logits_hand_worked() -> None:
    # pixel 0: p = 1/2 against q = 1/4: 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3)
    #          = 1/2 ln(4/3); the others are equal distributions (KL 0). Sum over pixels / N (N = 1).
    t = _map([[0.0, LN3], [0.0, -LN3]])
    z = _map([[-LN3, LN3], [0.0, -LN3]], requires_grad=True)
    kl = bernoulli_kl_with_logits(t, z)
    torch.testing.assert_close(kl, torch.tensor(0.5 * math.log(4 / 3)))
    kl.backward()
    assert z.grad is not None  # (q - p) / N: 1/4 - 1/2 at pixel 0, 0 elsewhere
    torch.testing.assert_close(z.grad, _map([[-0.25, 0.0], [0.0, 0.0]]))
    # batchmean: two copies of the batch give the same value
    torch.testing.assert_close(
        bernoulli_kl_with_logits(t.repeat(2, 1, 1, 1), z.detach().repeat(2, 1, 1, 1)), kl
    )
    # finite and >= 0 for saturated logits
    huge = bernoulli_kl_with_logits(
        _map([[100.0, -100.0], [0.0, 50.0]]), _map([[-100.0, 100.0], [0.0, 50.0]])
    )
    assert torch.isfinite(huge) and huge > 100


class _TinyDecoder(nn.Module):
    """A smooth two-level 'decoder' in float64: 1x1 convolutions of tanh features, the deep one upsampled."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.shallow = nn.Conv2d(2, 1, 1).double()
        self.deep = nn.Conv2d(3, 1, 1).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # features[0] plays the input image: read for nothing, as smp's UNet reads it for its size only
        shallow = self.shallow(torch.tanh(features[1]))
        deep = F.interpolate(self.deep(torch.tanh(features[2])), scale_factor=2.0)
        return shallow + deep


def _features(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64),
    ]


def _norms(r: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.stack([t.flatten(1).pow(2).sum(1) for t in r if t is not None]).sum(0).sqrt()


def _flat(r: list[torch.Tensor | None], n: int) -> torch.Tensor:
    return torch.cat([t.reshape(n, -1) for t in r if t is not None], dim=1)


def test_vat_perturbation_shape_norm_and_no_parameter_gradient() -> None:
    decoder, features = _TinyDecoder(), _features()
    before = torch.get_rng_state()
    r = vat_perturbation(features, decoder, [1, 2], eps=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
    assert r[0] is None and r[1] is not None and r[2] is not None
    assert r[1].shape == features[1].shape and r[1].dtype == torch.float64 and not r[1].requires_grad
    torch.testing.assert_close(_norms(r), torch.full((2,), 2.0, dtype=torch.float64))  # eps per sample
    assert all(p.grad is None for p in decoder.parameters())  # only the direction is differentiated
    again = vat_perturbation(features, decoder, [1, 2], eps=2.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(r[1:], again[1:], strict=True))  # type: ignore[arg-type]
    deepest = vat_perturbation(features, decoder, [2], generator=torch.Generator().manual_seed(0))
    assert deepest[0] is None and deepest[1] is None and deepest[2] is not None
    # half-precision features: float32 iteration, perturbation returned in the features' dtype
    half = vat_perturbation(
        [f.float().bfloat16() for f in features], lambda f: decoder([t.double() for t in f]), [1]
    )
    assert half[1] is not None and half[1].dtype == torch.bfloat16


def test_vat_direction_is_the_power_step_of_the_kl_curvature() -> None:
    """Finite-difference check: the gradient at ``xi * d0`` is ``xi^2 H d0``, ``H`` the KL's Hessian at 0."""
    decoder, features = _TinyDecoder(), _features()
    n, levels = features[0].shape[0], [1, 2]
    r = vat_perturbation(
        features, decoder, levels, xi=1e-6, eps=1.0, generator=torch.Generator().manual_seed(5)
    )
    # The random start, drawn as the function draws it: uniform in [-0.5, 0.5), unit norm per sample.
    g = torch.Generator().manual_seed(5)
    d0 = [torch.rand(features[i].shape, generator=g, dtype=torch.float64) - 0.5 for i in levels]
    d0_flat = _flat(list(d0), n)
    d0_flat = d0_flat / d0_flat.norm(dim=1, keepdim=True)
    with torch.no_grad():
        target = decoder(features)
    sizes = [features[i][0].numel() for i in levels]

    def kl_of(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.reshape(n, -1).split(sizes, dim=1)
        shifted = list(features)
        for i, part in zip(levels, parts, strict=True):
            shifted[i] = features[i] + part.reshape(features[i].shape)
        return bernoulli_kl_with_logits(target, decoder(shifted))

    hessian = torch.autograd.functional.hessian(kl_of, torch.zeros(n * sum(sizes), dtype=torch.float64))
    expected = (hessian @ d0_flat.reshape(-1)).reshape(n, -1)  # samples do not interact: block-diagonal
    expected = expected / expected.norm(dim=1, keepdim=True)
    cosine = (_flat(r, n) * expected).sum(dim=1)
    assert (cosine > 1 - 1e-6).all(), cosine


def test_vat_direction_increases_the_kl_more_than_random_directions() -> None:
    decoder, features = _TinyDecoder(), _features(n=1)
    with torch.no_grad():
        target = decoder(features)

    def kl_along(r: list[torch.Tensor | None]) -> float:
        shifted = [f if t is None else f + t for f, t in zip(features, r, strict=True)]
        with torch.no_grad():
            return bernoulli_kl_with_logits(target, decoder(shifted)).item()

    eps = 0.5
    one_step = vat_perturbation(
        features, decoder, [1, 2], eps=eps, generator=torch.Generator().manual_seed(0)
    )
    converged = vat_perturbation(
        features, decoder, [1, 2], eps=eps, iterations=30, generator=torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(1)
    random_kls = []
    for _ in range(50):
        d: list[torch.Tensor | None] = [None] + [
            torch.randn(f.shape, generator=g, dtype=f.dtype) for f in features[1:]
        ]
        scale = eps / _norms(d)
        random_kls.append(kl_along([None if t is None else t * scale.view(-1, 1, 1, 1) for t in d]))
    assert kl_along(one_step) > sorted(random_kls)[len(random_kls) // 2]  # beats the median direction
    assert kl_along(converged) >= max(random_kls)  # the power method's limit beats them all
    assert kl_along(converged) >= kl_along(one_step) * 0.999


def test_vat_official_normaliser_shrinks_small_gradients() -> None:
    # The official d / (|d| + 1e-8) on a gradient of size ~xi^2 |H| (here well below 1e-8) shrinks the
    # perturbation far below eps without turning it; the default normalises exactly.
    decoder, features = _TinyDecoder(), _features()
    exact = vat_perturbation(features, decoder, [1, 2], generator=torch.Generator().manual_seed(0))
    official = vat_perturbation(
        features, decoder, [1, 2], norm_eps=1e-8, generator=torch.Generator().manual_seed(0)
    )
    assert (_norms(official) < 1e-2 * 2.0).all()
    cosine = (_flat(exact, 2) * _flat(official, 2)).sum(1) / (_norms(exact) * _norms(official))
    assert (cosine > 1 - 1e-9).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"perturbed": []}, "`perturbed` must list indices of the 3 features"),
        ({"perturbed": [3]}, "`perturbed` must list indices"),
        ({"xi": 0.0}, "`xi` must be positive"),
        ({"eps": -1.0}, "`eps` and `norm_eps` >= 0"),
        ({"norm_eps": -1.0}, "`eps` and `norm_eps` >= 0"),
        ({"iterations": 0}, "`iterations` must be >= 1"),
    ],
)
def test_vat_perturbation_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"perturbed": [1], **kwargs}
    with pytest.raises(ValueError, match=match):
        vat_perturbation(_features(), _TinyDecoder(), **args)


# ---------------------------------------------------------------------------------- unlabeled loss
def test_teacher_target_hand_worked() -> None:
    p1 = _map([[0.9, 0.1], [0.6, 0.0]], requires_grad=True)
    p2 = _map([[0.5, 0.3], [0.2, 1.0]])
    torch.testing.assert_close(teacher_target(p1, p2), _map([[0.7, 0.2], [0.4, 0.5]]))
    # gamma weighs teacher 1: 0.75 * 0.9 + 0.25 * 0.5 = 0.8, ...
    torch.testing.assert_close(teacher_target(p1, p2, gamma=0.75), _map([[0.8, 0.15], [0.5, 0.25]]))
    assert not teacher_target(p1, p2).requires_grad
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0, 1\]"):
        teacher_target(p1, p2, gamma=1.5)


def test_confidence_weighted_ce_hand_worked_and_gradient() -> None:
    # target p = [[0.9, 0.2], [0.55, 0.7]]: labels y = [[1, 0], [1, 1]],
    # confidences [[0.9, 0.8], [0.55, 0.7]]; threshold 0.6 drops the 0.55 pixel.
    # Student logits z = [[0, ln3], [-ln3, 0]]:
    # BCE(0, 1) = ln2, BCE(ln3, 0) = softplus(ln3) = ln4, BCE(0, 1) = ln2 (kept pixels).
    # Loss = (0.9 ln2 + 0.8 ln4 + 0.7 ln2) / 3 = 3.2 ln2 / 3.
    z = _map([[0.0, LN3], [-LN3, 0.0]], requires_grad=True)
    p = _map([[0.9, 0.2], [0.55, 0.7]], requires_grad=True)
    loss = confidence_weighted_ce(z, p)
    torch.testing.assert_close(loss, torch.tensor(3.2 * LN2 / 3))
    loss.backward()
    # d/dz = c (sigmoid(z) - y) / 3 on kept pixels: 0.9 (1/2 - 1) / 3, 0.8 (3/4 - 0) / 3, 0, 0.7 (1/2 - 1) / 3
    assert z.grad is not None and p.grad is None
    torch.testing.assert_close(z.grad, _map([[-0.15, 0.2], [0.0, -0.7 / 6]]))
    # the threshold counts with >= (official); above every confidence the loss is 0, with a graph
    torch.testing.assert_close(confidence_weighted_ce(z, p, threshold=0.9), torch.tensor(0.9 * LN2))
    empty = confidence_weighted_ce(z, p, threshold=0.95)
    assert empty.item() == 0.0 and empty.requires_grad
    # threshold 0: every pixel, the 0.55 one with label 1 against z = -ln3: BCE = ln4
    torch.testing.assert_close(
        confidence_weighted_ce(z, p, threshold=0.0), torch.tensor((3.2 * LN2 + 0.55 * 2 * LN2) / 4)
    )
    with pytest.raises(ValueError, match=r"`threshold` must be in \[0, 1\)"):
        confidence_weighted_ce(z, p, threshold=1.0)


def test_psmt_objective_terms_and_total() -> None:
    y = _map([[1.0, 0.0], [1.0, 1.0]])
    p_s, p_t1, p_t2 = _map([[0.8, 0.1], [0.6, 0.9]]), _map([[0.5, 0.5], [0.5, 0.5]]), _map([[1, 0], [1, 1]])
    z = _map([[0.0, LN3], [-LN3, 0.0]])
    target = _map([[0.9, 0.2], [0.55, 0.7]])
    losses = psmt_objective(p_s, y, z, target, unsup_weight=1.5, ramp=0.5)
    torch.testing.assert_close(losses.sup, soft_dice_loss(p_s, y))
    torch.testing.assert_close(losses.unsup, torch.tensor(3.2 * LN2 / 3))
    assert losses.teachers_sup.item() == 0.0 and losses.ramp == 0.5
    torch.testing.assert_close(losses.total, losses.sup + 0.75 * losses.unsup)
    warm = psmt_objective(p_s, y, p_teachers_labeled=[p_t1, p_t2], ramp=0.0)
    torch.testing.assert_close(warm.teachers_sup, soft_dice_loss(p_t1, y) + soft_dice_loss(p_t2, y))
    torch.testing.assert_close(warm.total, warm.sup + warm.teachers_sup)
    assert warm.unsup.item() == 0.0


# ------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"unsup_weight": -1.0}, "`unsup_weight` must be >= 0"),
        ({"warmup_steps": -1}, "`warmup_steps` must be >= 0"),
        ({"rampup_steps": -1}, "`rampup_steps` must be >= 0"),
        ({"teacher_switch_every": 0}, "`teacher_switch_every` must be >= 1"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be in \[0, 1\)"),
        ({"gamma": -0.1}, r"`gamma` must be in \[0, 1\]"),
        ({"confidence_threshold": 1.0}, r"`confidence_threshold` must be in \[0, 1\)"),
        ({"cutmix_beta": 0.0}, "`cutmix_beta` must be positive"),
        ({"vat_xi": 0.0}, "`vat_xi` must be positive"),
        ({"vat_eps": -1.0}, "`vat_eps` must be >= 0"),
        ({"vat_norm_eps": -1.0}, "`vat_norm_eps` must be >= 0"),
        ({"vat_features": "deep"}, "`vat_features` must be 'all' or 'deepest'"),
        ({"teacher_seeds": (2, 2)}, "`teacher_seeds` must be two different integers"),
        ({"teacher_seeds": (1, 2)}, r"both other than `network_seed` \(1\)"),
        ({"network_seed": 5, "teacher_seeds": (5, 6)}, "`teacher_seeds` must be two different integers"),
        ({"dice": "hard"}, "`dice` must be"),
    ],
)
def test_module_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PSMTModule(**_net(**kwargs))


def test_network_without_encoder_decoder_head_is_refused() -> None:
    class PlainNetwork(PSMTModule):
        def make_network(self, seed: int) -> nn.Module:
            return nn.Conv2d(3, 1, 1)

    with pytest.raises(ValueError, match="runs its networks as encoder -> decoder -> segmentation_head"):
        PlainNetwork(**_net())


def test_heads_networks_and_optimizer() -> None:
    module = PSMTModule(**_net())
    assert PSMTModule.selection_head == "teacher" and PSMTModule.head_names == ("teacher", "student")
    nets = (module.student, module.teacher1, module.teacher2)
    assert module.trained_networks() == nets
    # three seeds: three different initialisations; the student's is the supervised UNet's (seed 1)
    firsts = [next(n.parameters()) for n in nets]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    assert module.teacher_seeds == teacher_seeds_for(1) == (2**32 + 2, 2**32 + 3)
    assert torch.equal(firsts[0], next(SupervisedModule(**_net()).net1.parameters()))
    optimizer = module.configure_optimizers()
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(list(n.parameters())) for n in nets]
    module.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        heads = module.head_probabilities(images)
        p1, p2 = torch.sigmoid(module.teacher1(images)), torch.sigmoid(module.teacher2(images))
        torch.testing.assert_close(heads["teacher"], (p1 + p2) / 2)
        torch.testing.assert_close(heads["student"], torch.sigmoid(module.student(images)))
        torch.testing.assert_close(module(images), heads["teacher"])
        # T-VAT off, the explicit encoder -> decoder -> head pass is the network's own forward
        torch.testing.assert_close(module.student_logits(images, perturb=False), module.student(images))
    assert module.ramp_at(0) == 0.0 and module.ramp_at(249) == 0.0
    assert module.ramp_at(250 + 300) == pytest.approx(0.5) and module.ramp_at(850) == 1.0
    assert module.active_teacher_at(249) is None
    assert [module.active_teacher_at(s) for s in (250, 299, 300, 350)] == [0, 0, 1, 0]


def test_warm_up_losses_are_supervised_dice_of_all_three() -> None:
    module = PSMTModule(**_net(warmup_steps=2))
    module.eval()
    batch = random_semi_batch()
    losses = module.compute_losses(batch, step=1)
    with torch.no_grad():
        p = [torch.sigmoid(n(batch.labeled)) for n in (module.student, module.teacher1, module.teacher2)]
    torch.testing.assert_close(losses.sup, soft_dice_loss(p[0], batch.mask))
    torch.testing.assert_close(
        losses.teachers_sup, soft_dice_loss(p[1], batch.mask) + soft_dice_loss(p[2], batch.mask)
    )
    assert losses.unsup.item() == 0.0 and losses.ramp == 0.0
    losses.total.backward()
    for net in (module.student, module.teacher1, module.teacher2):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_semi_step_losses_match_the_pure_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the warm-up: the teachers' target, one CutMix for image and target, no teacher gradient."""
    module = PSMTModule(**_net(warmup_steps=0, rampup_steps=4, vat_eps=0.0))
    module.eval()  # batch norm in eval mode: the same outputs on every pass
    batch = random_semi_batch()
    draw = CutMixBoxes(torch.tensor([[0, 16, 0, 16], [8, 32, 8, 32]]), torch.tensor([1, 0]), 0.5)
    monkeypatch.setattr(psmt_method, "draw_cutmix", lambda *a, **k: draw)
    losses = module.compute_losses(batch, step=2)
    with torch.no_grad():
        u = batch.unlabeled
        target = (torch.sigmoid(module.teacher1(u)) + torch.sigmoid(module.teacher2(u))) / 2
        z_strong = module.student(apply_cutmix(u, draw))
        expected_unsup = confidence_weighted_ce(z_strong, apply_cutmix(target, draw), 0.6)
        expected_sup = soft_dice_loss(torch.sigmoid(module.student(batch.labeled)), batch.mask)
    torch.testing.assert_close(losses.unsup, expected_unsup)
    torch.testing.assert_close(losses.sup, expected_sup)
    assert losses.ramp == pytest.approx(0.5) and losses.teachers_sup.item() == 0.0
    torch.testing.assert_close(losses.total, losses.sup + 1.5 * 0.5 * losses.unsup)
    losses.total.backward()
    assert all(p.grad is None for t in module.teachers for p in t.parameters())


def test_t_vat_perturbs_the_student_and_keeps_teacher_modes() -> None:
    module = PSMTModule(**_net())
    module.train()
    teacher_stats = [b.clone() for t in module.teachers for b in t.buffers()]
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = module.student_logits(images, perturb=False)
    torch.manual_seed(0)
    perturbed = module.student_logits(images, perturb=True)
    assert not torch.equal(plain, perturbed)
    assert all(t.training for t in module.teachers)  # back in training mode
    # the teachers ran in evaluation mode: their batch-norm statistics did not move
    assert all(
        torch.equal(a, b)
        for a, b in zip(teacher_stats, (b for t in module.teachers for b in t.buffers()), strict=True)
    )
    perturbed.sum().backward()
    assert all(p.grad is None for t in module.teachers for p in t.parameters())
    assert any(p.grad is not None for p in module.student.encoder.parameters())


@pytest.fixture(scope="module")
def semi_module() -> PSMTModule:
    return PSMTModule(**_net(warmup_steps=0, rampup_steps=0))


def _student_gradient(base: PSMTModule, **options: Any) -> torch.Tensor:
    module = copy.deepcopy(base)  # the same weights; only the options differ
    for name, value in options.items():
        assert hasattr(module, name)
        setattr(module, name, value)
    torch.manual_seed(0)  # the same CutMix and T-VAT draws for every setting
    losses = module.compute_losses(random_semi_batch(), step=0)
    assert losses.unsup.item() > 0 or options.get("unsup_weight", 1.0) == 0  # pixels pass the threshold
    losses.total.backward()
    return torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    ("option", "other"),
    [
        ("unsup_weight", 0.5),
        ("confidence_threshold", 0.5),
        ("gamma", 1.0),
        ("vat_eps", 0.5),
        ("vat_xi", 1e-2),
        ("vat_features", "deepest"),
        ("vat_on_labeled", False),
        ("cutmix_beta", 0.5),
    ],
)
def test_each_option_changes_the_update(semi_module: PSMTModule, option: str, other: Any) -> None:
    reference = _student_gradient(semi_module)
    changed = _student_gradient(semi_module, **{option: other})
    assert reference.shape == changed.shape
    assert not torch.allclose(reference, changed), option


def _fit(module: PSMTModule, steps: int, tiny_trainer: Callable[..., L.Trainer], **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = tiny_trainer(max_steps=steps, log_every_n_steps=1, **kwargs)
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=8))
    return trainer


class _Snapshots(L.Callback):
    """The three networks' parameters before each training step."""

    def __init__(self) -> None:
        self.before: list[dict[str, list[torch.Tensor]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.before.append(
            {
                name: [p.detach().clone() for p in getattr(pl_module, name).parameters()]
                for name in ("student", "teacher1", "teacher2")
            }
        )


def test_warm_up_trains_all_then_the_moving_average_alternates(
    tiny_trainer: Callable[..., L.Trainer],
) -> None:
    module = PSMTModule(**_net(lr=1e-2, warmup_steps=1, teacher_switch_every=2, ema_decay=0.9))
    snapshots = _Snapshots()
    trainer = _fit(module, 4, tiny_trainer, callbacks=[snapshots])
    after = {
        name: [p.detach() for p in getattr(module, name).parameters()]
        for name in ("student", "teacher1", "teacher2")
    }
    states = [*snapshots.before, after]
    # step 0 (warm-up): Adam trains all three
    for name in ("student", "teacher1", "teacher2"):
        assert any(not torch.equal(a, b) for a, b in zip(states[0][name], states[1][name], strict=True)), name
    # steps 1, 2 average into teacher 1, step 3 into teacher 2; the other teacher stays as it was. A
    # teacher's first update copies the student (decay 0), its second averages with decay 1/2.
    for step, moved, kept, decay in (
        (1, "teacher1", "teacher2", 0.0),
        (2, "teacher1", "teacher2", 0.5),
        (3, "teacher2", "teacher1", 0.0),
    ):
        for t_before, t_after, s_after in zip(
            states[step][moved], states[step + 1][moved], states[step + 1]["student"], strict=True
        ):
            torch.testing.assert_close(
                t_after, decay * t_before + (1 - decay) * s_after, rtol=1e-6, atol=1e-7
            )
        assert all(torch.equal(a, b) for a, b in zip(states[step][kept], states[step + 1][kept], strict=True))
    assert module.ema_updates.tolist() == [2, 1]
    metrics = trainer.callback_metrics
    assert metrics["train/ema_teacher"].item() == 2.0
    assert metrics["train/loss_teachers"].item() == 0.0
    for key in ("train/loss", "train/loss_sup", "train/loss_unsup", "train/ramp"):
        assert key in metrics and torch.isfinite(metrics[key]), key


def test_without_ema_warmup_the_decay_is_constant_from_the_first_update(
    tiny_trainer: Callable[..., L.Trainer],
) -> None:
    module = PSMTModule(
        **_net(lr=1e-2, warmup_steps=1, teacher_switch_every=2, ema_decay=0.9, ema_warmup=False)
    )
    snapshots = _Snapshots()
    _fit(module, 2, tiny_trainer, callbacks=[snapshots])
    for t_before, t_after, s_after in zip(
        snapshots.before[1]["teacher1"],
        module.teacher1.parameters(),
        module.student.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(
            t_after.detach(), 0.9 * t_before + 0.1 * s_after.detach(), rtol=1e-6, atol=1e-7
        )


def _distance(a: nn.Module, b: nn.Module) -> float:
    return math.sqrt(
        sum(float((p - q).detach().pow(2).sum()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    )


def test_teachers_are_moving_averages_of_the_student(tiny_trainer: Callable[..., L.Trainer]) -> None:
    # After the warm-up and a few moving-average updates of each, a teacher lies close to the student:
    # a small fraction of the distance between two independently initialised networks (the teachers
    # start from their own seeds). With a constant decay from the first update, each teacher would
    # still hold 0.99**4 of its own warmed-up weights.
    module = PSMTModule(**_net(lr=1e-3, warmup_steps=2, teacher_switch_every=2, ema_decay=0.99))
    _fit(module, 10, tiny_trainer)
    assert module.ema_updates.tolist() == [4, 4]
    unrelated = _distance(module.make_network(101), module.make_network(102))
    for teacher in module.teachers:
        assert _distance(teacher, module.student) < 0.1 * unrelated


@pytest.mark.slow
def test_teachers_predict_like_the_student_on_generated_data(
    tmp_path: Path, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    # A short run on the generated polyps: the teachers' average probability stays close to the student's,
    # much closer than under the official constant decay (``ema_warmup=False``), where each teacher is a
    # blend of its own warmed-up network and the student's.
    data = tiny_synthetic_datamodule(tmp_path, num_images=40)
    data.prepare_data()
    data.setup("fit")
    images = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0).image
    gaps = {}
    for warmup in (True, False):
        L.seed_everything(0, verbose=False)
        module = PSMTModule(
            **_net(lr=3e-3, warmup_steps=10, rampup_steps=10, teacher_switch_every=5, ema_decay=0.99),
            ema_warmup=warmup,
        )
        tiny_trainer(max_steps=30).fit(module, datamodule=data)
        module.eval()
        with torch.no_grad():
            heads = module.head_probabilities(images)
        gaps[warmup] = float((heads["teacher"] - heads["student"]).abs().mean())
    # measured: 0.09 against 0.24 (teacher 2 is averaged from step 15 only, and batch-norm statistics
    # are each network's own)
    assert gaps[True] < 0.5 * gaps[False]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trains_validates_and_round_trips(
    tmp_path: Path, precision: str, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    module = PSMTModule(**_net(lr=1e-2, warmup_steps=1, rampup_steps=2, teacher_switch_every=1))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    # 4 steps: one epoch of the datamodule, so that validation runs
    trainer = _fit(
        module, 4, tiny_trainer, precision=precision, limit_val_batches=1, default_root_dir=tmp_path
    )
    assert trainer.global_step == 4
    for head in PSMTModule.head_names:
        assert f"val/dice_{head}" in trainer.callback_metrics
    assert module.ema_updates.tolist() == [2, 1]
    for name in ("student.", "teacher1.", "teacher2."):
        assert any(
            not torch.equal(v, before[k]) for k, v in module.state_dict().items() if k.startswith(name)
        )
    path = tmp_path / "psmt.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert torch.equal(checkpoint["state_dict"]["ema_updates"], torch.tensor([2, 1]))
    restored = PSMTModule.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(module.hparams)
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    assert any(k.startswith("teacher1.") for k in state) and any(k.startswith("teacher2.") for k in state)
    for key, value in state.items():
        assert torch.equal(value, restored_state[key]), key
    module.eval(), restored.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(images), restored(images))


def test_resume_replays_the_draws_and_the_schedule(
    tmp_path: Path, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    """Interrupted after the warm-up and resumed: the same weights, teachers and counters as one run."""

    def run(out: Path, max_epochs: int, ckpt_path: Path | None = None) -> PSMTModule:
        L.seed_everything(0, verbose=False)
        module = PSMTModule(**_net(warmup_steps=2, rampup_steps=2, teacher_switch_every=2))
        trainer = tiny_trainer(
            deterministic=True,
            enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)],
            default_root_dir=out,
            max_epochs=max_epochs,
        )
        data = tiny_synthetic_datamodule(tmp_path / "data", steps_per_epoch=3, augment=True)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "full", max_epochs=2)
    run(tmp_path / "part", max_epochs=1)
    torch.manual_seed(12345)  # the checkpoint's random state must replace this one
    resumed = run(tmp_path / "part", max_epochs=2, ckpt_path=tmp_path / "part" / "last.ckpt")
    assert full.ema_updates.tolist() == resumed.ema_updates.tolist() == [2, 2]
    a, b = full.state_dict(), resumed.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_skipped_step_leaves_the_teachers(
    monkeypatch: pytest.MonkeyPatch, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    real = psmt_losses.confidence_weighted_ce
    monkeypatch.setattr(psmt_losses, "confidence_weighted_ce", lambda *a, **k: real(*a, **k) * math.nan)
    module = PSMTModule(**_net(warmup_steps=0, nonfinite="skip"))
    teachers = [p.detach().clone() for t in module.teachers for p in t.parameters()]
    _fit(module, 1, tiny_trainer, max_epochs=1, limit_train_batches=1)
    assert module.skipped_steps.item() == 1
    assert module.ema_updates.tolist() == [0, 0]
    assert all(
        torch.equal(a, b)
        for a, b in zip(teachers, (p for t in module.teachers for p in t.parameters()), strict=True)
    )


def test_fp16_scaler_skipped_steps_do_not_move_the_teachers(
    monkeypatch: pytest.MonkeyPatch, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    ema_calls: list[int] = []
    real_ema = psmt_method.ema_update
    monkeypatch.setattr(psmt_method, "ema_update", lambda *a, **k: ema_calls.append(1) or real_ema(*a, **k))
    module = PSMTModule(**_net(warmup_steps=1, teacher_switch_every=1))
    # An absurd initial scale overflows the first steps; the scaler divides it by 2^30 at each overflow.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-30)
    _fit(module, 4, tiny_trainer, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    skipped = int(module.fp16_skipped_steps.item())
    assert 0 < skipped < 4
    # the warm-up step (the first) moves no teacher either way; every later unskipped step moves one
    assert len(ema_calls) == int(module.ema_updates.sum()) == 3 - max(0, skipped - 1)


def test_the_runner_builds_psmt_from_its_config_with_per_seed_networks() -> None:
    import argparse

    from gpcps_lightning.tools.provenance import load_method_config
    from gpcps_lightning.tools.reproduce import _make_module

    config = load_method_config("psmt")
    assert config.class_path == "gpcps_lightning.PSMTModule"
    args = argparse.Namespace(
        arch=None,
        encoder="tu-resnet18",
        lr=None,
        encoder_weights=None,
        network_kwargs=TINY_NET["network_kwargs"],
    )
    module = _make_module(config, args, seed=1)
    assert isinstance(module, PSMTModule)
    # the runner sets the student's seed (2 * seed + 1, the supervised UNet's); the teachers follow it
    assert module.network_seed == 3 and module.teacher_seeds == teacher_seeds_for(3)
    assert module.hparams["teacher_seeds"] is None  # recorded as given: the settings do not vary by seed
    for name, value in config.init_args.items():
        assert module.hparams[name] == value


def test_teachers_keep_their_batch_norm_statistics_current_without_the_unsupervised_loss(
    tiny_trainer: Callable[..., L.Trainer],
) -> None:
    # Only parameters are averaged, so a teacher's batch-norm running statistics come from its own
    # forward passes. With unsup_weight 0 (an ablation) they must still run, or a teacher would evaluate
    # the student's averaged weights with the statistics it had at the end of the warm-up.
    module = PSMTModule(**_net(lr=1e-3, warmup_steps=2, teacher_switch_every=2, unsup_weight=0.0))
    norms = [m for t in module.teachers for m in t.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    seen: dict[int, list[torch.Tensor]] = {}

    class Statistics(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            seen[trainer.global_step] = [m.state_dict()["running_mean"].clone() for m in norms]

    _fit(module, 6, tiny_trainer, callbacks=[Statistics()])
    for now, warm in zip(seen[6], seen[2], strict=True):  # after the warm-up's last step, and at the end
        assert not torch.equal(now, warm)
