"""The baselines' losses and helpers (docs/baselines.md) as pure functions (no Lightning).

Cross pseudo supervision (Chen et al., CVPR 2021) and Mean Teacher (Tarvainen & Valpola, NeurIPS 2017),
adapted to binary segmentation, plus each baseline's objective: the weighted total its module trains on.
The supervised term of every baseline is GP-CPS's ``L_sup`` Dice (:mod:`gpcps_lightning.losses.dice`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpcps_lightning.losses._checks import check_map, check_ramp, check_same_shape
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function, dice_loss_with_ignore

__all__ = [
    "CPSLosses",
    "MeanTeacherLosses",
    "SupervisedLosses",
    "add_gaussian_noise",
    "consistency_loss",
    "cps_loss",
    "cps_objective",
    "ema_decay_at",
    "ema_update",
    "hard_pseudo_labels",
    "mean_teacher_objective",
    "sigmoid_rampup",
    "supervised_objective",
    "warmed_decay",
]


# ---------------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------------


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
    check_map("logits", logits)
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
    check_map("logits_a", logits_a)
    check_map("logits_b", logits_b)
    check_same_shape("logits_a", logits_a, "logits_b", logits_b)
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
    check_map("student_probs", student_probs)
    check_map("teacher_probs", teacher_probs)
    check_same_shape("student_probs", student_probs, "teacher_probs", teacher_probs)
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
    check_ramp(step, rampup_steps)
    if rampup_steps == 0 or step >= rampup_steps:
        return 1.0
    phase = 1.0 - step / rampup_steps
    return math.exp(-5.0 * phase * phase)


# ---------------------------------------------------------------------------------------------------
# Mean Teacher helpers (on modules and tensors)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Move the teacher's parameters towards the student's: ``t <- decay * t + (1 - decay) * s``.

    Only parameters are averaged, as in the Mean Teacher reference code; buffers (batch-norm running
    statistics) are left to the teacher's own forward passes.

    Args:
        teacher: The averaged network, updated in place.
        student: The trained network, same architecture.
        decay: The EMA decay ``alpha`` in [0, 1].

    Raises:
        ValueError: If ``decay`` is outside [0, 1] or the two networks' parameters differ in names or shapes.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"`decay` must be in [0, 1], got {decay}.")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("`teacher` and `student` must have the same parameters (same architecture).")
    for name, t in t_params.items():
        if t.shape != s_params[name].shape:
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(t.shape)} in `teacher` but "
                f"{tuple(s_params[name].shape)} in `student`."
            )
    teacher_list: list[Tensor] = list(t_params.values())
    student_list: list[Tensor] = [s_params[name].detach() for name in t_params]
    torch._foreach_mul_(teacher_list, decay)
    torch._foreach_add_(teacher_list, student_list, alpha=1.0 - decay)


def warmed_decay(updates: int, decay: float) -> float:
    """The decay of a moving average's update after ``updates`` earlier ones: ``min(1 - 1/(n+1), decay)``.

    Mean Teacher's reference code: the first update (``n = 0``) copies the student, the ``n``-th one
    gives the average of the student's last ``n + 1`` states equal weight until ``decay`` takes over.

    Raises:
        ValueError: If ``updates`` is negative or ``decay`` is outside [0, 1].
    """
    if updates < 0:
        raise ValueError(f"`updates` must be >= 0, got {updates}.")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"`decay` must be in [0, 1], got {decay}.")
    return min(1.0 - 1.0 / (updates + 1), decay)


def ema_decay_at(
    step: int, decay: float, rampup_steps: int, decay_after_rampup: float | None = None
) -> float:
    """EMA decay at a training step: ``decay`` during the ramp-up, then ``decay_after_rampup``.

    The Mean Teacher reference code (TensorFlow) uses 0.99 while ``step < rampup_steps`` and 0.999
    afterwards; ``decay_after_rampup=None`` keeps ``decay`` throughout.

    Args:
        step: 0-based training step.
        decay: Decay during the ramp-up (and after it when ``decay_after_rampup`` is ``None``).
        rampup_steps: Length of the consistency ramp-up in steps.
        decay_after_rampup: Decay from ``step >= rampup_steps`` on, or ``None``.

    Returns:
        The decay to use for the EMA update that follows step ``step``.

    Raises:
        ValueError: If ``step`` or ``rampup_steps`` is negative.
    """
    check_ramp(step, rampup_steps)
    if decay_after_rampup is None or step < rampup_steps:
        return decay
    return decay_after_rampup


def add_gaussian_noise(
    images: Tensor, std: float, clip: float | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``images + n`` with ``n ~ N(0, std^2)`` drawn per element (Mean Teacher's input noise).

    Args:
        images: Images as the networks see them (normalised).
        std: Standard deviation of the noise; 0 returns ``images`` unchanged.
        clip: Clip the noise to ``[-clip, clip]`` (SSL4MIS clips at 0.2), or ``None``.
        generator: Optional random generator (for reproducible draws), on the images' device.

    Returns:
        Noisy images, shape and dtype of ``images``.

    Raises:
        ValueError: If ``std`` is negative or ``clip`` is not positive.

    Shape:
        - images: (N, C, H, W)
    """
    if std < 0:
        raise ValueError(f"`std` must be >= 0, got {std}.")
    if clip is not None and clip <= 0:
        raise ValueError(f"`clip` must be positive or None, got {clip}.")
    if std == 0:
        return images
    noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator) * std
    if clip is not None:
        noise = noise.clamp(-clip, clip)
    return images + noise


# ---------------------------------------------------------------------------------------------------
# Objectives: the weighted total each baseline trains on
# ---------------------------------------------------------------------------------------------------


