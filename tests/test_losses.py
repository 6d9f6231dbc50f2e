"""The GP-CPS losses: hand-worked values, reference implementations, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gpcps_lightning.losses import (
    authors_background_mask,
    authors_dice_loss,
    background_mask,
    fuse_images,
    fused_pseudo_labels,
    gradient_penalty,
    input_gradient,
    sample_eps,
    soft_dice_loss,
)


def _map(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, len(rows), len(rows[0]))


# ---------------------------------------------------------------- hand-worked values
def test_soft_dice_loss_hand_worked() -> None:
    p = torch.cat([_map([[0.5, 1.0], [0.0, 0.25]]), _map([[0.0, 0.0], [0.0, 0.0]])])
    t = torch.cat([_map([[1.0, 1.0], [0.0, 0.0]]), _map([[0.0, 0.0], [0.0, 0.0]])])
    # sample 0: sum(p*t) = 1.5, sum(p) = 1.75, sum(t) = 2 -> dice = (3 + 1) / (1.75 + 2 + 1) = 4 / 4.75
    # sample 1: empty prediction and target -> dice = (0 + 1) / (0 + 0 + 1) = 1
    expected = ((1 - 4 / 4.75) + 0.0) / 2
    assert soft_dice_loss(p, t).item() == pytest.approx(expected, abs=1e-7)


def test_soft_dice_loss_soft_target_and_smooth() -> None:
    p = _map([[0.2, 0.8], [0.6, 0.4]])
    t = _map([[0.5, 0.5], [1.0, 0.0]])
    # sum(p*t) = 0.1 + 0.4 + 0.6 + 0 = 1.1, sum(p) = 2.0, sum(t) = 2.0, s = 0.5
    expected = 1 - (2.2 + 0.5) / (4.0 + 0.5)
    assert soft_dice_loss(p, t, smooth=0.5).item() == pytest.approx(expected, abs=1e-7)


def test_perfect_prediction_has_zero_soft_dice_loss() -> None:
    t = _map([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert soft_dice_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)


def test_authors_dice_loss_hand_worked() -> None:
    p = torch.cat([_map([[0.5, 1.0], [0.0, 0.25]]), _map([[0.0, 0.0], [0.0, 0.0]])])
    t = torch.cat([_map([[1.0, 1.0], [0.0, 0.0]]), _map([[0.0, 0.0], [0.0, 0.0]])])
    # batch-global: sum(p*t) = 1.5, sum(p^2) = 0.25 + 1 + 0.0625 = 1.3125, sum(t^2) = 2
    s = 1e-5
    expected = 1 - (3.0 + s) / (3.3125 + s)
    assert authors_dice_loss(p, t).item() == pytest.approx(expected, abs=1e-7)


def test_fused_pseudo_labels_hand_worked_and_detached() -> None:
    y = _map([[1.0, 0.0], [1.0, 0.0]])
    p_other = _map([[0.2, 0.4], [0.6, 0.8]]).requires_grad_(True)
    eps = torch.full((1, 1, 1, 1), 0.25)
    out = fused_pseudo_labels(y, p_other, eps)
    torch.testing.assert_close(out, _map([[0.4, 0.3], [0.7, 0.6]]))
    assert not out.requires_grad
    assert out.grad_fn is None


def test_background_mask_hand_worked() -> None:
    y = _map([[1.0, 1.0], [0.0, 0.0]])
    p1 = _map([[0.9, 0.2], [0.9, 0.1]])
    p2 = _map([[0.8, 0.6], [0.7, 0.2]])
    # mean = [[0.85, 0.4], [0.8, 0.15]]: below 0.5 at (0,1), (1,1); y < 0.5 at row 1
    expected = torch.tensor([[False, True], [True, True]]).reshape(1, 1, 2, 2)
    out = background_mask(y, p1, p2)
    assert out.dtype == torch.bool
    assert torch.equal(out, expected)
    # a higher threshold adds (1, 0) only through y; (0, 0) stays foreground until threshold > 0.85
    assert torch.equal(background_mask(y, p1, p2, threshold=0.9), torch.ones_like(expected))


def test_gradient_penalty_hand_worked() -> None:
    grad = torch.tensor(
        [
            [[10.0, -1.0], [2.0, -3.0]],
            [[100.0, 4.0], [-5.0, 6.0]],
            [[-1000.0, 0.0], [0.5, -0.5]],
        ]
    ).unsqueeze(0)
    bg = torch.tensor([[False, True], [True, True]]).reshape(1, 1, 2, 2)
    # |grad| on the 3 background pixels of the 3 channels: (1+2+3) + (4+5+6) + (0+0.5+0.5) = 22 over 9
    assert gradient_penalty(grad, bg).item() == pytest.approx(22 / 9, abs=1e-6)


def test_gradient_penalty_is_exactly_zero_on_empty_background() -> None:
    grad = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = gradient_penalty(grad, torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert grad.grad is not None and torch.count_nonzero(grad.grad) == 0


def test_gradient_penalty_ignores_nonfinite_values_outside_background() -> None:
    grad = torch.tensor([[[[float("inf"), 2.0]]]]).expand(1, 3, 1, 2).clone()
    bg = torch.tensor([[[[False, True]]]])
    assert gradient_penalty(grad, bg).item() == pytest.approx(2.0)


def test_authors_background_mask_excludes_a_band() -> None:
    y = torch.zeros(1, 1, 4, 4)
    y[0, 0, 0, 0] = 1.0
    out = authors_background_mask(y)
    expected = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    expected[0, 0, :2, :2] = False  # the foreground pixel and its 8-neighbours inside the image
    assert torch.equal(out, expected)
    assert torch.equal(authors_background_mask(y, band=0), y == 0)


def test_fuse_images_and_eps() -> None:
    labeled = torch.ones(2, 3, 2, 2)
    unlabeled = torch.zeros(2, 3, 2, 2)
    eps = torch.tensor([0.25, 0.75]).reshape(2, 1, 1, 1)
    f = fuse_images(labeled, unlabeled, eps)
    assert torch.equal(f[0], torch.full((3, 2, 2), 0.25))
    assert torch.equal(f[1], torch.full((3, 2, 2), 0.75))

    g = torch.Generator().manual_seed(0)
    per_sample = sample_eps(64, "per_sample", generator=g)
    assert per_sample.shape == (64, 1, 1, 1)
    assert per_sample.min() >= 0 and per_sample.max() < 1
    assert per_sample.unique().numel() == 64
    per_batch = sample_eps(5, "per_batch", generator=g)
    assert per_batch.unique().numel() == 1


# ---------------------------------------------------------------- reference implementations
def _reference_soft_dice(p: torch.Tensor, t: torch.Tensor, s: float = 1.0) -> float:
    losses = []
    for i in range(p.shape[0]):
        pi, ti = p[i].double().flatten().tolist(), t[i].double().flatten().tolist()
        inter = sum(a * b for a, b in zip(pi, ti, strict=True))
        losses.append(1 - (2 * inter + s) / (sum(pi) + sum(ti) + s))
    return sum(losses) / len(losses)


def _reference_penalty(g: torch.Tensor, bg: torch.Tensor) -> float:
    total, count = 0.0, 0
    n, c, h, w = g.shape
    for i in range(n):
        for k in range(c):
            for r in range(h):
                for col in range(w):
                    if bg[i, 0, r, col]:
                        total += abs(float(g[i, k, r, col]))
                        count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_losses_match_reference_on_random_inputs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, h, w = 3, 5, 4
    p1, p2 = torch.rand(n, 1, h, w, generator=g), torch.rand(n, 1, h, w, generator=g)
    y = (torch.rand(n, 1, h, w, generator=g) > 0.5).float()
    eps = torch.rand(n, 1, 1, 1, generator=g)
    y1 = fused_pseudo_labels(y, p2, eps)
    assert soft_dice_loss(p1, y1).item() == pytest.approx(_reference_soft_dice(p1, y1), rel=1e-6)
    assert y1.min() >= 0 and y1.max() <= 1  # pseudo labels stay in [0, 1]
    bg = background_mask(y, p1, p2)
    for i in range(n):
        for r in range(h):
            for col in range(w):
                want = y[i, 0, r, col] < 0.5 or (p1[i, 0, r, col] + p2[i, 0, r, col]) / 2 < 0.5
                assert bool(bg[i, 0, r, col]) == bool(want)
    grad = torch.randn(n, 3, h, w, generator=g)
    assert gradient_penalty(grad, bg).item() == pytest.approx(_reference_penalty(grad, bg), rel=1e-5)


def test_soft_dice_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: soft_dice_loss(x, t).double(), (p,))


# ---------------------------------------------------------------- the penalty's input gradient
class _SmoothNet(nn.Module):
    """A small smooth network (tanh), so finite differences of first and second order are accurate."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _output_sum(nets: list[nn.Module], f: torch.Tensor) -> torch.Tensor:
    return sum(torch.sigmoid(net(f)).sum() for net in nets)  # type: ignore[return-value]


