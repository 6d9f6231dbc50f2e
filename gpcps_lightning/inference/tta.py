"""Test-time augmentation: a model's probabilities averaged over rescaled and flipped copies of the input.

ST++ pseudo-labels with it (:mod:`gpcps_lightning.pipelines.stpp`): the official ``BaseNet.forward(x,
tta=True)`` sums the softmax probabilities over the scales 0.5, 0.75, 1, 1.5, 2 of the image and their
horizontal flips, each resized back to the input size. The average taken here thresholds to the same
masks as that sum does to its arg-max.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TTA_SCALES", "scaled_size", "tta_probabilities"]

#: The official ST++ scales.
TTA_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)


def scaled_size(size: int, scale: float, divisor: int = 1) -> int:
    """``size * scale`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``).

    Networks such as a U-Net need input sizes divisible by their output stride; the official code
    rounds down (``int(h * scale)``), which for its network needs no divisor.
    """
    return max(divisor, round(size * scale / divisor) * divisor)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def tta_probabilities(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    scales: Sequence[float] = TTA_SCALES,
    flip: bool = True,
    size_divisor: int = 1,
) -> Tensor:
    """Foreground probabilities averaged over rescaled (and horizontally flipped) copies of ``images``.

    For each scale the images are resized (bilinear) to :func:`scaled_size`, the model's probabilities
    are taken (and those of the flipped images, flipped back), resized to the input size and averaged
    with equal weights. With ``flip`` the result is flip-equivariant: the probabilities of flipped
    images are the flipped probabilities (up to rounding).

    Args:
        model: Maps normalised images to foreground probabilities (a module's ``forward``).
        images: Normalised images, as the model takes them.
        scales: Positive scale factors.
        flip: Also average over horizontal flips.
        size_divisor: Round the rescaled sizes to multiples of this (the network's output stride).

    Returns:
        float32 probabilities in [0, 1].

    Raises:
        ValueError: On an empty or non-positive ``scales`` or a ``size_divisor`` below 1.

    Shape:
        - images: (N, C, H, W)
        - output: (N, 1, H, W)
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"`scales` must be positive numbers (at least one), got {tuple(scales)}.")
    if size_divisor < 1:
        raise ValueError(f"`size_divisor` must be at least 1, got {size_divisor}.")
    h, w = images.shape[-2:]
    total: Tensor | None = None
    for scale in scales:
        size = (scaled_size(h, scale, size_divisor), scaled_size(w, scale, size_divisor))
        x = _resize(images, size)
        p = _resize(model(x).float(), (h, w))
        if flip:
            # Identity and flip of one scale are added first: a + b == b + a exactly, so flipping the
            # input permutes the two terms and leaves the sum flip-equivariant.
            p = p + _resize(model(x.flip(-1)).float().flip(-1), (h, w))
        total = p if total is None else total + p
    assert total is not None
    return (total / (len(scales) * (2 if flip else 1))).clamp(0.0, 1.0)