class SupervisedLosses(NamedTuple):
    """The loss terms of one supervised step (float32 scalars)."""

    total: Tensor
    sup: Tensor


def supervised_objective(
    p_labeled: Tensor, y: Tensor, dice: DiceVariant = "soft", valid: Tensor | None = None
) -> SupervisedLosses:
    """The supervised baseline's loss: GP-CPS's ``L_sup`` for one network, ``Dice(p(l), y)``.

    Args:
        p_labeled: The network's probabilities on the labeled images.
        y: Their masks, in {0, 1}.
        dice: ``"soft"`` (specification) or ``"authors"`` Dice loss.
        valid: Where ``y`` is a label (1) or ignored (0), for ST++'s cutout regions
            (:func:`~gpcps_lightning.losses.dice.dice_loss_with_ignore`); ``None``: everywhere.

    Returns:
        The loss (``total`` and ``sup`` are the same tensor).

    Raises:
        ValueError: On shapes other than (N, 1, H, W) or an unknown ``dice``.
    """
    if valid is None:
        sup = dice_loss_function(dice)(p_labeled, y)
    else:
        sup = dice_loss_with_ignore(p_labeled, y, valid, dice)
    return SupervisedLosses(total=sup, sup=sup)


class CPSLosses(NamedTuple):
    """The loss terms of one CPS step (float32 scalars; ``cps`` is 0 when ``lambda_cps`` is 0)."""

    total: Tensor
    sup: Tensor
    cps: Tensor


def cps_objective(
    logits1_labeled: Tensor,
    logits2_labeled: Tensor,
    y: Tensor,
    logits1_unlabeled: Tensor | None = None,
    logits2_unlabeled: Tensor | None = None,
    *,
    lambda_cps: float = 1.5,
    cps_on_labeled: bool = True,
    pseudo_threshold: float = 0.5,
    dice: DiceVariant = "soft",
) -> CPSLosses:
    """CPS's objective ``L_sup + lambda_cps * L_cps``.

    ``L_sup`` is GP-CPS's supervised Dice of both networks on the labeled images; ``L_cps``
    (:func:`cps_loss`) is taken on the unlabeled logits and, with ``cps_on_labeled``, on the labeled ones
    too (one pixel mean over their concatenation, as the authors' code). Without unlabeled logits (or with
    ``lambda_cps=0``) ``L_cps`` is 0.

    Args:
        logits1_labeled: First network's logits on the labeled images.
        logits2_labeled: Second network's logits on the labeled images.
        y: Masks of the labeled images.
        logits1_unlabeled: First network's logits on the unlabeled images.
        logits2_unlabeled: Second network's logits on the unlabeled images.
        lambda_cps: Weight of ``L_cps``.
        cps_on_labeled: Also apply ``L_cps`` to the labeled images.
        pseudo_threshold: Probability threshold of the hard pseudo labels.
        dice: ``"soft"`` (specification) or ``"authors"`` Dice loss.

    Returns:
        The loss terms and their weighted total.

    Raises:
        ValueError: On shapes other than (N, 1, H, W), a threshold outside (0, 1) or an unknown ``dice``.
    """
    loss = dice_loss_function(dice)
    sup = loss(torch.sigmoid(logits1_labeled), y) + loss(torch.sigmoid(logits2_labeled), y)
    cps = sup.new_zeros(())
    if lambda_cps > 0 and logits1_unlabeled is not None and logits2_unlabeled is not None:
        logits1, logits2 = logits1_unlabeled, logits2_unlabeled
        if cps_on_labeled:
            logits1 = torch.cat([logits1_labeled, logits1])
            logits2 = torch.cat([logits2_labeled, logits2])
        cps = cps_loss(logits1, logits2, pseudo_threshold)
    return CPSLosses(total=sup + lambda_cps * cps, sup=sup, cps=cps)


class MeanTeacherLosses(NamedTuple):
    """The loss terms of one Mean Teacher step (float32 scalars) and the consistency weight used."""

    total: Tensor
    sup: Tensor
    cons: Tensor
    cons_weight: float


def mean_teacher_objective(
    p_student_labeled: Tensor,
    y: Tensor,
    p_student_unlabeled: Tensor | None = None,
    p_teacher_unlabeled: Tensor | None = None,
    *,
    cons_weight: float = 0.0,
    dice: DiceVariant = "soft",
) -> MeanTeacherLosses:
    """Mean Teacher's objective ``L_sup + w(t) * L_cons``.

    ``L_sup`` is GP-CPS's supervised Dice of the student; ``L_cons`` (:func:`consistency_loss`) compares
    the student's and the (detached) teacher's probabilities on the unlabeled images, and is 0 without them.

    Args:
        p_student_labeled: The student's probabilities on the labeled images.
        y: Masks of the labeled images.
        p_student_unlabeled: The student's probabilities on its view of the unlabeled images.
        p_teacher_unlabeled: The teacher's probabilities on its view of the unlabeled images.
        cons_weight: The consistency weight ``w(t)`` of this step (see :func:`sigmoid_rampup`).
        dice: ``"soft"`` (specification) or ``"authors"`` Dice loss.

    Returns:
        The loss terms, their weighted total and the weight used.

    Raises:
        ValueError: On shapes other than (N, 1, H, W) or an unknown ``dice``.
    """
    sup = dice_loss_function(dice)(p_student_labeled, y)
    cons = sup.new_zeros(())
    if p_student_unlabeled is not None and p_teacher_unlabeled is not None:
        cons = consistency_loss(p_student_unlabeled, p_teacher_unlabeled)
    return MeanTeacherLosses(total=sup + cons_weight * cons, sup=sup, cons=cons, cons_weight=cons_weight)