def test_input_gradient_is_dS_df_by_finite_differences() -> None:
    nets = [_SmoothNet(1).double(), _SmoothNet(2).double()]
    f = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    grad = input_gradient(_output_sum(nets, f), f)
    assert grad.requires_grad  # create_graph=True: the penalty can train the networks
    h = 1e-6
    for index in [(0, 0, 0, 0), (0, 1, 2, 3), (1, 2, 4, 4), (1, 0, 2, 2)]:
        with torch.no_grad():
            fp, fm = f.clone(), f.clone()
            fp[index] += h
            fm[index] -= h
            fd = (_output_sum(nets, fp) - _output_sum(nets, fm)) / (2 * h)
        assert grad[index].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)


def test_penalty_parameter_gradient_matches_finite_differences() -> None:
    """Second order: d L_grad / d theta by autograd equals the finite difference in theta."""
    nets = [_SmoothNet(1).double(), _SmoothNet(2).double()]
    f0 = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    bg = torch.rand(1, 1, 4, 4) > 0.3

    def penalty() -> torch.Tensor:
        f = f0.clone().requires_grad_(True)
        return gradient_penalty(input_gradient(_output_sum(nets, f), f), bg)

    loss = penalty()
    params = [p for net in nets for p in net.parameters()]
    grads = torch.autograd.grad(loss, params)
    assert all(gr.abs().sum() > 0 for gr in grads)  # every parameter of both networks is trained
    h = 1e-6
    for param, gr in [(nets[0].body[0].weight, grads[0]), (nets[1].body[2].bias, grads[7])]:
        idx = (0,) * param.ndim
        with torch.no_grad():
            param[idx] += h
        up = penalty().item()
        with torch.no_grad():
            param[idx] -= 2 * h
        down = penalty().item()
        with torch.no_grad():
            param[idx] += h
        assert gr[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_input_gradient_with_grad_scaler_equals_unscaled() -> None:
    nets = [_SmoothNet(1), _SmoothNet(2)]
    f = torch.randn(2, 3, 5, 5, requires_grad=True)
    plain = input_gradient(_output_sum(nets, f), f)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = input_gradient(_output_sum(nets, f), f, scaler)
    # a power-of-two scale is exact in binary floating point
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)
    assert scaled.requires_grad


