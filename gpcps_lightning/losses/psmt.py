"""PS-MT's losses and perturbations (Liu et al., CVPR 2022) as pure functions (no Lightning).

Perturbed and Strict Mean Teachers, official code ``yyliu01/PS-MT`` (docs/baselines.md), adapted to
one output channel: the teachers' target is their averaged sigmoid probability, the confidence of a pixel
is ``max(p, 1 - p)`` and the virtual adversarial perturbation (T-VAT) maximises a Bernoulli KL.

- :func:`cosine_rampup`, :func:`active_teacher`: the schedule (ramp of the unlabeled weight, which teacher
  the moving average updates).
- :func:`cutmix_boxes`, :func:`draw_cutmix`, :func:`apply_cutmix`: the strong view's CutMix.
- :func:`bernoulli_kl_with_logits`, :func:`vat_perturbation`: T-VAT.
- :func:`teacher_target`, :func:`confidence_weighted_ce`: the unlabeled loss.
- :func:`psmt_objective`: the weighted total the student trains on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gpcps_lightning.losses._checks import as_float, check_map, check_ramp, check_same_shape
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function

__all__ = [
    "CutMixBoxes",
    "PSMTLosses",
    "active_teacher",
    "apply_cutmix",
    "bernoulli_kl_with_logits",
    "confidence_weighted_ce",
    "cosine_rampup",
    "cutmix_boxes",
    "draw_cutmix",
    "psmt_objective",
    "teacher_target",
    "vat_perturbation",
]


# ---------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------


def cosine_rampup(step: int, rampup_steps: int) -> float:
    """PS-MT's cosine ramp ``(1 - cos(pi * t / T)) / 2`` for ``t < T``, then 1 (``Utils/ramps.py``).

    It starts at 0: the unlabeled loss has no weight at the first step after the warm-up.

    Args:
        step: Steps since the ramp began, ``t`` (0-based); must be >= 0.
        rampup_steps: Ramp length ``T`` in steps; must be >= 0. ``T = 0`` means no ramp (always 1).

    Returns:
        The ramp factor in [0, 1].

    Raises:
        ValueError: If ``step`` or ``rampup_steps`` is negative.
    """
    check_ramp(step, rampup_steps)
    if rampup_steps == 0 or step >= rampup_steps:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * step / rampup_steps))


def active_teacher(step: int, warmup_steps: int, switch_every: int) -> int | None:
    """Which teacher the moving average updates after the 0-based training step ``step``.

    None during the warm-up (the optimizer trains all three networks then). Afterwards teacher 0 for
    the first ``switch_every`` steps, teacher 1 for the next ``switch_every``, and so on: the official
    code alternates by epoch, starting with its teacher 1.

    Raises:
        ValueError: If ``step`` or ``warmup_steps`` is negative or ``switch_every`` is below 1.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
    if switch_every < 1:
        raise ValueError(f"`switch_every` must be >= 1, got {switch_every}.")
    if step < warmup_steps:
        return None
    return ((step - warmup_steps) // switch_every) % 2


# ---------------------------------------------------------------------------------------------------
# CutMix (the strong view)
# ---------------------------------------------------------------------------------------------------


class CutMixBoxes(NamedTuple):
    """One CutMix draw for a batch of ``N`` images.

    Attributes:
        boxes: (N, 4) int64 ``(top, bottom, left, right)``: image ``i`` takes rows ``[top, bottom)`` and
            columns ``[left, right)`` from image ``partners[i]``. An empty box leaves the image as it is.
        partners: (N,) int64, a permutation of the batch (an image may be its own partner).
        lam: The batch's ``Beta`` draw that sized the boxes.
    """

    boxes: Tensor
    partners: Tensor
    lam: float


def cutmix_boxes(height: int, width: int, lam: float, centres: Tensor) -> Tensor:
    """The official CutMix boxes for one ``lam`` and given centres (``rand_bbox_1`` of ``train.py``).

    Box sides ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))``; each box spans half a side (rounded
    down) either way of its centre, clipped to the image: rows ``[cy - h // 2, cy + h // 2)``.

    Args:
        height: Image height ``H``.
        width: Image width ``W``.
        lam: The mixing draw in [0, 1]; ``1 - lam`` is about the area the box takes.
        centres: (N, 2) integer centres ``(cy, cx)``.

    Returns:
        (N, 4) int64 boxes ``(top, bottom, left, right)``.

    Raises:
        ValueError: If ``lam`` is outside [0, 1] or ``centres`` is not (N, 2).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"`lam` must be in [0, 1], got {lam}.")
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"`centres` must have shape (N, 2), got {tuple(centres.shape)}.")
    cut_rat = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut_rat) // 2, int(width * cut_rat) // 2
    cy, cx = centres[:, 0].long(), centres[:, 1].long()
    return torch.stack(
        [
            (cy - half_h).clamp(0, height),
            (cy + half_h).clamp(0, height),
            (cx - half_w).clamp(0, width),
            (cx + half_w).clamp(0, width),
        ],
        dim=1,
    )


def _beta_sample(a: float, b: float, generator: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator: a NumPy generator seeded from ``generator`` draws it, so
    # that the draw is reproducible from the torch state and no global state is touched.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(a, b))


def draw_cutmix(
    n: int,
    height: int,
    width: int,
    *,
    beta: float = 4.0,
    generator: torch.Generator | None = None,
) -> CutMixBoxes:
    """Draw one CutMix of a batch as the official code does (``cut_mix`` of ``train.py``).

    One ``lam ~ Beta(beta, beta)`` for the batch; per image a centre ``cy`` uniform in
    ``[int(H / 8), H)`` and ``cx`` in ``[int(W / 8), W)`` (the official range, which keeps centres off the
    top and left edges), boxes by :func:`cutmix_boxes`; partners a random permutation of the batch.

    Args:
        n: Batch size.
        height: Image height.
        width: Image width.
        beta: Both shape parameters of the Beta distribution (official: 4).
        generator: CPU random generator; ``None`` draws from the global state.

    Returns:
        The boxes and partners, on the CPU, and ``lam``.

    Raises:
        ValueError: If ``n``, ``height`` or ``width`` is below 1 or ``beta`` is not positive.
    """
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"`n`, `height` and `width` must be >= 1, got {n}, {height}, {width}.")
    if beta <= 0:
        raise ValueError(f"`beta` must be positive, got {beta}.")
    lam = _beta_sample(beta, beta, generator)
    cy = torch.randint(int(height / 8), height, (n,), generator=generator)
    cx = torch.randint(int(width / 8), width, (n,), generator=generator)
    partners = torch.randperm(n, generator=generator)
    return CutMixBoxes(cutmix_boxes(height, width, lam, torch.stack([cy, cx], dim=1)), partners, lam)


def apply_cutmix(x: Tensor, cutmix: CutMixBoxes) -> Tensor:
    """Paste each image's box from its partner: ``out[i] = x[partners[i]]`` inside box ``i``, else ``x[i]``.

    Apply the same draw to the images and to their targets so that they stay aligned.

    Args:
        x: Images, probabilities or masks.
        cutmix: A draw for this batch size (:func:`draw_cutmix`).

    Returns:
        The mixed tensor, shape and dtype of ``x`` (differentiable in ``x``).

    Raises:
        ValueError: If ``x`` is not 4-D or the draw is for another batch size.

    Shape:
        - x: (N, C, H, W)
        - output: (N, C, H, W)
    """
    if x.ndim != 4:
        raise ValueError(f"`x` must have shape (N, C, H, W), got {tuple(x.shape)}.")
    n, _, h, w = x.shape
    if cutmix.boxes.shape != (n, 4) or cutmix.partners.shape != (n,):
        raise ValueError(
            f"The CutMix draw is for {cutmix.partners.shape[0]} images, got a batch of {n}; draw it for "
            "this batch."
        )
    boxes = cutmix.boxes.to(x.device)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])  # (N, H)
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])  # (N, W)
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)
    return torch.where(inside, x[cutmix.partners.to(x.device)], x)


# ---------------------------------------------------------------------------------------------------
# T-VAT: virtual adversarial perturbation of the student's decoder input, against the teachers
# ---------------------------------------------------------------------------------------------------


def bernoulli_kl_with_logits(target_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(Ber(sigmoid(target_logits)) || Ber(sigmoid(logits)))`` summed over pixels, divided by ``N``.

    The binary form of the official ``F.kl_div(log_softmax(pred_hat), softmax(pred), 'batchmean')``:
    ``p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))`` with log-sigmoids, so that it is finite for
    any logits. Its gradient with respect to ``logits`` is ``(sigmoid(logits) - p) / N``.

    Args:
        target_logits: Logits of the reference distribution ``p`` (not differentiated).
        logits: Logits of ``q``.

    Returns:
        A scalar, float32 (float64 for float64 inputs), >= 0.

    Raises:
        ValueError: On shapes other than (N, 1, H, W) or different shapes.

    Shape:
        - target_logits, logits: (N, 1, H, W)
    """
    check_map("target_logits", target_logits)
    check_map("logits", logits)
    check_same_shape("target_logits", target_logits, "logits", logits)
    t = as_float(target_logits.detach())
    z = as_float(logits)
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(z)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-z))
    return kl.sum() / z.shape[0]


