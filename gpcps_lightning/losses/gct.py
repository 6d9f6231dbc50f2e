"""GCT's losses and targets (Ke et al., ECCV 2020) as pure functions (no Lightning).

Guided Collaborative Training: two task networks and a flaw detector that learns, on the labeled
images, where a prediction is wrong. Its flaw maps decide, pixel by pixel, which network teaches the
other (the dynamic consistency target) and where both are wrong (the flaw correction term). Each function
follows a piece of the official implementation (ZHKKKe/PixelSSL, ``pixelssl/ssl_algorithm/ssl_gct.py``),
named in its docstring; docs/baselines.md lists the differences. Binary segmentation: one probability
channel where the official code has a softmax over the classes (equivalent for two classes, see
:func:`flaw_detector_target`).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpcps_lightning.losses._checks import as_float, check_map, check_same_shape
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function

__all__ = [
    "GCTLosses",
    "GCTMode",
    "blur_kernel_size",
    "dynamic_consistency_loss",
    "dynamic_consistency_targets",
    "flaw_correction_loss",
    "flaw_detector_loss",
    "flaw_detector_target",
    "gaussian_blur",
    "gaussian_kernel1d",
    "gct_objective",
    "postprocess_flaw_map",
]

#: Which semi-supervised terms GCT trains with (the official ``--ssl-mode``): ``"gct"`` both, ``"dc"``
#: the dynamic consistency only, ``"fc"`` the flaw correction only (then on every pixel, unmasked).
GCTMode = Literal["gct", "dc", "fc"]
_MODES = ("gct", "dc", "fc")

#: Added to the min-max range before dividing, as in the official code.
_NORM_EPS = 1e-9


# ---------------------------------------------------------------------------------------------------
# Gaussian blur as the official GaussianBlurLayer
# ---------------------------------------------------------------------------------------------------


def blur_kernel_size(size: int, divisor: int) -> int:
    """``int(size / divisor)``, made odd by adding 1 when even: the official kernel sizes.

    The flaw-map post-processing blurs with ``divisor`` 16, the flaw detector's target with 8 and 4.

    Raises:
        ValueError: If ``size`` or ``divisor`` is below 1.
    """
    if size < 1 or divisor < 1:
        raise ValueError(f"`size` and `divisor` must be at least 1, got {size} and {divisor}.")
    k = size // divisor
    return k + 1 if k % 2 == 0 else k


def _reflect(index: int, length: int) -> int:
    # scipy.ndimage's "reflect" extension (d c b a | a b c d | d c b a), period 2 * length.
    index %= 2 * length
    return index if index < length else 2 * length - 1 - index


@functools.lru_cache(maxsize=64)
def _kernel1d(kernel_size: int) -> tuple[float, ...]:
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    radius = int(4.0 * sigma + 0.5)
    weights = [math.exp(-0.5 * j * j / (sigma * sigma)) for j in range(-radius, radius + 1)]
    total = sum(weights)
    center = kernel_size // 2
    kernel = [0.0] * kernel_size
    for i in range(kernel_size):
        for j, w in zip(range(-radius, radius + 1), weights, strict=True):
            if _reflect(i + j, kernel_size) == center:
                kernel[i] += w / total
    return tuple(kernel)


def gaussian_kernel1d(kernel_size: int) -> Tensor:
    """The official blur kernel along one axis (float64, sums to 1).

    The official ``GaussianBlurLayer`` takes its ``k x k`` kernel from
    ``scipy.ndimage.gaussian_filter`` applied to a unit impulse at the centre of a ``k x k`` array,
    with OpenCV's default ``sigma = 0.3 ((k - 1) / 2 - 1) + 0.8``. SciPy samples the Gaussian up to
    ``int(4 sigma + 0.5)`` from the centre, normalises it, and folds what falls outside the array back
    in by reflection (its ``"reflect"`` mode). The result is the outer product of this 1-D kernel with
    itself; it is computed here without SciPy.

    Args:
        kernel_size: The odd kernel size ``k``.

    Raises:
        ValueError: If ``kernel_size`` is not a positive odd number.

    Shape:
        - output: (kernel_size,)
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be a positive odd number, got {kernel_size}.")
    return torch.tensor(_kernel1d(kernel_size), dtype=torch.float64)


