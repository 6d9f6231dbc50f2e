"""The GP-CPS losses as pure, typed functions (no Lightning).

Every function implements one equation of ``docs/method.md`` (which follows the project's METHOD.md).
The defaults are the specification's; the variants found in the paper authors' code are separate
functions or options, never the default.

Conventions: images are (N, C, H, W); masks, probabilities and pseudo labels are (N, 1, H, W);
``eps`` is (N, 1, 1, 1). Losses are computed in at least float32 (half-precision inputs are promoted),
so that they behave the same under bf16 and fp16 autocast.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "authors_background_mask",
    "authors_dice_loss",
    "background_mask",
    "fuse_images",
    "fused_pseudo_labels",
    "gradient_penalty",
    "input_gradient",
    "penalty_precision_context",
    "sample_eps",
    "soft_dice_loss",
]

EpsMode = Literal["per_sample", "per_batch"]


def _as_float(x: Tensor) -> Tensor:
    """At least float32 (half precision is promoted; float64 stays float64 for gradient checks)."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _check_map(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"`{name}` must have shape (N, 1, H, W), got {tuple(x.shape)}.")
    if not (x.is_floating_point() or x.dtype == torch.bool):
        raise ValueError(f"`{name}` must be floating point or bool, got {x.dtype}.")


def _check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{a_name}` and `{b_name}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def _check_eps(eps: Tensor, n: int) -> None:
    if not isinstance(eps, Tensor):
        raise TypeError(f"`eps` must be a torch.Tensor, got {type(eps).__name__}.")
    if eps.shape != (n, 1, 1, 1):
        raise ValueError(f"`eps` must have shape ({n}, 1, 1, 1), got {tuple(eps.shape)}.")
    if not eps.is_floating_point():
        raise ValueError(f"`eps` must be floating point, got {eps.dtype}.")