def _l2_normalize(tensors: list[Tensor], norm_eps: float) -> list[Tensor]:
    """One unit direction per sample across all ``tensors`` (they are normalised jointly).

    ``norm_eps > 0`` is the official ``d / (|d| + norm_eps)``. ``norm_eps = 0`` divides by the norm exactly,
    after dividing by the largest magnitude so that tiny gradients neither underflow nor overflow (as
    Miyato et al.'s VAT code does); a zero direction stays zero.
    """

    def per_sample(values: Tensor, t: Tensor) -> Tensor:
        return values.view(-1, *([1] * (t.ndim - 1)))

    if norm_eps == 0:
        peak = torch.stack([t.abs().flatten(1).amax(dim=1) for t in tensors]).amax(dim=0)
        inv_peak = torch.where(peak > 0, 1.0 / peak, torch.zeros_like(peak))
        tensors = [t * per_sample(inv_peak, t) for t in tensors]
    norm = torch.stack([t.pow(2).flatten(1).sum(dim=1) for t in tensors]).sum(dim=0).sqrt()
    if norm_eps == 0:
        scale = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    else:
        scale = 1.0 / (norm + norm_eps)
    return [t * per_sample(scale, t) for t in tensors]


def vat_perturbation(
    features: Sequence[Tensor],
    decode: Callable[[list[Tensor]], Tensor],
    perturbed: Sequence[int],
    *,
    xi: float = 1e-6,
    eps: float = 2.0,
    iterations: int = 1,
    norm_eps: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[Tensor | None]:
    """T-VAT's perturbation: the direction of the features that most changes the teachers' prediction.

    ``get_r_adv_t`` of the official code, for a decoder that reads several feature maps: with ``p`` the
    teachers' logits on the features (``decode``), start from a random direction ``d`` (uniform in
    [-0.5, 0.5), normalised per sample), take ``iterations`` power-method steps
    ``d <- normalise(grad_d KL(p || decode(features + xi * d)))`` (:func:`bernoulli_kl_with_logits`) and
    return ``eps * d``. The features listed in ``perturbed`` share one direction per sample: they are
    normalised jointly, as the official decoder input is one tensor.

    ``normalise`` divides by the norm per sample, so that the perturbation has norm ``eps`` as in the
    paper. The official ``_l2_normalize`` adds 1e-8 to the norm (``norm_eps=1e-8``); the gradient is of the
    order of ``xi`` times the KL's curvature, about 1e-11 on the library's UNets at ``xi = 1e-6``, so that
    guard shrinks the perturbation to about 1e-4 of ``eps`` (docs/baselines.md).

    The features are detached and the iteration runs in float32 with autocast off: a step of ``xi`` is
    lost to rounding in half precision. Only ``d`` is differentiated (no gradient reaches ``decode``'s
    parameters). Put ``decode``'s networks in evaluation mode around the call, as the official code does,
    so that their batch-norm statistics do not move.

    Args:
        features: The decoder input, e.g. the list an smp encoder returns.
        decode: Maps perturbed features to the teachers' (combined) logits, (N, 1, H, W).
        perturbed: Indices of ``features`` to perturb.
        xi: Size of the finite-difference step (official: 1e-6).
        eps: Norm of the returned perturbation per sample (official: 2.0).
        iterations: Power-method steps (official: 1).
        norm_eps: Added to the norm when normalising; 0 (default) normalises exactly (official: 1e-8).
        generator: Random generator on the features' device; ``None`` draws from the global state.

    Returns:
        One entry per feature: the perturbation (detached, the feature's dtype) or ``None`` where the
        feature is not perturbed.

    Raises:
        ValueError: On an empty or out-of-range ``perturbed``, a ``xi`` that is not positive, a negative
            ``eps`` or ``norm_eps``, or ``iterations`` below 1.
    """
    if not perturbed or any(not 0 <= i < len(features) for i in perturbed):
        raise ValueError(
            f"`perturbed` must list indices of the {len(features)} features, got {list(perturbed)}."
        )
    if xi <= 0 or eps < 0 or norm_eps < 0:
        raise ValueError(
            f"`xi` must be positive, `eps` and `norm_eps` >= 0, got xi={xi}, eps={eps}, norm_eps={norm_eps}."
        )
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1, got {iterations}.")
    index = list(dict.fromkeys(perturbed))
    device_type = features[0].device.type
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        base = [as_float(f.detach()) for f in features]
        with torch.no_grad():
            target = decode(base)
        d = [
            torch.rand(base[i].shape, device=base[i].device, dtype=base[i].dtype, generator=generator) - 0.5
            for i in index
        ]
        d = _l2_normalize(d, norm_eps)
        for _ in range(iterations):
            d = [t.requires_grad_(True) for t in d]
            shifted = list(base)
            for i, t in zip(index, d, strict=True):
                shifted[i] = base[i] + xi * t
            distance = bernoulli_kl_with_logits(target, decode(shifted))
            grads = torch.autograd.grad(distance, d, allow_unused=True)
            d = _l2_normalize(
                [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(d, grads, strict=True)],
                norm_eps,
            )
    out: list[Tensor | None] = [None] * len(features)
    for i, t in zip(index, d, strict=True):
        out[i] = (eps * t).to(features[i].dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# The unlabeled loss
# ---------------------------------------------------------------------------------------------------


def teacher_target(p_teacher1: Tensor, p_teacher2: Tensor, gamma: float = 0.5) -> Tensor:
    """The teachers' target ``gamma * p1 + (1 - gamma) * p2`` (probabilities), detached.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, or ``gamma`` outside [0, 1].

    Shape:
        - p_teacher1, p_teacher2, output: (N, 1, H, W)
    """
    check_map("p_teacher1", p_teacher1)
    check_map("p_teacher2", p_teacher2)
    check_same_shape("p_teacher1", p_teacher1, "p_teacher2", p_teacher2)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"`gamma` must be in [0, 1], got {gamma}.")
    return (gamma * as_float(p_teacher1) + (1.0 - gamma) * as_float(p_teacher2)).detach()


def confidence_weighted_ce(student_logits: Tensor, target_probs: Tensor, threshold: float = 0.6) -> Tensor:
    """PS-MT's unlabeled loss (``semi_ce_loss``) for one channel: confidence-weighted, thresholded BCE.

    With ``y = 1[p >= 0.5]`` the teachers' hard label and ``c = max(p, 1 - p)`` its confidence, the mean of
    ``c * BCE(z, y)`` over the pixels with ``c >= threshold``; 0 (with a graph) when no pixel passes. The
    target is detached.

    Args:
        student_logits: The student's logits ``z`` on the strong view.
        target_probs: The teachers' foreground probabilities ``p`` on the same (mixed) view.
        threshold: Confidence threshold in [0, 1) (official: 0.6).

    Returns:
        A float32 scalar.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes, or a threshold outside [0, 1).

    Shape:
        - student_logits, target_probs: (N, 1, H, W)
    """
    check_map("student_logits", student_logits)
    check_map("target_probs", target_probs)
    check_same_shape("student_logits", student_logits, "target_probs", target_probs)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"`threshold` must be in [0, 1), got {threshold}.")
    p = as_float(target_probs.detach())
    y = (p >= 0.5).to(p.dtype)
    confidence = torch.maximum(p, 1.0 - p)
    keep = (confidence >= threshold).to(p.dtype)
    bce = F.binary_cross_entropy_with_logits(as_float(student_logits), y, reduction="none")
    # sum / count instead of boolean indexing: no host synchronisation, and 0 when nothing passes
    return (bce * confidence * keep).sum() / keep.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------


