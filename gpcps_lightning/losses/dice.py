"""The soft Dice loss, with the options that cover the specification's and the paper authors' variants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

from gpcps_lightning.losses._checks import as_float, check_map, check_same_shape

__all__ = [
    "DiceReduction",
    "DiceVariant",
    "authors_dice_loss",
    "dice_loss",
    "dice_loss_function",
    "dice_loss_with_ignore",
    "soft_dice_loss",
]

#: ``"per_sample"``: one Dice per sample, then the batch mean; ``"batch"``: one Dice over the whole batch.
DiceReduction = Literal["per_sample", "batch"]
#: The Dice losses the modules choose between: the specification's or the authors' code's.
DiceVariant = Literal["soft", "authors"]


def dice_loss(
    probs: Tensor,
    target: Tensor,
    *,
    reduction: DiceReduction = "per_sample",
    squared: bool = False,
    smooth: float = 1.0,
) -> Tensor:
    """Soft Dice loss ``1 - (2 * sum(p * t) + s) / (sum(p) + sum(t) + s)``.

    The sums run over each sample (then the batch mean is taken) or over the whole batch; with
    ``squared=True`` the denominator sums ``p^2`` and ``t^2`` instead.

    Args:
        probs: Foreground probabilities in [0, 1].
        target: Targets in [0, 1]; soft targets (pseudo labels) are allowed.
        reduction: ``"per_sample"`` or ``"batch"``.
        squared: Square ``p`` and ``t`` in the denominator.
        smooth: The smoothing constant ``s``; must be positive.

    Returns:
        A scalar, float32 (float64 for float64 inputs).

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, ``smooth <= 0`` or an unknown
            ``reduction``.

    Shape:
        - probs: (N, 1, H, W)
        - target: (N, 1, H, W)
    """
    check_map("probs", probs)
    check_map("target", target)
    check_same_shape("probs", probs, "target", target)
    if smooth <= 0:
        raise ValueError(f"`smooth` must be positive, got {smooth}.")
    if reduction not in ("per_sample", "batch"):
        raise ValueError(f"`reduction` must be 'per_sample' or 'batch', got {reduction!r}.")
    p = as_float(probs)
    t = as_float(target)
    if reduction == "per_sample":
        p, t = p.flatten(1), t.flatten(1)
        intersection = (p * t).sum(dim=1)
        denominator = (p * p).sum(dim=1) + (t * t).sum(dim=1) if squared else p.sum(dim=1) + t.sum(dim=1)
        return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()
    intersection = (p * t).sum()
    denominator = (p * p).sum() + (t * t).sum() if squared else p.sum() + t.sum()
    return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def soft_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """The specification's Dice loss (the paper's ``L_dice``): per sample, plain sums, smoothing 1.

    :func:`dice_loss` with ``reduction="per_sample"``.

    Args:
        probs: Foreground probabilities in [0, 1].
        target: Targets in [0, 1]; soft targets (pseudo labels) are allowed.
        smooth: The smoothing constant ``s``; must be positive.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, or ``smooth <= 0``.

    Shape:
        - probs: (N, 1, H, W)
        - target: (N, 1, H, W)
    """
    return dice_loss(probs, target, smooth=smooth)


def authors_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Dice loss as the paper authors' code computes it (an option, not the default).

    :func:`dice_loss` with ``reduction="batch", squared=True``:
    ``1 - (2 * sum(p * t) + s) / (sum(p^2) + sum(t^2) + s)`` over the whole batch.

    Args:
        probs: Foreground probabilities in [0, 1].
        target: Targets in [0, 1].
        smooth: The smoothing constant ``s``; must be positive.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, or ``smooth <= 0``.

    Shape:
        - probs: (N, 1, H, W)
        - target: (N, 1, H, W)
    """
    return dice_loss(probs, target, reduction="batch", squared=True, smooth=smooth)


def dice_loss_function(variant: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The Dice loss of a module's ``dice`` option: ``"soft"`` or ``"authors"``.

    Raises:
        ValueError: On another variant.
    """
    if variant == "soft":
        return soft_dice_loss
    if variant == "authors":
        return authors_dice_loss
    raise ValueError(f"`dice` must be 'soft' or 'authors', got {variant!r}.")


def dice_loss_with_ignore(
    probs: Tensor, target: Tensor, valid: Tensor, variant: DiceVariant = "soft"
) -> Tensor:
    """The ``variant`` Dice loss over the valid pixels only (ignore regions leave it and get no gradient).

    ``Dice(p * v, t * v)``: with ``v`` in {0, 1}, every sum of the Dice (``sum(p * t)``, ``sum(p)``,
    ``sum(t)``, and ``sum(p^2)``, ``sum(t^2)`` of the authors' variant) runs over the pixels with
    ``v = 1``, and ignored pixels get a zero gradient. It is the Dice counterpart of cross entropy's
    ``ignore_index``, which ST++'s official code uses for its cutout regions. With ``v`` all ones it is
    the plain loss.

    Args:
        probs: Foreground probabilities in [0, 1].
        target: Targets in [0, 1].
        valid: 1 where ``target`` is a label, 0 where it is to be ignored (values in {0, 1}).
        variant: ``"soft"`` (per sample, :func:`soft_dice_loss`) or ``"authors"`` (:func:`authors_dice_loss`).

    Returns:
        A float32 scalar (float64 for float64 inputs).

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, or an unknown ``variant``.

    Shape:
        - probs, target, valid: (N, 1, H, W)
    """
    loss = dice_loss_function(variant)
    check_map("valid", valid)
    check_same_shape("probs", probs, "valid", valid)
    v = as_float(valid)
    return loss(probs * v, target * v)
