"""GP-CPS's objective (docs/method.md, Eq. 1-17) as pure, typed functions (no Lightning).

Each function computes one equation; :func:`gpcps_objective` composes them into the whole of Eq. 17 from
the networks' outputs. The defaults are the specification's; the variants found in the paper authors'
code are separate functions or options, never the default.

Conventions: images are (N, C, H, W); masks, probabilities and pseudo labels are (N, 1, H, W);
``eps`` is (N, 1, 1, 1). Losses are computed in at least float32 (half-precision inputs are promoted),
so that they behave the same under bf16 and fp16 autocast.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpcps_lightning.losses._checks import as_float, check_eps, check_map, check_same_shape
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function

__all__ = [
    "BackgroundVariant",
    "EpsMode",
    "GPCPSLosses",
    "authors_background_mask",
    "background_mask",
    "fuse_images",
    "fused_pseudo_labels",
    "gpcps_objective",
    "gradient_penalty",
    "input_gradient",
    "output_sum",
    "penalty_precision_context",
    "sample_eps",
    "semi_supervised_loss",
    "supervised_loss",
    "total_loss",
]

#: ``"per_sample"``: one fusion weight per sample (specification); ``"per_batch"``: one per batch (authors).
EpsMode = Literal["per_sample", "per_batch"]
#: ``"paper"``: the background set of Eq. 11 (specification); ``"authors"``: the authors' code's.
BackgroundVariant = Literal["paper", "authors"]


def sample_eps(
    n: int,
    mode: EpsMode = "per_sample",
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw the fusion weights ``eps ~ Uniform(0, 1)``.

    Args:
        n: Batch size.
        mode: ``"per_sample"`` (the specification) draws one ``eps`` per sample; ``"per_batch"``
            (the authors' code) draws one for the whole batch and repeats it.
        device: Where to create the tensor.
        generator: Optional random generator (for reproducible draws).

    Returns:
        float32 tensor of shape (n, 1, 1, 1) in [0, 1).

    Raises:
        ValueError: If ``n < 1`` or ``mode`` is unknown.
    """
    if n < 1:
        raise ValueError(f"`n` must be at least 1, got {n}.")
    if mode == "per_sample":
        return torch.rand((n, 1, 1, 1), device=device, generator=generator)
    if mode == "per_batch":
        return torch.rand((1, 1, 1, 1), device=device, generator=generator).expand(n, 1, 1, 1).clone()
    raise ValueError(f"`mode` must be 'per_sample' or 'per_batch', got {mode!r}.")


def fuse_images(labeled: Tensor, unlabeled: Tensor, eps: Tensor) -> Tensor:
    """Fuse a labeled and an unlabeled batch (Eq. 1): ``f = eps * l + (1 - eps) * u``.

    Args:
        labeled: Labeled images, as the networks see them (augmented and normalised).
        unlabeled: Unlabeled images, same shape.
        eps: Per-sample weight of the labeled image.

    Returns:
        The fused images, shape and dtype of ``labeled``.

    Raises:
        ValueError: On mismatched shapes.

    Shape:
        - labeled, unlabeled: (N, C, H, W)
        - eps: (N, 1, 1, 1)
    """
    if labeled.ndim != 4:
        raise ValueError(f"`labeled` must have shape (N, C, H, W), got {tuple(labeled.shape)}.")
    check_same_shape("labeled", labeled, "unlabeled", unlabeled)
    check_eps(eps, labeled.shape[0])
    eps = eps.to(labeled.dtype)
    return eps * labeled + (1.0 - eps) * unlabeled


def fused_pseudo_labels(y: Tensor, p_other: Tensor, eps: Tensor) -> Tensor:
    """Fused cross pseudo label (Eq. 13-14): ``eps * y + (1 - eps) * p_other``, detached.

    No gradient flows through a pseudo label.

    Args:
        y: Mask of the labeled image that went into the fused image, in {0, 1}.
        p_other: The *other* network's probabilities on the fused image.
        eps: The fusion weights used to build the fused image.

    Returns:
        float32 soft labels in [0, 1], detached from the graph.

    Raises:
        ValueError: On shapes other than documented.

    Shape:
        - y, p_other: (N, 1, H, W)
        - eps: (N, 1, 1, 1)
    """
    check_map("y", y)
    check_map("p_other", p_other)
    check_same_shape("y", y, "p_other", p_other)
    check_eps(eps, y.shape[0])
    with torch.no_grad():
        p = as_float(p_other.detach())
        e = eps.to(p.dtype)
        return (e * y.to(p.dtype) + (1.0 - e) * p).detach()