class PSMTLosses(NamedTuple):
    """The loss terms of one PS-MT step (float32 scalars) and the ramp factor used.

    ``teachers_sup`` is the teachers' supervised loss during the warm-up (0 afterwards); ``unsup`` is
    unweighted.
    """

    total: Tensor
    sup: Tensor
    teachers_sup: Tensor
    unsup: Tensor
    ramp: float


def psmt_objective(
    p_student_labeled: Tensor,
    y: Tensor,
    student_logits_unlabeled: Tensor | None = None,
    target_unlabeled: Tensor | None = None,
    *,
    p_teachers_labeled: Sequence[Tensor] = (),
    unsup_weight: float = 1.5,
    ramp: float = 1.0,
    confidence_threshold: float = 0.6,
    dice: DiceVariant = "soft",
) -> PSMTLosses:
    """PS-MT's objective ``L_sup + L_sup(teachers) + unsup_weight * ramp * L_unsup``.

    ``L_sup`` is GP-CPS's supervised Dice of the student; during the warm-up the teachers are trained by
    the same Dice (``p_teachers_labeled``), afterwards that term is 0. ``L_unsup``
    (:func:`confidence_weighted_ce`) compares the student's logits on the strong view with the teachers'
    target mixed the same way; it is 0 without them.

    Args:
        p_student_labeled: The student's probabilities on the labeled images.
        y: Their masks.
        student_logits_unlabeled: The student's logits on the strong (CutMix) view.
        target_unlabeled: The teachers' target probabilities, mixed as that view.
        p_teachers_labeled: The teachers' probabilities on the labeled images (warm-up only).
        unsup_weight: Weight of ``L_unsup`` at the end of the ramp (official: 1.5).
        ramp: The ramp factor of this step (:func:`cosine_rampup`).
        confidence_threshold: See :func:`confidence_weighted_ce`.
        dice: ``"soft"`` (specification) or ``"authors"`` Dice loss.

    Returns:
        The loss terms, their weighted total and the ramp factor.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), a threshold outside [0, 1) or an unknown ``dice``.
    """
    loss = dice_loss_function(dice)
    sup = loss(p_student_labeled, y)
    teachers_sup = sup.new_zeros(())
    for p in p_teachers_labeled:
        teachers_sup = teachers_sup + loss(p, y)
    unsup = sup.new_zeros(())
    if student_logits_unlabeled is not None and target_unlabeled is not None:
        unsup = confidence_weighted_ce(student_logits_unlabeled, target_unlabeled, confidence_threshold)
    total = sup + teachers_sup + unsup_weight * ramp * unsup
    return PSMTLosses(total=total, sup=sup, teachers_sup=teachers_sup, unsup=unsup, ramp=ramp)
