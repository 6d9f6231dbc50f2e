"""GCT: its flaw maps, targets and losses on hand-worked tensors, the flaw detector, and Trainer runs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from gpcps_lightning import GCTModule
from gpcps_lightning.losses import soft_dice_loss
from gpcps_lightning.losses.gct import (
    blur_kernel_size,
    dynamic_consistency_loss,
    dynamic_consistency_targets,
    flaw_correction_loss,
    flaw_detector_loss,
    flaw_detector_target,
    gaussian_blur,
    gaussian_kernel1d,
    gct_objective,
    postprocess_flaw_map,
)
from gpcps_lightning.networks import FlawDetector, IBNorm, build_flaw_detector
from tests.conftest import TINY_NET, RandomSemiDataModule, random_semi_batch


def _t(rows: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    x = torch.tensor(rows, dtype=torch.float32)
    return x.reshape(1, 1, *x.shape).requires_grad_(requires_grad)


def _net(**extra: Any) -> dict[str, Any]:
    """The tiny networks; a narrow flaw detector (8 channels instead of 64) that maps 32 px images to 3x3."""
    tiny = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_NET.items()}
    return {**tiny, "fd_channels": 8, "fd_min_size": 128, **extra}


def _module(**kwargs: Any) -> GCTModule:
    """A seeded module whose flaw detector sees flaws from the start (so the flaw correction acts)."""
    torch.manual_seed(0)
    module = GCTModule(**_net(**kwargs))
    with torch.no_grad():
        module.flaw_detector.classifier.bias.fill_(0.5)
    return module


# ----------------------------------------------------------------------------------- the blur
def test_blur_kernel_sizes_are_the_official_ones() -> None:
    # int(size / divisor), plus 1 when even
    assert blur_kernel_size(321, 16) == 21  # 20 -> 21 (the official PASCAL VOC crop)
    assert blur_kernel_size(256, 16) == 17
    assert blur_kernel_size(256, 4) == 65  # 64 -> 65
    assert blur_kernel_size(64, 8) == 9
    assert blur_kernel_size(63, 4) == 15  # odd already
    assert blur_kernel_size(15, 16) == 1  # 0 -> 1: no blur
    with pytest.raises(ValueError, match="`size` and `divisor` must be at least 1"):
        blur_kernel_size(0, 16)


def test_gaussian_kernel_folds_scipys_tails_back_in() -> None:
    # k = 3: sigma = 0.3 (1 - 1) + 0.8 = 0.8, radius int(3.2 + 0.5) = 3; weights exp(-j^2 / 1.28):
    # w0 = 1, w1 = e^-0.78125, w2 = e^-3.125, w3 = e^-7.03125, total 1 + 2 (w1 + w2 + w3).
    # The impulse sits at index 1 of 3; SciPy's "reflect" (d c b a | a b c d | d c b a) maps offset
    # -2 of index 0 onto index 1 (so index 0 gets w1 + w2), and offsets -3 and +3 of index 1 back onto
    # itself (w0 + 2 w3).
    w1, w2, w3 = math.exp(-0.78125), math.exp(-3.125), math.exp(-7.03125)
    total = 1 + 2 * (w1 + w2 + w3)
    expected = torch.tensor([w1 + w2, 1 + 2 * w3, w1 + w2], dtype=torch.float64) / total
    torch.testing.assert_close(gaussian_kernel1d(3), expected)
    assert torch.equal(gaussian_kernel1d(1), torch.ones(1, dtype=torch.float64))
    for k in (5, 9, 17, 21, 65):
        kernel = gaussian_kernel1d(k)
        assert kernel.sum().item() == pytest.approx(1.0) and torch.equal(kernel, kernel.flip(0))
        assert kernel.argmax().item() == k // 2
    with pytest.raises(ValueError, match="`kernel_size` must be a positive odd number"):
        gaussian_kernel1d(4)


def test_gaussian_blur_is_the_outer_product_with_reflection_padding() -> None:
    k = gaussian_kernel1d(3).float()
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1.0
    out = gaussian_blur(impulse, (3, 3))
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = torch.outer(k, k)
    torch.testing.assert_close(out[0, 0], expected)
    # Reflection padding without repeating the edge (ReflectionPad2d): [1, 0, 0, 0] pads to
    # [0, 1, 0, 0, 0, 0]; so out[0] = k[1] (the centre weight), out[1] = k[0], the rest 0.
    row = gaussian_blur(_t([[1.0, 0.0, 0.0, 0.0]]), (1, 3))
    torch.testing.assert_close(row, _t([[k[1].item(), k[0].item(), 0.0, 0.0]]))
    # constant maps stay constant
    torch.testing.assert_close(
        gaussian_blur(torch.full((2, 1, 8, 8), 0.3), (5, 3)), torch.full((2, 1, 8, 8), 0.3)
    )


# ----------------------------------------------------------------------------------- flaw maps and targets
def test_postprocess_flaw_map_hand_worked() -> None:
    # 2x2 maps: kernel int(2 / 16) = 0 -> 1, so no blur. Per sample:
    # a) [[-0.5, 0.2], [0.6, 1.0]] -> negatives to 0 -> min 0, max 1 > 0.1 -> unchanged (/ (1 + 1e-9)).
    # b) [[0.05, 0.08], [0.06, 0.07]]: max 0.08 <= 0.1 -> zeroed, then (0 - 0.05) / (0.08 - 0.05 + 1e-9):
    #    the official order (min and max taken before zeroing) gives the constant -5/3.
    # c) [[-1, -1], [0.05, 0]] -> [[0, 0], [0.05, 0]]: max 0.05 -> zeroed, min 0 -> 0.
    flaw = torch.tensor(
        [[[-0.5, 0.2], [0.6, 1.0]], [[0.05, 0.08], [0.06, 0.07]], [[-1.0, -1.0], [0.05, 0.0]]]
    ).unsqueeze(1)
    flaw.requires_grad_(True)
    out = postprocess_flaw_map(flaw)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.2], [0.6, 1.0]]))
    torch.testing.assert_close(out[1, 0], torch.full((2, 2), -5.0 / 3.0))
    torch.testing.assert_close(out[2, 0], torch.zeros(2, 2))
    # a map at the threshold counts as flawless; a lower threshold keeps it
    torch.testing.assert_close(
        postprocess_flaw_map(flaw[1:2], clip_threshold=0.05)[0, 0], _t([[0, 1], [1 / 3, 2 / 3]])[0, 0]
    )


def test_postprocess_flaw_map_blurs_with_a_sixteenth_of_the_side() -> None:
    flaw = torch.randn(2, 1, 32, 48)
    blurred = gaussian_blur(flaw.clamp(min=0), (3, 3))  # int(32 / 16) = 2 -> 3, int(48 / 16) = 3
    lo = blurred.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = blurred.flatten(1).amax(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(postprocess_flaw_map(flaw), (blurred - lo) / (hi - lo + 1e-9))


def test_dynamic_consistency_targets_hand_worked() -> None:
    # threshold 0.6; a flaw above it counts as 1. Per pixel (f1, f2) -> who teaches:
    # (0.1, 0.3): net1 better -> both targets p1 = 0.9
    # (0.5, 0.2): net2 better -> both targets p2 = 0.8
    # (0.7, 0.9): both above -> 1 = 1, a tie: each keeps its own (0.7, 0.3); both_flawed = 1
    # (0.65, 0.1): net1 above -> both p2 = 0.6
    # (0.3, 0.3): tie below -> each its own (0.5, 0.25)
    # (0.7, 0.6): 0.6 is not above the threshold -> net2 better -> both p2 = 0.35
    p1 = _t([[0.9, 0.2, 0.7], [0.4, 0.5, 0.1]], requires_grad=True)
    p2 = _t([[0.1, 0.8, 0.3], [0.6, 0.25, 0.35]], requires_grad=True)
    f1 = _t([[0.1, 0.5, 0.7], [0.65, 0.3, 0.7]])
    f2 = _t([[0.3, 0.2, 0.9], [0.1, 0.3, 0.6]])
    t1, t2, both = dynamic_consistency_targets(p1, p2, f1, f2, threshold=0.6)
    torch.testing.assert_close(t1, _t([[0.9, 0.8, 0.7], [0.6, 0.5, 0.35]]))
    torch.testing.assert_close(t2, _t([[0.9, 0.8, 0.3], [0.6, 0.25, 0.35]]))
    assert torch.equal(both, _t([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert not (t1.requires_grad or t2.requires_grad or both.requires_grad)
    with pytest.raises(ValueError, match="`threshold` of the dynamic consistency must be in"):
        dynamic_consistency_targets(p1, p2, f1, f2, threshold=1.5)
    with pytest.raises(ValueError, match="same shape"):
        dynamic_consistency_targets(p1, p2, f1, f2[..., :2])


def test_flaw_detector_target_hand_worked() -> None:
    # 3x3 maps: the blur kernels int(3 / 8) and int(3 / 4) are 0 -> 1, no blur.
    # |y - p| = [[0.5, 0, 0], [0, 0, 0.25], [0, 0, 0]]; normalised by its maximum 0.5 without dilation.
    y = _t([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = _t([[0.5, 0.0, 0.0], [0.0, 0.0, 0.25], [0.0, 0.0, 0.0]], requires_grad=True)
    torch.testing.assert_close(
        flaw_detector_target(p, y, dilations=0), _t([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    )
    # One 3x3 max filter (reflection padding re-uses pixels of the window): e.g. the top-right pixel
    # sees rows 0-1, columns 1-2 -> 0.25; the bottom-left rows 1-2, columns 0-1 -> 0. Then / 0.5.
    out = flaw_detector_target(p, y, dilations=1)
    torch.testing.assert_close(out, _t([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5], [0.0, 0.5, 0.5]]))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="`dilations` must be >= 0"):
        flaw_detector_target(p, y, dilations=-1)


def test_flaw_detector_target_at_image_size_is_in_unit_range() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 1, 32, 32, generator=g)
    y = (torch.rand(3, 1, 32, 32, generator=g) > 0.5).float()
    out = flaw_detector_target(p, y)
    flat = out.flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(3))
    torch.testing.assert_close(flat.amax(1), torch.ones(3))
    # only the difference counts: the same |y - p| from another pair gives the same target
    torch.testing.assert_close(flaw_detector_target(1 - p, 1 - y), out)


# ----------------------------------------------------------------------------------- loss terms
def test_flaw_correction_loss_hand_worked() -> None:
    flaw = _t([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    mask = _t([[1.0, 0.0], [1.0, 0.0]])
    out = flaw_correction_loss(flaw, mask)
    torch.testing.assert_close(out, torch.tensor(0.3125))  # (1 + 0.25) / 4: the mean runs over all 4
    out.backward()
    assert flaw.grad is not None
    torch.testing.assert_close(flaw.grad, _t([[0.5, 0.0], [0.25, 0.0]]))  # 2 mask f / 4
    torch.testing.assert_close(flaw_correction_loss(flaw), torch.tensor(3.5625))  # (1 + 4 + 0.25 + 9) / 4
    double = _t([[0.3, -0.7], [1.1, 0.2]]).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: flaw_correction_loss(f, mask.double()), (double,))


def test_consistency_and_detector_losses_hand_worked() -> None:
    p = _t([[0.5, 1.0], [0.0, 0.25]], requires_grad=True)
    t = _t([[0.5, 0.5], [0.5, 0.75]], requires_grad=True)
    # differences 0, 0.5, -0.5, -0.5 -> mean of squares 0.1875
    out = dynamic_consistency_loss(p, t)
    torch.testing.assert_close(out, torch.tensor(0.1875))
    out.backward()
    assert p.grad is not None and t.grad is None  # the target is detached
    torch.testing.assert_close(p.grad, _t([[0.0, 0.25], [-0.25, -0.25]]))
    torch.testing.assert_close(flaw_detector_loss(p, t), torch.tensor(0.1875))
    with pytest.raises(ValueError, match="same shape"):
        flaw_detector_loss(p, t[..., :1])


def _objective_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (4, 1, 16, 16)  # 2 labeled then 2 unlabeled
    p1, p2 = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    flaw1, flaw2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    y = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    return {
        "p1": p1.requires_grad_(True),
        "p2": p2.requires_grad_(True),
        "y": y,
        "flaw1": flaw1.requires_grad_(True),
        "flaw2": flaw2.requires_grad_(True),
        "flaw1_frozen": flaw1.detach().clone().requires_grad_(True),
        "flaw2_frozen": flaw2.detach().clone().requires_grad_(True),
    }


def test_gct_objective_is_its_terms() -> None:
    x = _objective_inputs()
    out = gct_objective(**x, fc_weight=2.0, dc_weight=3.0, fd_weight=5.0, dc_threshold=0.3)
    p1, p2, y = x["p1"], x["p2"], x["y"]
    h1, h2 = postprocess_flaw_map(x["flaw1"]), postprocess_flaw_map(x["flaw2"])
    t1, t2, both = dynamic_consistency_targets(p1, p2, h1, h2, 0.3)
    assert 0 < both.mean() < 1
    sup = soft_dice_loss(p1[:2], y) + soft_dice_loss(p2[:2], y)
    flaw = flaw_correction_loss(x["flaw1_frozen"], both) + flaw_correction_loss(x["flaw2_frozen"], both)
    dc = F.mse_loss(p1, t1) + F.mse_loss(p2, t2)
    fd = (
        F.mse_loss(x["flaw1"][:2], flaw_detector_target(p1[:2], y))
        + F.mse_loss(x["flaw2"][:2], flaw_detector_target(p2[:2], y))
    ) / 2
    for got, want in ((out.sup, sup), (out.flaw, flaw), (out.dc, dc), (out.fd, fd)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.total, sup + 2.0 * flaw + 3.0 * dc + 5.0 * fd)
    assert out.dc_weight == 3.0
    # Gradient paths: the detector's output on detached predictions gets the detector's loss only,
    # on the unlabeled rows nothing; the frozen maps get the flaw correction only.
    out.total.backward()
    g1 = x["flaw1"].grad
    assert g1 is not None and x["flaw1_frozen"].grad is not None
    target1 = flaw_detector_target(p1[:2], y)
    torch.testing.assert_close(g1[:2], 5.0 * 2 * (x["flaw1"][:2] - target1).detach() / target1.numel() / 2)
    assert torch.equal(g1[2:], torch.zeros_like(g1[2:]))
    torch.testing.assert_close(
        x["flaw1_frozen"].grad, 2.0 * 2 * both * x["flaw1_frozen"].detach() / both.numel()
    )


def test_gct_objective_modes() -> None:
    x = _objective_inputs()
    full = gct_objective(**x, dc_threshold=0.3)
    dc_only = gct_objective(**{**x, "flaw1_frozen": None, "flaw2_frozen": None}, mode="dc", dc_threshold=0.3)
    assert dc_only.flaw.item() == 0.0
    torch.testing.assert_close(dc_only.dc, full.dc)
    fc_only = gct_objective(**x, mode="fc")
    assert fc_only.dc.item() == 0.0
    unmasked = flaw_correction_loss(x["flaw1_frozen"]) + flaw_correction_loss(x["flaw2_frozen"])
    torch.testing.assert_close(fc_only.flaw, unmasked)
    # without the flaw correction the frozen maps are not needed
    no_fc = gct_objective(
        **{**x, "flaw1_frozen": None, "flaw2_frozen": None}, fc_weight=0.0, dc_threshold=0.3
    )
    torch.testing.assert_close(no_fc.total, full.total - full.flaw)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mode": "both"}, "`mode` must be 'gct', 'dc' or 'fc'"),
        ({"fc_weight": -1.0}, "`fc_weight` must be >= 0"),
        ({"flaw1_frozen": None}, "`flaw1_frozen` and `flaw2_frozen` are needed"),
        ({"y": torch.zeros(5, 1, 16, 16)}, "must hold the 5 labeled images of `y`"),
        ({"flaw2": torch.zeros(4, 1, 16, 8)}, "same shape"),
    ],
)
def test_gct_objective_errors(change: dict[str, Any], match: str) -> None:
    x: dict[str, Any] = _objective_inputs()
    mode = change.pop("mode", "gct")
    weight = change.pop("fc_weight", 1.0)
    with pytest.raises(ValueError, match=match):
        gct_objective(**{**x, **change}, mode=mode, fc_weight=weight)


# ----------------------------------------------------------------------------------- the flaw detector
def test_ibnorm_normalises_half_by_batch_half_by_instance() -> None:
    norm = IBNorm(5)  # int(5 * 0.5 + 0.5) = 3 batch-norm channels, 2 instance-norm channels
    assert norm.num_bn == 3 and norm.bnorm.affine and not norm.inorm.affine
    x = torch.randn(4, 5, 6, 6)
    expected = torch.cat(
        [F.batch_norm(x[:, :3], None, None, training=True), F.instance_norm(x[:, 3:])], dim=1
    )
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("size", [(32, 32), (59, 70), (64, 64), (60, 96)])
def test_flaw_detector_maps_any_size_to_the_image_size(size: tuple[int, int]) -> None:
    fd = build_flaw_detector(4, seed=0)
    out = fd(torch.randn(2, 3, *size), torch.rand(2, 1, *size))
    assert out.shape == (2, 1, *size)
    # five stride-2 convolutions (the last is the classifier), three stride-1 ones, eight in all
    convs = [m for m in fd.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (4, 4) for c in convs) and convs[0].in_channels == 4


def test_flaw_map_grid_and_the_enlarged_input() -> None:
    fd = build_flaw_detector(4, channels=8)
    # about side / 32 cells: one at the CPU protocol's 64 px, 7 at 256, 9 at the official 321 px
    assert [fd.map_size(n, n)[0] for n in (32, 64, 96, 128, 256, 321, 513)] == [1, 1, 2, 3, 7, 9, 15]
    enlarged = build_flaw_detector(4, channels=8, min_size=256)
    assert enlarged.map_size(64, 64) == (7, 7) and enlarged.map_size(512, 64) == (15, 7)
    out = enlarged(torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64) and out[0].std() > 0  # not one value per image
    with pytest.raises(ValueError, match="`min_size` of the flaw detector must be at least 60"):
        build_flaw_detector(4, min_size=32)


def test_a_flat_flaw_map_is_warned_about_once() -> None:
    module = GCTModule(**_net(fd_min_size=60))
    with pytest.warns(UserWarning, match="reduces 32x32 images to a single value per image"):
        module.compute_losses(random_semi_batch(), step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.compute_losses(random_semi_batch(), step=1)  # once only
        GCTModule(**_net()).compute_losses(random_semi_batch(), step=0)  # 3x3 maps: no warning


def test_build_flaw_detector_is_seeded() -> None:
    state = torch.random.get_rng_state()
    a, b, c = build_flaw_detector(4, seed=3), build_flaw_detector(4, seed=3), build_flaw_detector(4, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert isinstance(a, FlawDetector)
    with pytest.raises(ValueError, match="`in_channels` of the flaw detector must be at least 2"):
        build_flaw_detector(1)


# ----------------------------------------------------------------------------------- the module
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fc_weight": -1.0}, "`fc_weight` must be >= 0"),
        ({"dc_weight": -1.0}, "`dc_weight` must be >= 0"),
        ({"fd_weight": -1.0}, "`fd_weight` must be >= 0"),
        ({"dc_threshold": 1.5}, r"`dc_threshold` must be in \[0, 1\]"),
        ({"rampup_steps": -1}, "`rampup_steps` must be >= 0"),
        ({"fd_lr": 0.0}, "`fd_lr` must be positive"),
        ({"fd_betas": (0.9, 1.0)}, r"`fd_betas` must be two numbers in \[0, 1\)"),
        ({"fd_target_dilations": -1}, "`fd_target_dilations` must be >= 0"),
        ({"flaw_clip_threshold": -0.1}, "`flaw_clip_threshold` must be >= 0"),
        ({"fd_channels": 0}, "`fd_channels` must be at least 1"),
        ({"fd_min_size": 59}, "`fd_min_size` must be at least 60"),
        ({"ssl_mode": "both"}, "`ssl_mode` must be 'gct', 'dc' or 'fc'"),
        ({"seeds": (3, 3)}, "`seeds` must be two different integers"),
        ({"dice": "hard"}, "`dice` must be 'soft' or 'authors'"),
    ],
)
def test_module_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GCTModule(**_net(**kwargs))


def test_defaults_parameter_groups_and_ramp() -> None:
    module = GCTModule(**_net(weight_decay=1e-4, fd_channels=64))
    assert module.head_names == ("net1", "net2", "ensemble") and module.selection_head == "ensemble"
    assert module.dc_weight_at(0) == pytest.approx(100.0 * math.exp(-5.0))
    assert module.dc_weight_at(375) == pytest.approx(100.0 * math.exp(-1.25))
    assert module.dc_weight_at(750) == 100.0
    optimizer = module.configure_optimizers()
    groups = optimizer.param_groups
    assert len(groups) == 3
    for group, net in zip(groups, (module.net1, module.net2, module.flaw_detector), strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters()]
    assert groups[0]["lr"] == groups[1]["lr"] == 1e-4 and groups[0]["betas"] == (0.9, 0.999)
    assert groups[0]["weight_decay"] == 1e-4
    assert groups[2]["lr"] == 1e-4 and groups[2]["betas"] == (0.9, 0.99) and groups[2]["weight_decay"] == 0.0
    assert module.flaw_detector.conv1.in_channels == 4  # RGB + the probability
    assert module.flaw_detector.conv1.out_channels == 64 and module.flaw_detector.conv4_1.out_channels == 512
    # the flaw detector's seed follows the networks' seeds
    other = GCTModule(**_net(seeds=(3, 4)))
    assert not torch.equal(other.flaw_detector.conv1.weight, module.flaw_detector.conv1.weight)


def test_compute_losses_is_the_objective_of_the_outputs_and_gradients_stay_apart() -> None:
    module = _module(dc_threshold=0.5, rampup_steps=0)
    module.eval()  # batch norm on running statistics: every forward pass gives the same maps
    batch = random_semi_batch()
    losses = module.compute_losses(batch, step=0)
    with torch.no_grad():
        x = torch.cat([batch.labeled, batch.unlabeled])
        p1, p2 = torch.sigmoid(module.net1(x)), torch.sigmoid(module.net2(x))
        f1, f2 = module.flaw_detector(x, p1), module.flaw_detector(x, p2)
        expected = gct_objective(p1, p2, batch.mask, f1, f2, f1, f2, dc_weight=100.0, dc_threshold=0.5)
    for name in ("total", "sup", "flaw", "dc", "fd"):
        torch.testing.assert_close(getattr(losses, name), getattr(expected, name), msg=name)
    assert losses.flaw > 0 and losses.dc > 0 and losses.fd > 0

    def grads(loss: torch.Tensor, net: nn.Module) -> list[torch.Tensor]:
        module.zero_grad()
        loss.backward(retain_graph=True)
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]

    # The detector learns from its own loss only; the task networks from everything but that loss.
    detector_total = grads(losses.total, module.flaw_detector)
    detector_own = grads(10.0 * losses.fd, module.flaw_detector)
    for a, b in zip(detector_total, detector_own, strict=True):
        torch.testing.assert_close(a, b)
    net1_total = grads(losses.total, module.net1)
    net1_task = grads(losses.sup + losses.flaw + 100.0 * losses.dc, module.net1)
    for a, b in zip(net1_total, net1_task, strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads(losses.flaw, module.net1))  # the correction reaches net1


def _one_step(**kwargs: Any) -> dict[str, torch.Tensor]:
    module = _module(lr=1e-2, rampup_steps=0, dc_threshold=0.5, **kwargs)
    optimizer = module.configure_optimizers()
    module.compute_losses(random_semi_batch(), step=0).total.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and a[k].is_floating_point())


def test_each_weight_changes_the_update_of_the_networks_it_trains() -> None:
    base = _one_step()
    initial = {k: v.clone() for k, v in _module().state_dict().items()}
    for prefix in ("net1.", "net2.", "flaw_detector."):
        assert _changed(base, initial, prefix), f"{prefix} not trained"
    for change in ({"fc_weight": 5.0}, {"dc_weight": 1000.0}):
        other = _one_step(**change)
        assert _changed(base, other, "net1.") and _changed(base, other, "net2."), change
        assert not _changed(base, other, "flaw_detector."), change  # the task terms never train the detector
    # The detector's loss is its whole objective and Adam ignores the scale of a whole objective, so
    # fd_weight shows in the update only through Adam's eps; switched off, the detector stays put.
    off = _one_step(fd_weight=0.0)
    assert not _changed(off, initial, "flaw_detector.conv") and not _changed(base, off, "net1.")


def test_fd_weight_scales_the_detector_gradient() -> None:
    def detector_grad(fd_weight: float) -> torch.Tensor:
        module = _module(fd_weight=fd_weight)
        module.compute_losses(random_semi_batch(), step=0).total.backward()
        return torch.cat([p.grad.flatten() for p in module.flaw_detector.parameters() if p.grad is not None])

    torch.testing.assert_close(detector_grad(20.0), 2.0 * detector_grad(10.0))


@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", pytest.param("16-mixed", marks=pytest.mark.slow)]
)  # fp16 on a CPU is slow
def test_trains_validates_and_round_trips(tmp_path: Path, precision: str, tiny_trainer: Any) -> None:
    torch.manual_seed(0)
    module = GCTModule(**_net(lr=1e-2, rampup_steps=2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    plugins = {}
    if precision == "16-mixed":  # Lightning turns "16-mixed" into bf16 on a CPU; keep fp16 and its scaler
        plugins = {"plugins": [MixedPrecision("16-mixed", device="cpu")]}
    else:
        plugins = {"precision": precision}
    trainer: L.Trainer = tiny_trainer(
        default_root_dir=tmp_path, max_steps=2, limit_val_batches=1, log_every_n_steps=1, **plugins
    )
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=4))
    assert trainer.global_step == 2  # one optimizer: one step per training step
    metrics = trainer.callback_metrics
    for key in ("loss", "loss_sup", "loss_flaw", "loss_dc", "loss_fd", "dc_weight"):
        assert f"train/{key}" in metrics and torch.isfinite(metrics[f"train/{key}"]), key
    assert metrics["train/dc_weight"].item() == pytest.approx(100.0 * math.exp(-5.0 / 4))  # step 1 of 2
    for head in GCTModule.head_names:
        assert f"val/dice_{head}" in metrics and f"val/iou_{head}" in metrics
    if precision != "16-mixed":  # the scaler may skip the first steps of a fresh fp16 run
        for prefix in ("net1.", "net2.", "flaw_detector."):
            assert _changed(before, module.state_dict(), prefix), prefix

    path = tmp_path / "gct.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    (optimizer_state,) = ckpt["optimizer_states"]
    assert [g["betas"] for g in optimizer_state["param_groups"]] == [(0.9, 0.999), (0.9, 0.999), (0.9, 0.99)]
    restored = GCTModule.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(module.hparams)
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys() and any(k.startswith("flaw_detector.") for k in state)
    for key, value in state.items():
        assert torch.equal(value, restored_state[key]), key


def test_resume_restores_the_detector_and_its_optimizer_state(tmp_path: Path, tiny_trainer: Any) -> None:
    def fit(max_steps: int, ckpt_path: Path | None = None) -> tuple[GCTModule, L.Trainer]:
        torch.manual_seed(0)
        module = GCTModule(**_net(lr=1e-2, rampup_steps=2))
        trainer: L.Trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=max_steps)
        trainer.fit(
            module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=2), ckpt_path=ckpt_path
        )
        return module, trainer

    straight, _ = fit(2)
    _, first = fit(1)
    first.save_checkpoint(tmp_path / "one.ckpt")
    resumed, trainer = fit(2, tmp_path / "one.ckpt")
    assert trainer.global_step == 2
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
    adam_state = trainer.optimizers[0].state
    assert all(p in adam_state for p in resumed.flaw_detector.parameters())
