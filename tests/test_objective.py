"""GP-CPS's whole objective (Eq. 17) as a pure function, and the Dice loss's options.

Hand-worked values on 2x2 maps, the switches of the ablation rows, and the module: its
``compute_losses`` is ``gpcps_objective`` of its networks' outputs, bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_NET, random_semi_batch

from gpcps_lightning import GPCPSModule, SemiSupervisedBatch
from gpcps_lightning.losses import (
    authors_dice_loss,
    dice_loss,
    dice_loss_function,
    fuse_images,
    gpcps_objective,
    output_sum,
    semi_supervised_loss,
    soft_dice_loss,
    supervised_loss,
    total_loss,
)


def _map(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, len(rows), len(rows[0]))


# ---------------------------------------------------------------- one Dice with options
def test_dice_loss_options_hand_worked() -> None:
    p = torch.cat([_map([[0.5, 1.0], [0.0, 0.25]]), _map([[0.0, 0.0], [0.0, 0.5]])])
    t = torch.cat([_map([[1.0, 1.0], [0.0, 0.0]]), _map([[0.0, 0.0], [0.0, 1.0]])])
    # per sample, plain sums, s = 1: sample 0 (2*1.5 + 1) / (1.75 + 2 + 1),
    # sample 1 (2*0.5 + 1) / (0.5 + 1 + 1)
    per_sample = ((1 - 4 / 4.75) + (1 - 2 / 2.5)) / 2
    assert dice_loss(p, t).item() == pytest.approx(per_sample, abs=1e-7)
    # per sample, squared: sample 0 sum(p^2) = 1.3125, sum(t^2) = 2; sample 1 sum(p^2) = 0.25, sum(t^2) = 1
    squared = ((1 - 4 / 4.3125) + (1 - 2 / 2.25)) / 2
    assert dice_loss(p, t, squared=True).item() == pytest.approx(squared, abs=1e-7)
    # batch, plain sums, s = 0.5: sum(p*t) = 2, sum(p) = 2.25, sum(t) = 3
    assert dice_loss(p, t, reduction="batch", smooth=0.5).item() == pytest.approx(1 - 4.5 / 5.75, abs=1e-7)
    # batch, squared, s = 1e-5: the authors' Dice
    s = 1e-5
    expected = 1 - (4 + s) / (1.5625 + 3 + s)
    assert dice_loss(p, t, reduction="batch", squared=True, smooth=s).item() == pytest.approx(
        expected, abs=1e-7
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_the_two_dice_losses_are_calls_of_the_one(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p, t = torch.rand(3, 1, 5, 7, generator=g), torch.rand(3, 1, 5, 7, generator=g)
    assert torch.equal(soft_dice_loss(p, t), dice_loss(p, t))
    assert torch.equal(soft_dice_loss(p, t, smooth=0.3), dice_loss(p, t, smooth=0.3))
    assert torch.equal(authors_dice_loss(p, t), dice_loss(p, t, reduction="batch", squared=True, smooth=1e-5))
    assert dice_loss_function("soft") is soft_dice_loss
    assert dice_loss_function("authors") is authors_dice_loss


def test_dice_loss_option_errors() -> None:
    p = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="`reduction` must be 'per_sample' or 'batch'"):
        dice_loss(p, p, reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dice` must be 'soft' or 'authors'"):
        dice_loss_function("hard")


# ---------------------------------------------------------------- the objective, by hand
# y: the top row is foreground. Labeled outputs: net1 half right, net2 perfect.
Y = [[1.0, 1.0], [0.0, 0.0]]
P1_LABELED = [[0.5, 1.0], [0.0, 0.25]]
P2_LABELED = Y
# Fused image f (one channel, one sample) with eps = 0.25; the "networks" on it are p1 = f^2, p2 = f / 2,
# so that S = sum(f^2) + sum(f) / 2 and G = dS/df = 2 f + 1/2 are known.
F = [[0.8, 0.2], [0.6, 0.4]]
EPS = 0.25
# L_sup = Dice(p1(l), y) + Dice(p2(l), y) = (1 - (2*1.5 + 1) / (1.75 + 2 + 1)) + 0
L_SUP = 1 - 4 / 4.75
# y1 = eps*y + (1-eps)*p2 = [[0.55, 0.325], [0.225, 0.15]]; p1 = [[0.64, 0.04], [0.36, 0.16]]
#   sum(p1*y1) = 0.352 + 0.013 + 0.081 + 0.024 = 0.47, sum(p1) = 1.2, sum(y1) = 1.25
# y2 = eps*y + (1-eps)*p1 = [[0.73, 0.28], [0.27, 0.12]]; p2 = [[0.4, 0.1], [0.3, 0.2]]
#   sum(p2*y2) = 0.292 + 0.028 + 0.081 + 0.024 = 0.425, sum(p2) = 1.0, sum(y2) = 1.4
L_SEMI = (1 - 1.94 / 3.45) + (1 - 1.85 / 3.4)
# S = 1.2 + 1.0; G = [[2.1, 0.9], [1.7, 1.3]]; mean prob (p1 + p2) / 2 = [[0.52, 0.07], [0.33, 0.18]]:
# background = y < 0.5 (bottom row) or mean < 0.5 (top right); only the top-left pixel is foreground.
S = 2.2
L_GRAD = (0.9 + 1.7 + 1.3) / 3


def _outputs() -> dict[str, Any]:
    f = _map(F).requires_grad_(True)
    return {
        "p1_labeled": _map(P1_LABELED),
        "p2_labeled": _map(P2_LABELED),
        "y": _map(Y),
        "p1_fused": f * f,
        "p2_fused": f / 2,
        "eps": torch.full((1, 1, 1, 1), EPS),
        "fused": f,
    }


def test_gpcps_objective_hand_worked() -> None:
    out = _outputs()
    losses = gpcps_objective(**out, lambda_semi=0.5, lambda_grad=0.1)
    assert losses.sup.item() == pytest.approx(L_SUP, abs=1e-6)
    assert losses.semi.item() == pytest.approx(L_SEMI, abs=1e-6)
    assert losses.penalty.item() == pytest.approx(L_GRAD, abs=1e-6)
    assert losses.output_sum is not None and losses.output_sum.item() == pytest.approx(S, abs=1e-6)
    assert losses.total.item() == pytest.approx(L_SUP + 0.5 * L_SEMI + 0.1 * L_GRAD, abs=1e-6)
    assert losses.nonfinite_flag is not None and losses.nonfinite_flag.item() == 0.0
    assert losses.grad is losses.penalty  # the earlier name of the field still reads it
    # the penalty stays in the graph: d L_grad / d f = d/df mean |2 f + 1/2| over B = 2/3 on B
    (d_f,) = torch.autograd.grad(losses.penalty, out["fused"])
    torch.testing.assert_close(d_f, _map([[0.0, 2 / 3], [2 / 3, 2 / 3]]))


def test_gpcps_objective_pieces_are_the_equations() -> None:
    out = _outputs()
    assert supervised_loss(out["p1_labeled"], out["p2_labeled"], out["y"]).item() == pytest.approx(L_SUP)
    semi = semi_supervised_loss(out["p1_fused"], out["p2_fused"], out["y"], out["eps"])
    assert semi.item() == pytest.approx(L_SEMI, abs=1e-6)
    assert output_sum(out["p1_fused"], out["p2_fused"]).item() == pytest.approx(S, abs=1e-6)
    one = torch.ones(())
    assert total_loss(one, 2 * one, 3 * one, lambda_semi=0.5, lambda_grad=0.1).item() == pytest.approx(2.3)
    assert total_loss(one, 2 * one, None, lambda_semi=0.5).item() == pytest.approx(2.0)


def test_gpcps_objective_with_a_given_input_gradient() -> None:
    out = _outputs()
    g = 2 * out["fused"].detach() + 0.5
    out["fused"] = None
    losses = gpcps_objective(**out, input_grad=g, lambda_semi=0.5, lambda_grad=0.1)
    assert losses.penalty.item() == pytest.approx(L_GRAD, abs=1e-6)
    assert losses.output_sum is None
    bad = g.clone()
    bad[0, 0, 0, 0] = float("inf")  # outside the background: L_grad stays finite, the flag does not
    flagged = gpcps_objective(**out, input_grad=bad, lambda_semi=0.5, lambda_grad=0.1)
    assert flagged.penalty.item() == pytest.approx(L_GRAD, abs=1e-6)
    assert flagged.nonfinite_flag is not None and torch.isnan(flagged.nonfinite_flag)


def test_gpcps_objective_switches_of_the_ablation_rows() -> None:
    out = _outputs()
    row_i = gpcps_objective(out["p1_labeled"], out["p2_labeled"], out["y"], lambda_semi=0.0, lambda_grad=0.0)
    assert row_i.semi.item() == row_i.penalty.item() == 0.0 and row_i.nonfinite_flag is None
    assert row_i.total.item() == pytest.approx(L_SUP)
    no_eps = {**out, "eps": None}
    row_ii = gpcps_objective(**no_eps, lambda_semi=0.0, lambda_grad=0.1)
    assert row_ii.semi.item() == 0.0
    assert row_ii.total.item() == pytest.approx(L_SUP + 0.1 * L_GRAD, abs=1e-6)
    row_iii = gpcps_objective(**{**out, "fused": None}, lambda_semi=1.0, lambda_grad=0.0)
    assert row_iii.penalty.item() == 0.0 and row_iii.output_sum is None
    assert row_iii.total.item() == pytest.approx(L_SUP + L_SEMI, abs=1e-6)


def test_gpcps_objective_authors_background() -> None:
    # y == 0 minus a one-pixel band: on a 2x2 map every pixel touches the foreground row, so B is empty
    losses = gpcps_objective(**_outputs(), lambda_semi=0.0, lambda_grad=0.1, background="authors")
    assert losses.penalty.item() == 0.0


@pytest.mark.parametrize(
    ("change", "kwargs", "match"),
    [
        ({"p2_fused": None}, {}, "`p1_fused` and `p2_fused` are needed"),
        ({"eps": None}, {}, "`eps` is needed when lambda_semi > 0"),
        ({"fused": None}, {}, r"`fused` \(requiring grad\) or `input_grad` is needed"),
        ({}, {"lambda_semi": -1.0}, "`lambda_semi` must be >= 0"),
        ({}, {"lambda_grad": -1.0}, "`lambda_grad` must be >= 0"),
        ({}, {"background": "gt"}, "`background` must be 'paper' or 'authors'"),
        ({}, {"dice": "hard"}, "`dice` must be 'soft' or 'authors'"),
    ],
)
def test_gpcps_objective_errors(change: dict[str, Any], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gpcps_objective(**{**_outputs(), **change}, **kwargs)


# ---------------------------------------------------------------- the module calls the objective
def _fused_batch() -> SemiSupervisedBatch:
    batch = random_semi_batch(n=2, size=32, seed=3)
    batch.eps = torch.tensor([0.3, 0.7]).reshape(2, 1, 1, 1)
    batch.fused = fuse_images(batch.labeled, batch.unlabeled, batch.eps)
    return batch


@pytest.mark.parametrize(
    ("kwargs", "step"),
    [
        ({}, 0),
        ({"dice": "authors", "background": "authors"}, 0),
        ({"lambda_semi": 0.0}, 0),
        ({"lambda_grad": 0.0}, 0),
        ({"lambda_grad": 0.0, "lambda_semi": 0.0}, 0),
        ({"gp_every_n_steps": 4, "background_threshold": 0.3}, 4),
        ({"gp_every_n_steps": 4}, 5),
    ],
)
def test_module_losses_are_the_objective_of_its_outputs(kwargs: dict[str, Any], step: int) -> None:
    module = GPCPSModule(**TINY_NET, **kwargs)
    batch = _fused_batch()
    got = module.compute_losses(batch, step)
    # The same forward passes by hand (training mode: batch statistics, so repeating them is exact).
    p1_labeled = torch.sigmoid(module.net1(batch.labeled))
    p2_labeled = torch.sigmoid(module.net2(batch.labeled))
    due = module.penalty_due(step)
    assert batch.fused is not None
    fused = batch.fused.detach().requires_grad_(due)
    p1, p2 = torch.sigmoid(module.net1(fused)), torch.sigmoid(module.net2(fused))
    want = gpcps_objective(
        p1_labeled,
        p2_labeled,
        batch.mask,
        p1,
        p2,
        batch.eps,
        fused=fused if due else None,
        lambda_semi=module.lambda_semi,
        lambda_grad=module.lambda_grad * module.gp_every_n_steps if due else 0.0,
        dice=module.dice_variant,
        background=module.background_variant,
        background_threshold=module.background_threshold,
    )
    for name in ("total", "sup", "semi", "penalty"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.nonfinite_flag is None) == (want.nonfinite_flag is None) == (not due)