def test_input_gradient_reports_overflow_as_nonfinite() -> None:
    net = _SmoothNet(1)
    f = torch.randn(1, 3, 4, 4, requires_grad=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with torch.autocast("cpu", dtype=torch.float16):
        total = torch.sigmoid(net(f)).float().sum() * 1e3
    grad = input_gradient(total, f, scaler)
    assert not torch.isfinite(grad).all()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: soft_dice_loss(torch.rand(2, 2, 3, 3), torch.rand(2, 2, 3, 3)), "probs"),
        (lambda: soft_dice_loss(torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 4)), "same shape"),
        (lambda: soft_dice_loss(torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3), smooth=0), "smooth"),
        (lambda: soft_dice_loss(torch.rand(1, 3, 3), torch.rand(1, 3, 3)), r"\(N, 1, H, W\)"),
        (lambda: fused_pseudo_labels(torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3), torch.rand(2)), "eps"),
        (
            lambda: fuse_images(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5), torch.rand(2, 1, 1, 1)),
            "same shape",
        ),
        (
            lambda: background_mask(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), torch.rand(1, 1, 3, 2)),
            "p2",
        ),
        (lambda: gradient_penalty(torch.rand(1, 3, 2, 2), torch.ones(1, 1, 2, 2)), "bool"),
        (lambda: gradient_penalty(torch.rand(1, 3, 2, 2), torch.ones(1, 1, 2, 3, dtype=torch.bool)), "shape"),
        (lambda: input_gradient(torch.ones(2), torch.ones(2, requires_grad=True)), "scalar"),
        (lambda: input_gradient(torch.ones(()), torch.ones(2)), "require grad"),
        (lambda: sample_eps(0), "at least 1"),
        (lambda: sample_eps(2, "nope"), "per_sample"),  # type: ignore[arg-type]
        (lambda: authors_background_mask(torch.rand(1, 1, 2, 2), band=-1), "band"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()


def test_dice_math_constants() -> None:
    # guard against an accidental change of the specification's defaults
    import inspect

    assert inspect.signature(soft_dice_loss).parameters["smooth"].default == 1.0
    assert math.isclose(inspect.signature(authors_dice_loss).parameters["smooth"].default, 1e-5)
    assert inspect.signature(background_mask).parameters["threshold"].default == 0.5