def background_mask(y: Tensor, p1: Tensor, p2: Tensor, threshold: float = 0.5) -> Tensor:
    """Background set of the gradient penalty (Eq. 11): ``(y < 0.5) | ((p1 + p2) / 2 < threshold)``.

    Computed without gradient.

    Args:
        y: Mask of the labeled image that went into the fused image.
        p1: First network's probabilities on the fused image.
        p2: Second network's probabilities on the fused image.
        threshold: Threshold on the networks' mean probability.

    Returns:
        Boolean mask, True on background pixels.

    Raises:
        ValueError: On shapes other than documented.

    Shape:
        - y, p1, p2: (N, 1, H, W)
        - output: (N, 1, H, W), bool
    """
    check_map("y", y)
    check_map("p1", p1)
    check_map("p2", p2)
    check_same_shape("y", y, "p1", p1)
    check_same_shape("y", y, "p2", p2)
    with torch.no_grad():
        return (y < 0.5) | ((as_float(p1) + as_float(p2)) / 2.0 < threshold)


def authors_background_mask(y: Tensor, band: int = 1) -> Tensor:
    """Background set as the paper authors' code builds it (an option, not the default).

    ``y == 0`` minus a band of ``band`` pixels around the mask (the background pixels within
    ``band`` pixels, 8-connected, of a foreground pixel). The networks' predictions play no part.

    Args:
        y: Mask of the labeled image that went into the fused image, in {0, 1}.
        band: Width of the excluded band in pixels; 0 gives ``y == 0``.

    Returns:
        Boolean mask, True on background pixels.

    Raises:
        ValueError: On a shape other than (N, 1, H, W) or a negative band.

    Shape:
        - y: (N, 1, H, W)
        - output: (N, 1, H, W), bool
    """
    check_map("y", y)
    if band < 0:
        raise ValueError(f"`band` must be >= 0, got {band}.")
    with torch.no_grad():
        fg = (y >= 0.5).to(torch.float32)
        if band > 0:
            fg = F.max_pool2d(fg, kernel_size=2 * band + 1, stride=1, padding=band)
        return fg < 0.5