def soft_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss, per sample, averaged over the batch (the paper's ``L_dice``).

    ``1 - (2 * sum(p * t) + s) / (sum(p) + sum(t) + s)`` for each sample, then the batch mean.

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
    _check_map("probs", probs)
    _check_map("target", target)
    _check_same_shape("probs", probs, "target", target)
    if smooth <= 0:
        raise ValueError(f"`smooth` must be positive, got {smooth}.")
    p = _as_float(probs).flatten(1)
    t = _as_float(target).flatten(1)
    intersection = (p * t).sum(dim=1)
    dice = (2.0 * intersection + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)
    return (1.0 - dice).mean()


def authors_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Dice loss as the paper authors' code computes it (an option, not the default).

    One Dice over the whole batch with squared sums in the denominator:
    ``1 - (2 * sum(p * t) + s) / (sum(p^2) + sum(t^2) + s)``.

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
    _check_map("probs", probs)
    _check_map("target", target)
    _check_same_shape("probs", probs, "target", target)
    if smooth <= 0:
        raise ValueError(f"`smooth` must be positive, got {smooth}.")
    p = _as_float(probs)
    t = _as_float(target)
    dice = (2.0 * (p * t).sum() + smooth) / ((p * p).sum() + (t * t).sum() + smooth)
    return 1.0 - dice


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
    _check_same_shape("labeled", labeled, "unlabeled", unlabeled)
    _check_eps(eps, labeled.shape[0])
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
    _check_map("y", y)
    _check_map("p_other", p_other)
    _check_same_shape("y", y, "p_other", p_other)
    _check_eps(eps, y.shape[0])
    with torch.no_grad():
        p = _as_float(p_other.detach())
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
    _check_map("y", y)
    _check_map("p1", p1)
    _check_map("p2", p2)
    _check_same_shape("y", y, "p1", p1)
    _check_same_shape("y", y, "p2", p2)
    with torch.no_grad():
        return (y < 0.5) | ((_as_float(p1) + _as_float(p2)) / 2.0 < threshold)


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
    _check_map("y", y)
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
    """``d(total) / d(inputs)`` with ``create_graph=True``, so that a penalty on it trains the networks.

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
        return _as_float(grad)
    (scaled_grad,) = torch.autograd.grad(scaler.scale(total), inputs, create_graph=True)
    # scaler.scale of a one gives the current scale as a device tensor: no host synchronisation.
    scale = scaler.scale(torch.ones((), device=total.device, dtype=torch.float32))
    return _as_float(scaled_grad) / scale


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
    total = torch.where(mask, _as_float(grad).abs(), 0.0).sum()
    # clamp keeps the empty-background case at exactly 0 / 1 = 0 without a host-side branch.
    count = (background.sum() * c).clamp(min=1).to(total.dtype)
    return total / count


# ---------------------------------------------------------------------------------------------------
# Baselines: cross pseudo supervision (CPS) and Mean Teacher (see docs/baselines.md).
# ---------------------------------------------------------------------------------------------------

__all__ += ["consistency_loss", "cps_loss", "hard_pseudo_labels", "sigmoid_rampup"]


def hard_pseudo_labels(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Hard pseudo labels ``1[sigmoid(logits) >= threshold]``, detached (CPS, Chen et al. 2021).

    For one-channel logits ``z`` this is the arg-max of the equivalent two-class softmax over
    ``(0, z)`` when ``threshold = 0.5`` (up to ties at ``z = 0``, which go to the foreground here, as
    in the library's evaluation).

    Args:
        logits: One-channel logits of a network.
        threshold: Probability threshold in (0, 1).

    Returns:
        float32 labels in {0, 1}, detached from the graph.

    Raises:
        ValueError: On a shape other than (N, 1, H, W) or a threshold outside (0, 1).

    Shape:
        - logits: (N, 1, H, W)
        - output: (N, 1, H, W)
    """
    _check_map("logits", logits)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` must be in (0, 1), got {threshold}.")
    with torch.no_grad():
        return (torch.sigmoid(logits.detach().float()) >= threshold).float()


def cps_loss(logits_a: Tensor, logits_b: Tensor, threshold: float = 0.5) -> Tensor:
    """Cross pseudo supervision loss for binary segmentation (Chen et al., CVPR 2021, Eq. 2-3).

    Each network is supervised by the other's hard pseudo labels:
    ``BCE(logits_a, Y_b) + BCE(logits_b, Y_a)`` with ``Y = 1[sigmoid(logits) >= threshold]``
    detached, each binary cross entropy averaged over all pixels of the batch. BCE on one-channel
    logits is exactly the pixel-wise two-class cross entropy of the paper (softmax over logits
    ``(0, z)``), so this is the paper's loss for two classes, not an approximation of it.

    Args:
        logits_a: Logits of the first network.
        logits_b: Logits of the second network on the same images.
        threshold: Probability threshold of the pseudo labels, in (0, 1).

    Returns:
        A float32 scalar; its gradient reaches each network only through its own logits.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, or a threshold outside (0, 1).

    Shape:
        - logits_a, logits_b: (N, 1, H, W)
    """
    _check_map("logits_a", logits_a)
    _check_map("logits_b", logits_b)
    _check_same_shape("logits_a", logits_a, "logits_b", logits_b)
    y_a = hard_pseudo_labels(logits_a, threshold)
    y_b = hard_pseudo_labels(logits_b, threshold)
    return F.binary_cross_entropy_with_logits(logits_a.float(), y_b) + F.binary_cross_entropy_with_logits(
        logits_b.float(), y_a
    )


def consistency_loss(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Mean Teacher consistency cost: mean squared difference of probabilities (Tarvainen & Valpola 2017).

    ``mean((p_student - p_teacher)^2)`` over all pixels of the batch, with the teacher's
    probabilities detached (the teacher is trained only through the moving average). For one-channel
    sigmoid outputs this equals the mean over both channels of the two-class softmax MSE.

    Args:
        student_probs: The student's foreground probabilities in [0, 1].
        teacher_probs: The teacher's foreground probabilities in [0, 1].

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On shapes other than (N, 1, H, W) or different shapes.

    Shape:
        - student_probs, teacher_probs: (N, 1, H, W)
    """
    _check_map("student_probs", student_probs)
    _check_map("teacher_probs", teacher_probs)
    _check_same_shape("student_probs", student_probs, "teacher_probs", teacher_probs)
    return F.mse_loss(student_probs.float(), teacher_probs.detach().float())


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Sigmoid-shaped ramp-up ``exp(-5 * (1 - t / T)^2)`` for ``t < T``, then 1 (Laine & Aila 2017).

    The Mean Teacher paper ramps its consistency weight with this schedule; ``t`` is clipped to
    ``[0, T]`` and ``T = 0`` means no ramp-up (always 1).

    Args:
        step: Current (0-based) training step ``t``; must be >= 0.
        rampup_steps: Ramp-up length ``T`` in steps; must be >= 0.

    Returns:
        The ramp factor in ``[exp(-5), 1]`` (exactly 1 from ``t = T`` on).

    Raises:
        ValueError: If ``step`` or ``rampup_steps`` is negative.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if rampup_steps < 0:
        raise ValueError(f"`rampup_steps` must be >= 0, got {rampup_steps}.")
    if rampup_steps == 0 or step >= rampup_steps:
        return 1.0
    phase = 1.0 - step / rampup_steps
    return math.exp(-5.0 * phase * phase)