def gaussian_blur(maps: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """Blur one-channel maps as the official ``GaussianBlurLayer``: reflection padding, Gaussian kernel.

    The 2-D kernel is the outer product of :func:`gaussian_kernel1d` along each axis, applied as two
    1-D convolutions (the same sums as the official ``k x k`` convolution, in a different order).

    Args:
        maps: One-channel maps.
        kernel_size: Odd kernel sizes ``(k_h, k_w)``; ``k // 2`` must be below the map's side on its axis.

    Returns:
        The blurred maps, float32 (float64 for float64 input).

    Raises:
        ValueError: On a map that is not (N, 1, H, W) or an even kernel size.

    Shape:
        - maps: (N, 1, H, W)
        - output: (N, 1, H, W)
    """
    check_map("maps", maps)
    x = as_float(maps)
    k_h, k_w = kernel_size
    kernel_h = gaussian_kernel1d(k_h).to(device=x.device, dtype=x.dtype)
    kernel_w = gaussian_kernel1d(k_w).to(device=x.device, dtype=x.dtype)
    x = F.pad(x, (k_w // 2, k_w // 2, k_h // 2, k_h // 2), mode="reflect")
    x = F.conv2d(x, kernel_h.view(1, 1, k_h, 1))
    return F.conv2d(x, kernel_w.view(1, 1, 1, k_w))


def _blur(maps: Tensor, divisor: int) -> Tensor:
    # The official kernels are sized from the (square) crop size; here each axis from its own side.
    height, width = maps.shape[-2:]
    return gaussian_blur(maps, (blur_kernel_size(height, divisor), blur_kernel_size(width, divisor)))


def _per_sample_min_max(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.flatten(1)
    return flat.amin(dim=1).view(-1, 1, 1, 1), flat.amax(dim=1).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# Flaw maps and targets
# ---------------------------------------------------------------------------------------------------


def postprocess_flaw_map(flaw: Tensor, clip_threshold: float = 0.1) -> Tensor:
    """The flaw detector's output made into a flaw map in [0, 1] (official ``FlawmapHandler``).

    Detached, per sample: negative values set to 0, Gaussian blur (kernel ``image side / 16``,
    :func:`blur_kernel_size`), then min-max normalisation ``(f - min) / (max - min + 1e-9)``; a map whose
    maximum is not above ``clip_threshold`` ("no flaw") is set to 0 before that normalisation. As in the
    official code the minimum and maximum are taken before the zeroing, so such a map comes out as the
    constant ``-min / (max - min + 1e-9)``: 0 when the blurred map touches 0, else negative.

    Args:
        flaw: The flaw detector's output (not activated).
        clip_threshold: The maximum at or below which a map counts as flawless.

    Returns:
        float32 maps, detached.

    Raises:
        ValueError: On a map that is not (N, 1, H, W).

    Shape:
        - flaw: (N, 1, H, W)
        - output: (N, 1, H, W)
    """
    check_map("flaw", flaw)
    with torch.no_grad():
        x = _blur(flaw.detach().float().clamp(min=0.0), 16)
        fmin, fmax = _per_sample_min_max(x)
        x = x * (fmax > clip_threshold).float()
        return (x - fmin) / (fmax - fmin + _NORM_EPS)


def dynamic_consistency_targets(
    p1: Tensor, p2: Tensor, flaw1: Tensor, flaw2: Tensor, threshold: float = 0.6
) -> tuple[Tensor, Tensor, Tensor]:
    """The dynamic consistency targets of the two networks and the both-flawed mask (``DCGTGenerator``).

    A flaw above ``threshold`` counts as 1 (fully flawed). At each pixel the network with the smaller
    (so clipped) flaw keeps its own prediction as target and the other learns from it; on a tie, each
    keeps its own (and its consistency term there is 0). So network 2 learns from network 1 where
    network 1's flaw is below ``threshold`` and strictly below network 2's, and neither learns from
    the other where both flaws exceed ``threshold``: there the mask is 1 and the flaw correction term acts.

    Args:
        p1: Network 1's probabilities.
        p2: Network 2's probabilities on the same images.
        flaw1: Network 1's post-processed flaw map (:func:`postprocess_flaw_map`).
        flaw2: Network 2's post-processed flaw map.
        threshold: The flaw above which a pixel counts as flawed.

    Returns:
        ``(target1, target2, both_flawed)``: float32, detached; ``both_flawed`` in {0, 1}.

    Raises:
        ValueError: On maps that are not (N, 1, H, W) or differ in shape, or a ``threshold`` outside [0, 1].

    Shape:
        - p1, p2, flaw1, flaw2: (N, 1, H, W)
        - outputs: (N, 1, H, W)
    """
    for name, x in (("p1", p1), ("p2", p2), ("flaw1", flaw1), ("flaw2", flaw2)):
        check_map(name, x)
        check_same_shape("p1", p1, name, x)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` of the dynamic consistency must be in [0, 1], got {threshold}.")
    with torch.no_grad():
        p1, p2 = p1.detach().float(), p2.detach().float()
        f1, f2 = flaw1.detach().float(), flaw2.detach().float()
        bad1, bad2 = f1 > threshold, f2 > threshold
        both_flawed = (bad1 & bad2).float()
        f1 = torch.where(bad1, torch.ones_like(f1), f1)
        f2 = torch.where(bad2, torch.ones_like(f2), f2)
        keep1 = (f2 >= f1).float()
        keep2 = (f1 >= f2).float()
        target1 = keep1 * p1 + (1 - keep1) * p2
        target2 = keep2 * p2 + (1 - keep2) * p1
    return target1, target2, both_flawed


def flaw_detector_target(probs: Tensor, y: Tensor, dilations: int = 1) -> Tensor:
    """What the flaw detector learns to output on a labeled image (official ``FDGTGenerator``).

    Per sample: ``|y - p|``, Gaussian blur (kernel ``side / 8``), then ``dilations`` times a 3x3 grey
    dilation (max filter, reflection padding) followed by a blur of kernel ``side / 4``, then min-max
    normalisation ``(d - min) / (max - min + 1e-9)``.

    The official code sums ``|one_hot(y) - softmax|`` over the classes and multiplies by ``mu = 0.5``:
    for two classes that is exactly ``|y - p|`` (and any positive factor cancels in the normalisation,
    so ``mu`` is no option here).

    Args:
        probs: A network's foreground probabilities on the labeled images.
        y: Their masks, in {0, 1}.
        dilations: How often to dilate and re-blur (the official ``nu``).

    Returns:
        float32 maps in [0, 1], detached.

    Raises:
        ValueError: On maps that are not (N, 1, H, W) or differ in shape, or negative ``dilations``.

    Shape:
        - probs, y: (N, 1, H, W)
        - output: (N, 1, H, W)
    """
    check_map("probs", probs)
    check_map("y", y)
    check_same_shape("probs", probs, "y", y)
    if dilations < 0:
        raise ValueError(f"`dilations` must be >= 0, got {dilations}.")
    with torch.no_grad():
        diff = _blur((y.detach().float() - probs.detach().float()).abs(), 8)
        for _ in range(dilations):
            dilated = F.max_pool2d(F.pad(diff, (1, 1, 1, 1), mode="reflect"), kernel_size=3, stride=1)
            diff = _blur(dilated, 4)
        dmin, dmax = _per_sample_min_max(diff)
        return (diff - dmin) / (dmax - dmin + _NORM_EPS)


# ---------------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------------


def flaw_correction_loss(flaw: Tensor, mask: Tensor | None = None) -> Tensor:
    """GCT's flaw correction term ``mean(mask * flaw^2)``: the task network makes its flaws vanish.

    ``flaw`` is the flaw detector's raw output on the network's (not detached) prediction, with the
    detector's own parameters frozen, so the gradient reaches the task network only. The mean runs over
    all pixels of the batch, masked ones included.

    Args:
        flaw: The flaw detector's output on the prediction (carrying its gradient).
        mask: Where the term applies (the both-flawed mask of :func:`dynamic_consistency_targets`), or
            ``None`` for every pixel (the official ``"fc"`` mode).

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On maps that are not (N, 1, H, W) or differ in shape.

    Shape:
        - flaw, mask: (N, 1, H, W)
    """
    check_map("flaw", flaw)
    f = as_float(flaw)
    if mask is None:
        return (f * f).mean()
    check_map("mask", mask)
    check_same_shape("flaw", flaw, "mask", mask)
    return (mask.detach().to(f.dtype) * f * f).mean()


def _mse_to_detached_target(name: str, x: Tensor, target: Tensor) -> Tensor:
    # Both MSE terms of GCT: the network (or detector) output ``x`` against a target that is not trained.
    check_map(name, x)
    check_map("target", target)
    check_same_shape(name, x, "target", target)
    return F.mse_loss(as_float(x), as_float(target.detach()))


def dynamic_consistency_loss(probs: Tensor, target: Tensor) -> Tensor:
    """GCT's dynamic consistency term: ``mean((p - target)^2)`` with the target detached.

    Args:
        probs: A network's probabilities.
        target: Its target from :func:`dynamic_consistency_targets`.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On maps that are not (N, 1, H, W) or differ in shape.

    Shape:
        - probs, target: (N, 1, H, W)
    """
    return _mse_to_detached_target("probs", probs, target)


def flaw_detector_loss(flaw: Tensor, target: Tensor) -> Tensor:
    """The flaw detector's loss ``mean((flaw - target)^2)`` (official ``FlawDetectorCriterion``).

    Args:
        flaw: The flaw detector's output on labeled images (from detached predictions).
        target: :func:`flaw_detector_target` of those predictions.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On maps that are not (N, 1, H, W) or differ in shape.

    Shape:
        - flaw, target: (N, 1, H, W)
    """
    return _mse_to_detached_target("flaw", flaw, target)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------


class GCTLosses(NamedTuple):
    """The loss terms of one GCT step (float32 scalars, unweighted but for ``total``) and the weight used.

    ``sup``, ``flaw`` and ``dc`` are summed over the two networks; ``fd`` is the mean of the flaw
    detector's loss on the two networks' predictions.
    """

    total: Tensor
    sup: Tensor
    flaw: Tensor
    dc: Tensor
    fd: Tensor
    dc_weight: float


def gct_objective(
    p1: Tensor,
    p2: Tensor,
    y: Tensor,
    flaw1: Tensor,
    flaw2: Tensor,
    flaw1_frozen: Tensor | None = None,
    flaw2_frozen: Tensor | None = None,
    *,
    fc_weight: float = 1.0,
    dc_weight: float = 100.0,
    fd_weight: float = 10.0,
    dc_threshold: float = 0.6,
    flaw_clip_threshold: float = 0.1,
    fd_target_dilations: int = 1,
    mode: GCTMode = "gct",
    dice: DiceVariant = "soft",
) -> GCTLosses:
    """GCT's objective: both task networks' losses and the flaw detector's, in one total.

    With ``x`` the labeled images followed by the unlabeled ones (the first ``len(y)`` rows are labeled):

        total = sum_k [Dice(p_k(l), y) + fc_weight * L_fc,k + dc_weight * L_dc,k] + fd_weight * L_fd
        L_fc,k = mean(both_flawed * flaw_k_frozen(x)^2)                  (flaw_correction_loss)
        L_dc,k = mean((p_k(x) - target_k)^2)                             (dynamic_consistency_loss)
        L_fd   = (mse(flaw1(l), T(p1(l), y)) + mse(flaw2(l), T(p2(l), y))) / 2

    where ``target_k`` and ``both_flawed`` come from :func:`dynamic_consistency_targets` on the
    :func:`postprocess_flaw_map` of ``flaw1`` and ``flaw2``, and ``T`` is :func:`flaw_detector_target`.
    ``dc_weight`` is the weight of this step (the module ramps it up). The terms' gradients stay apart:
    ``flaw1``, ``flaw2`` are the detector's output on detached predictions (its loss trains the detector
    only) and ``flaw*_frozen`` its output, with its parameters detached, on the predictions themselves
    (the flaw correction trains the task networks only); the two are equal in value.

    The supervised term is the library's Dice (as for every baseline), not the official cross entropy.
    ``mode="dc"`` drops the flaw correction, ``mode="fc"`` the dynamic consistency and the mask of the
    flaw correction (the official ``--ssl-mode``).

    Args:
        p1: Network 1's probabilities on ``x`` (labeled images first).
        p2: Network 2's probabilities on ``x``.
        y: Masks of the labeled images.
        flaw1: The flaw detector's output on ``(x, p1.detach())``.
        flaw2: The flaw detector's output on ``(x, p2.detach())``.
        flaw1_frozen: Its output on ``(x, p1)`` with its parameters frozen; needed when the flaw
            correction is on (``fc_weight > 0`` and ``mode`` not ``"dc"``).
        flaw2_frozen: The same for ``p2``.
        fc_weight: Weight of the flaw correction terms.
        dc_weight: Weight of the dynamic consistency terms at this step.
        fd_weight: Weight of the flaw detector's loss.
        dc_threshold: Flaw threshold of :func:`dynamic_consistency_targets`.
        flaw_clip_threshold: ``clip_threshold`` of :func:`postprocess_flaw_map`.
        fd_target_dilations: ``dilations`` of :func:`flaw_detector_target`.
        mode: ``"gct"``, ``"dc"`` or ``"fc"``.
        dice: ``"soft"`` (specification) or ``"authors"`` Dice loss.

    Returns:
        The loss terms, their weighted total and the consistency weight used.

    Raises:
        ValueError: On maps that are not (N, 1, H, W), fewer maps rows than masks, a negative weight, an
            unknown ``mode`` or ``dice``, or missing frozen flaw maps that the flaw correction needs.

    Shape:
        - p1, p2, flaw1, flaw2, flaw1_frozen, flaw2_frozen: (N_l + N_u, 1, H, W)
        - y: (N_l, 1, H, W)
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be 'gct', 'dc' or 'fc', got {mode!r}.")
    for name, weight in (("fc_weight", fc_weight), ("dc_weight", dc_weight), ("fd_weight", fd_weight)):
        if weight < 0:
            raise ValueError(f"`{name}` must be >= 0, got {weight}.")
    for name, x in (("p1", p1), ("p2", p2), ("flaw1", flaw1), ("flaw2", flaw2)):
        check_map(name, x)
        check_same_shape("p1", p1, name, x)
    check_map("y", y)
    n_labeled = y.shape[0]
    if p1.shape[0] < n_labeled or p1.shape[2:] != y.shape[2:]:
        raise ValueError(
            f"`p1` must hold the {n_labeled} labeled images of `y` {tuple(y.shape)} first, "
            f"got {tuple(p1.shape)}."
        )
    with_fc = mode != "dc" and fc_weight > 0
    if with_fc and (flaw1_frozen is None or flaw2_frozen is None):
        raise ValueError(
            "`flaw1_frozen` and `flaw2_frozen` are needed when the flaw correction is on "
            "(fc_weight > 0 and mode 'gct' or 'fc')."
        )
    loss = dice_loss_function(dice)
    sup = loss(p1[:n_labeled], y) + loss(p2[:n_labeled], y)
    zero = sup.new_zeros(())
    flaw_term, dc = zero, zero
    both_flawed: Tensor | None = None
    if mode != "fc":
        target1, target2, both_flawed = dynamic_consistency_targets(
            p1,
            p2,
            postprocess_flaw_map(flaw1, flaw_clip_threshold),
            postprocess_flaw_map(flaw2, flaw_clip_threshold),
            dc_threshold,
        )
        dc = dynamic_consistency_loss(p1, target1) + dynamic_consistency_loss(p2, target2)
    if with_fc:
        assert flaw1_frozen is not None and flaw2_frozen is not None  # checked above
        flaw_term = flaw_correction_loss(flaw1_frozen, both_flawed) + flaw_correction_loss(
            flaw2_frozen, both_flawed
        )
    y_f = as_float(y)
    fd = (
        flaw_detector_loss(flaw1[:n_labeled], flaw_detector_target(p1[:n_labeled], y_f, fd_target_dilations))
        + flaw_detector_loss(
            flaw2[:n_labeled], flaw_detector_target(p2[:n_labeled], y_f, fd_target_dilations)
        )
    ) / 2
    total = sup + fc_weight * flaw_term + dc_weight * dc + fd_weight * fd
    return GCTLosses(total=total, sup=sup, flaw=flaw_term, dc=dc, fd=fd, dc_weight=dc_weight)