def penalty_precision_context(
    device_type: str, with_penalty: bool = True
) -> contextlib.AbstractContextManager[object]:
    """Run the forward passes that the gradient penalty differentiates twice in float32 under fp16 autocast.

    Under fp16 mixed precision, the penalty's parameter gradient does not survive a second backward pass
    in fp16: the loss scale cancels against the unscaling of ``G``, so each element of ``G``'s graph
    receives about ``lambda_grad / |B|`` (~4e-10 at 16x3x256x256), below fp16's smallest subnormal
    (6e-8). It becomes 0, or NaN with BatchNorm, whatever the scale. In float32 it is exact. Under bf16
    (float32's exponent range), in float32, or with ``with_penalty=False``, this context does nothing.

    Use it around the forward passes on the fused image whose output sum ``S`` is differentiated by
    :func:`input_gradient`; the forward passes on the labeled images can stay in fp16.

    Args:
        device_type: The device type of the forward passes (``"cuda"``, ``"cpu"``).
        with_penalty: Whether the penalty is computed on these forward passes.

    Returns:
        ``torch.autocast(device_type, enabled=False)`` when fp16 autocast is active for ``device_type``
        and ``with_penalty``, else a context that does nothing.
    """
    if (
        with_penalty
        and torch.is_autocast_enabled(device_type)
        and torch.get_autocast_dtype(device_type) == torch.float16
    ):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def input_gradient(
    total: Tensor,
    inputs: Tensor,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """Input gradient (Eq. 10): ``G = d(total) / d(inputs)``, with ``create_graph=True``.

    The graph is kept so that a penalty on ``G`` trains the networks (a second-order gradient).

    ``scaler`` applies PyTorch AMP's gradient-penalty recipe to a graph built in fp16: the gradient is taken
    of the *scaled* sum (so that small values do not underflow) and unscaled afterwards. That gives ``G``
    itself, but a penalty on it trains nothing in fp16 (the second backward pass underflows): to train
    with the penalty under fp16, build the graph in float32 with :func:`penalty_precision_context`, as
    :class:`~gpcps_lightning.GPCPSModule` does, and pass no scaler. Inf or NaN values are returned as
    they are; the caller decides.

    Args:
        total: The scalar to differentiate, e.g. ``S = sum(p1(f)) + sum(p2(f))``.
        inputs: The tensor to differentiate with respect to; must require grad.
        scaler: The active gradient scaler under fp16, or ``None``.

    Returns:
        float32 gradient, shape of ``inputs``, still attached to the graph.

    Raises:
        ValueError: If ``total`` is not a scalar or ``inputs`` does not require grad.
    """
    if total.ndim != 0:
        raise ValueError(f"`total` must be a scalar, got shape {tuple(total.shape)}.")
    if not inputs.requires_grad:
        raise ValueError(
            "`inputs` must require grad: call `inputs.requires_grad_(True)` before the forward pass."
        )
    if scaler is None or not scaler.is_enabled():
        (grad,) = torch.autograd.grad(total, inputs, create_graph=True)
        return as_float(grad)
    (scaled_grad,) = torch.autograd.grad(scaler.scale(total), inputs, create_graph=True)
    # scaler.scale of a one gives the current scale as a device tensor: no host synchronisation.
    scale = scaler.scale(torch.ones((), device=total.device, dtype=torch.float32))
    return as_float(scaled_grad) / scale


def gradient_penalty(grad: Tensor, background: Tensor) -> Tensor:
    """Gradient penalty (Eq. 12): mean of ``|grad|`` over the elements whose pixel is background.

    The (N, 1, H, W) background mask is broadcast over the C channels of the gradient, so the mean runs
    over (sample, channel, pixel) elements. The result is exactly 0 when the background is empty.

    Args:
        grad: Gradient of the output sum with respect to the fused image.
        background: Boolean background mask (see :func:`background_mask`).

    Returns:
        A float32 scalar, differentiable with respect to ``grad``.

    Raises:
        ValueError: On shapes other than documented or a non-boolean mask.

    Shape:
        - grad: (N, C, H, W)
        - background: (N, 1, H, W), bool
    """
    if grad.ndim != 4:
        raise ValueError(f"`grad` must have shape (N, C, H, W), got {tuple(grad.shape)}.")
    if background.dtype != torch.bool:
        raise ValueError(f"`background` must be a bool tensor, got {background.dtype}.")
    n, c, h, w = grad.shape
    if background.shape != (n, 1, h, w):
        raise ValueError(f"`background` must have shape {(n, 1, h, w)}, got {tuple(background.shape)}.")
    mask = background.expand(n, c, h, w)
    # where (not a product) so that a non-finite value outside the background does not leak in as NaN.
    total = torch.where(mask, as_float(grad).abs(), 0.0).sum()
    # clamp keeps the empty-background case at exactly 0 / 1 = 0 without a host-side branch.
    count = (background.sum() * c).clamp(min=1).to(total.dtype)
    return total / count


def supervised_loss(p1_labeled: Tensor, p2_labeled: Tensor, y: Tensor, dice: DiceVariant = "soft") -> Tensor:
    """Supervised loss (Eq. 16): ``L_sup = Dice(p1(l), y) + Dice(p2(l), y)``.

    Args:
        p1_labeled: First network's probabilities on the labeled images.
        p2_labeled: Second network's probabilities on the labeled images.
        y: Masks of the labeled images, in {0, 1}.
        dice: ``"soft"`` (:func:`~gpcps_lightning.losses.dice.soft_dice_loss`, specification) or
            ``"authors"`` (:func:`~gpcps_lightning.losses.dice.authors_dice_loss`).

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On shapes other than documented or an unknown ``dice``.

    Shape:
        - p1_labeled, p2_labeled, y: (N, 1, H, W)
    """
    loss = dice_loss_function(dice)
    return loss(p1_labeled, y) + loss(p2_labeled, y)


def semi_supervised_loss(
    p1_fused: Tensor, p2_fused: Tensor, y: Tensor, eps: Tensor, dice: DiceVariant = "soft"
) -> Tensor:
    """Semi-supervised loss (Eq. 15): ``L_semi = Dice(p1(f), y1) + Dice(p2(f), y2)``.

    ``y1`` and ``y2`` are the fused cross pseudo labels of Eq. 13-14 (:func:`fused_pseudo_labels`): each
    network is taught by the other one's detached output, mixed with the mask by ``eps``.

    Args:
        p1_fused: First network's probabilities on the fused images.
        p2_fused: Second network's probabilities on the fused images.
        y: Masks of the labeled images that went into the fused images.
        eps: The fusion weights of the fused images.
        dice: ``"soft"`` or ``"authors"``, as in :func:`supervised_loss`.

    Returns:
        A float32 scalar; no gradient flows through the pseudo labels.

    Raises:
        ValueError: On shapes other than documented or an unknown ``dice``.

    Shape:
        - p1_fused, p2_fused, y: (N, 1, H, W)
        - eps: (N, 1, 1, 1)
    """
    loss = dice_loss_function(dice)
    y1 = fused_pseudo_labels(y, p2_fused, eps)
    y2 = fused_pseudo_labels(y, p1_fused, eps)
    return loss(p1_fused, y1) + loss(p2_fused, y2)


def output_sum(p1_fused: Tensor, p2_fused: Tensor) -> Tensor:
    """The output sum the penalty differentiates (Eq. 9): ``S = sum(p1(f)) + sum(p2(f))``.

    Probabilities, not logits, summed over every pixel of the batch, in at least float32.

    Shape:
        - p1_fused, p2_fused: (N, 1, H, W)
        - output: scalar
    """
    return p1_fused.float().sum() + p2_fused.float().sum()


def total_loss(
    sup: Tensor,
    semi: Tensor,
    penalty: Tensor | None,
    lambda_semi: float = 1.0,
    lambda_grad: float = 1e-3,
) -> Tensor:
    """The total loss (Eq. 17): ``L_sup + lambda_grad * L_grad + lambda_semi * L_semi``.

    Args:
        sup: ``L_sup``.
        semi: ``L_semi`` (0 when switched off).
        penalty: ``L_grad``, or ``None`` on a step without the penalty (the term is then left out).
        lambda_semi: Weight of ``L_semi``.
        lambda_grad: Weight of ``L_grad`` (``k * lambda_grad`` for a lazy penalty every ``k`` steps).

    Returns:
        The scalar both networks are trained on.
    """
    total = sup + lambda_semi * semi
    if penalty is not None:
        total = total + lambda_grad * penalty
    return total


def _nonfinite_flag(values: Tensor) -> Tensor:
    """NaN where ``values`` holds a non-finite element, else 0, as a device scalar (no host sync)."""
    bad = ~torch.isfinite(values).all()
    return torch.where(bad, float("nan"), 0.0)


class GPCPSLosses(NamedTuple):
    """The terms of Eq. 17 for one step (float32 scalars; ``penalty`` and ``semi`` are 0 when off)."""

    total: Tensor
    sup: Tensor
    #: ``L_grad``, the gradient penalty (Eq. 12); 0 on a step without it.
    penalty: Tensor
    semi: Tensor
    #: NaN when the penalty's input gradient holds a non-finite value, else 0 (``None`` without penalty).
    nonfinite_flag: Tensor | None = None
    #: ``S`` (Eq. 9), when the objective computed the input gradient itself, else ``None``.
    output_sum: Tensor | None = None

    @property
    def grad(self) -> Tensor:
        """The earlier name of :attr:`penalty` (``L_grad``), kept so that existing code keeps working."""
        return self.penalty


def gpcps_objective(
    p1_labeled: Tensor,
    p2_labeled: Tensor,
    y: Tensor,
    p1_fused: Tensor | None = None,
    p2_fused: Tensor | None = None,
    eps: Tensor | None = None,
    *,
    fused: Tensor | None = None,
    input_grad: Tensor | None = None,
    lambda_semi: float = 1.0,
    lambda_grad: float = 1e-3,
    dice: DiceVariant = "soft",
    background: BackgroundVariant = "paper",
    background_threshold: float = 0.5,
) -> GPCPSLosses:
    """The whole GP-CPS objective (Eq. 17) from the networks' outputs.

    ``L_sup`` (Eq. 16) always; ``L_semi`` (Eq. 13-15) when ``lambda_semi > 0``; the gradient penalty
    ``L_grad`` (Eq. 9-12) when ``lambda_grad > 0``: ``G = dS/df`` is taken here from ``fused`` (which the
    fused outputs were computed from, with ``requires_grad``), or given as ``input_grad``.

    Args:
        p1_labeled: First network's probabilities on the labeled images.
        p2_labeled: Second network's probabilities on the labeled images.
        y: Masks of the labeled images, in {0, 1}.
        p1_fused: First network's probabilities on the fused images (needed for ``L_semi`` and ``L_grad``).
        p2_fused: Second network's probabilities on the fused images.
        eps: The fusion weights (needed for ``L_semi``).
        fused: The fused images, requiring grad, that ``p1_fused`` and ``p2_fused`` come from.
        input_grad: ``G``, when the caller has already taken it (``fused`` is then not used).
        lambda_semi: Weight of ``L_semi``; 0 leaves it out.
        lambda_grad: Weight of ``L_grad``; 0 leaves it out (no second-order graph). A lazy penalty every
            ``k`` steps passes ``k * lambda_grad`` on its steps and 0 on the others.
        dice: ``"soft"`` (specification) or ``"authors"`` Dice loss.
        background: ``"paper"`` background set (Eq. 11) or ``"authors"`` (:func:`authors_background_mask`).
        background_threshold: Threshold on the mean probability in the paper's background set.

    Returns:
        The terms and their weighted total; ``nonfinite_flag`` flags a non-finite ``G``.

    Raises:
        ValueError: On negative weights, unknown variants, or an output the switched-on terms need missing.

    Shape:
        - p1_labeled, p2_labeled, y, p1_fused, p2_fused: (N, 1, H, W)
        - eps: (N, 1, 1, 1)
        - fused, input_grad: (N, C, H, W)
    """
    if lambda_semi < 0:
        raise ValueError(f"`lambda_semi` must be >= 0, got {lambda_semi}.")
    if lambda_grad < 0:
        raise ValueError(f"`lambda_grad` must be >= 0, got {lambda_grad}.")
    if background not in ("paper", "authors"):
        raise ValueError(f"`background` must be 'paper' or 'authors', got {background!r}.")
    with_semi, with_penalty = lambda_semi > 0, lambda_grad > 0
    if (with_semi or with_penalty) and (p1_fused is None or p2_fused is None):
        raise ValueError("`p1_fused` and `p2_fused` are needed when lambda_semi > 0 or lambda_grad > 0.")
    if with_semi and eps is None:
        raise ValueError("`eps` is needed when lambda_semi > 0: the pseudo labels mix the mask in by it.")
    if with_penalty and fused is None and input_grad is None:
        raise ValueError("`fused` (requiring grad) or `input_grad` is needed when lambda_grad > 0.")
    zero = p1_labeled.new_zeros((), dtype=torch.float32)
    sup = supervised_loss(p1_labeled, p2_labeled, y, dice)
    semi, penalty, flag, s = zero, zero, None, None
    if with_semi:
        assert p1_fused is not None and p2_fused is not None and eps is not None  # checked above
        semi = semi_supervised_loss(p1_fused, p2_fused, y, eps, dice)
    if with_penalty:
        assert p1_fused is not None and p2_fused is not None  # checked above
        if input_grad is None:
            assert fused is not None  # checked above
            s = output_sum(p1_fused, p2_fused)
            input_grad = input_gradient(s, fused)
        flag = _nonfinite_flag(input_grad)
        if background == "authors":
            bg = authors_background_mask(y)
        else:
            bg = background_mask(y, p1_fused, p2_fused, background_threshold)
        penalty = gradient_penalty(input_grad, bg)
    total = total_loss(sup, semi, penalty if with_penalty else None, lambda_semi, lambda_grad)
    return GPCPSLosses(total=total, sup=sup, penalty=penalty, semi=semi, nonfinite_flag=flag, output_sum=s)
