"""UniMatch's losses and helpers (Yang et al., CVPR 2023; the medical code) as pure functions (no Lightning).

UniMatch supervises two strongly perturbed views of each unlabeled image (CutMix included) and a
feature-perturbed decoding of its weak view with the weak view's confident hard predictions. The medical
code (``LiheYoung/UniMatch``, ``more-scenarios/medical``) uses a two-channel softmax; here the networks have
one sigmoid channel, which gives the same objective as a function of the logit difference: the pseudo label
is ``1[p >= 0.5]``, the confidence ``max(p, 1 - p)`` and the Dice loss averages the foreground and the
background class, as the code's ``DiceLoss(n_classes=2)`` does (docs/baselines.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpcps_lightning.losses._checks import as_float, check_map, check_same_shape
from gpcps_lightning.losses.baselines import hard_pseudo_labels
from gpcps_lightning.losses.dice import DiceVariant, dice_loss, dice_loss_function

__all__ = [
    "UniMatchLosses",
    "UniMatchSupervised",
    "apply_cutmix",
    "cutmix_box",
    "pseudo_labels_and_confidence",
    "two_class_dice_loss",
    "unimatch_objective",
]

#: ``"dice"``: the library's ``L_sup`` (the ``dice`` variant), as every baseline; ``"ce_dice"``: the
#: medical code's ``(CE + two-class Dice) / 2``.
UniMatchSupervised = Literal["dice", "ce_dice"]

#: After this many rejected positions a CutMix box is clipped to the image (very elongated images only).
_MAX_BOX_TRIES = 1000


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def cutmix_box(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    p: float = 0.5,
    size: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1.0 / 0.3),
    device: torch.device | str | None = None,
) -> Tensor:
    """Random CutMix boxes, one per image, as UniMatch's ``obtain_cutmix_box`` draws them.

    With probability ``p`` an image gets one box (else none): its area is ``U(size) * H * W``, its
    aspect ratio ``r ~ U(ratio)`` gives width ``int(sqrt(area / r))`` and height ``int(sqrt(area * r))``,
    and its top-left corner is uniform over the image; positions (with a new ratio each time) are drawn
    again until the box fits inside. Should 1000 draws fail (only possible for very elongated images) the
    box is clipped to the image.

    Args:
        shape: ``(N, H, W)`` or ``(N, C, H, W)``: the batch the boxes are for.
        generator: CPU random generator of the draws (``None``: torch's global one).
        p: Probability that an image gets a box, in [0, 1].
        size: Range of the box area as a fraction of the image, within [0, 1].
        ratio: Range of the aspect ratio (height / width), positive.
        device: Where the boxes go.

    Returns:
        float32 boxes in {0, 1} (1 inside the box, whose pixels come from the mixing partner).

    Raises:
        ValueError: On a shape of another length, a probability or size outside [0, 1], or a ratio range
            that is not positive and increasing.

    Shape:
        - output: (N, 1, H, W)
    """
    if len(shape) not in (3, 4):
        raise ValueError(f"`shape` must be (N, H, W) or (N, C, H, W), got {tuple(shape)}.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be in [0, 1], got {p}.")
    if not 0.0 <= size[0] <= size[1] <= 1.0:
        raise ValueError(f"`size` must be (low, high) with 0 <= low <= high <= 1, got {size}.")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"`ratio` must be (low, high) with 0 < low <= high, got {ratio}.")
    n, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
    boxes = torch.zeros(n, 1, height, width)
    for i in range(n):
        if float(torch.rand((), generator=generator)) > p:
            continue
        area = _uniform(size[0], size[1], generator) * height * width
        for _ in range(_MAX_BOX_TRIES):
            r = _uniform(ratio[0], ratio[1], generator)
            w, h = int(math.sqrt(area / r)), int(math.sqrt(area * r))
            x = int(torch.randint(0, width, (), generator=generator))
            y = int(torch.randint(0, height, (), generator=generator))
            if x + w <= width and y + h <= height:
                break
        else:
            w, h = min(w, width), min(h, height)
            x, y = min(x, width - w), min(y, height - h)
        boxes[i, 0, y : y + h, x : x + w] = 1.0
    return boxes.to(device) if device is not None else boxes


def apply_cutmix(inputs: Tensor, partner: Tensor, box: Tensor) -> Tensor:
    """``partner`` inside each image's box, ``inputs`` elsewhere (images, pseudo labels or confidences).

    Args:
        inputs: The batch that is mixed into.
        partner: The mixing partners, image by image.
        box: CutMix boxes from :func:`cutmix_box`; 1 takes the partner's pixel.

    Returns:
        The mixed batch, dtype of ``inputs``.

    Raises:
        ValueError: If ``inputs`` and ``partner`` differ in shape, or ``box`` is not (N, 1, H, W) of them.

    Shape:
        - inputs, partner: (N, C, H, W)
        - box: (N, 1, H, W)
    """
    check_same_shape("inputs", inputs, "partner", partner)
    n, _, h, w = inputs.shape
    if box.shape != (n, 1, h, w):
        raise ValueError(f"`box` must have shape {(n, 1, h, w)}, got {tuple(box.shape)}.")
    return torch.where(box >= 0.5, partner.to(inputs.dtype), inputs)


def pseudo_labels_and_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Hard pseudo labels ``1[p >= 0.5]`` and their confidence ``max(p, 1 - p)``, detached.

    For one-channel logits ``z`` (``p = sigmoid(z)``) these are the arg-max and the maximum of the
    two-class softmax over ``(0, z)``: the medical code's ``argmax`` and ``softmax(...).max`` (up to
    ties at ``z = 0``, which go to the foreground here and to the background there). The confidence is
    computed as ``sigmoid(|z|)``, which does not round to 1 for large negative logits.

    Args:
        logits: One-channel logits.

    Returns:
        ``(labels, confidence)``: float32, labels in {0, 1}, confidence in [0.5, 1].

    Raises:
        ValueError: On a shape other than (N, 1, H, W).

    Shape:
        - logits: (N, 1, H, W)
        - labels, confidence: (N, 1, H, W)
    """
    labels = hard_pseudo_labels(logits)
    with torch.no_grad():
        confidence = torch.sigmoid(logits.detach().float().abs())
    return labels, confidence


def two_class_dice_loss(
    probs: Tensor, target: Tensor, valid: Tensor | None = None, smooth: float = 1e-5
) -> Tensor:
    """The medical UniMatch code's ``DiceLoss`` for two classes, with its ignore mask.

    ``(D(p, t) + D(1 - p, 1 - t)) / 2``, the mean over the foreground and the background class of
    ``D(q, u) = 1 - (2 sum(v q u) + s) / (sum(v q^2) + sum(v u^2) + s)``, each sum over all pixels of the
    batch, ``v`` the valid (not ignored) pixels: :func:`~gpcps_lightning.losses.dice.dice_loss` over the
    batch with squared sums, of ``v q`` and ``v u``. With no valid pixel the loss is 0 and has no gradient.

    Args:
        probs: Foreground probabilities in [0, 1].
        target: Foreground targets in {0, 1}.
        valid: Pixels that count (``True`` or 1), or ``None`` for all.
        smooth: The smoothing constant ``s`` (the code's 1e-5); must be positive.

    Returns:
        A scalar, float32 (float64 for float64 inputs).

    Raises:
        ValueError: On shapes other than (N, 1, H, W), different shapes or ``smooth <= 0``.

    Shape:
        - probs, target, valid: (N, 1, H, W)
    """
    check_map("probs", probs)
    check_map("target", target)
    check_same_shape("probs", probs, "target", target)
    p = as_float(probs)
    t = as_float(target).to(p.dtype)
    v = torch.ones_like(p)
    if valid is not None:
        check_map("valid", valid)
        check_same_shape("probs", probs, "valid", valid)
        v = valid.detach().to(p.dtype)

    def dice(q: Tensor, u: Tensor) -> Tensor:
        # with v in {0, 1}: sum(v q u), sum(v q^2), sum(v u^2) are the sums of (v q)(v u), (v q)^2, (v u)^2
        return dice_loss(q * v, u * v, reduction="batch", squared=True, smooth=smooth)

    return (dice(1.0 - p, 1.0 - t) + dice(p, t)) / 2.0


class UniMatchLosses(NamedTuple):
    """The loss terms of one UniMatch step (float32 scalars, unweighted) and the confident share.

    ``mask_ratio`` is the share of weak-view pixels whose confidence reaches the threshold (the code's
    ``mask_ratio``), detached.
    """

    total: Tensor
    sup: Tensor
    s1: Tensor
    s2: Tensor
    fp: Tensor
    mask_ratio: Tensor


def unimatch_objective(
    logits_labeled: Tensor,
    y: Tensor,
    logits_weak: Tensor,
    logits_partner: Tensor,
    logits_strong1: Tensor,
    logits_strong2: Tensor,
    logits_fp: Tensor,
    box1: Tensor,
    box2: Tensor,
    *,
    conf_thresh: float = 0.95,
    weight_s1: float = 0.25,
    weight_s2: float = 0.25,
    weight_fp: float = 0.5,
    supervised: UniMatchSupervised = "dice",
    dice: DiceVariant = "soft",
) -> UniMatchLosses:
    """UniMatch's objective ``(L_sup + w_s1 L_s1 + w_s2 L_s2 + w_fp L_fp) / 2`` (medical code).

    The weak view's hard labels and confidences (:func:`pseudo_labels_and_confidence`, detached) supervise
    the feature-perturbed decoding of the weak view (``L_fp``) and, CutMixed with the mixing partners'
    (inside ``box_k`` the partner's label and confidence), strong view ``k`` (``L_sk``); each term is
    :func:`two_class_dice_loss` over the pixels whose confidence is at least ``conf_thresh``. ``L_sup``
    is the library's Dice of the labeled images (``supervised="dice"``) or the code's
    ``(BCE + two-class Dice) / 2`` (``"ce_dice"``).

    Args:
        logits_labeled: Logits of the labeled images.
        y: Their masks, in {0, 1}.
        logits_weak: Logits of the weak (as given) unlabeled images.
        logits_partner: Logits of each unlabeled image's mixing partner (its weak view), aligned with
            ``logits_weak``: row ``i`` is the partner of image ``i``.
        logits_strong1: Logits of the first strong view, CutMixed with ``box1``.
        logits_strong2: Logits of the second strong view, CutMixed with ``box2``.
        logits_fp: Logits of the weak images decoded from dropped-out encoder features.
        box1: CutMix boxes of the first strong view (:func:`cutmix_box`).
        box2: CutMix boxes of the second strong view.
        conf_thresh: Confidence a pseudo label needs to count, in [0, 1].
        weight_s1: Weight of ``L_s1``.
        weight_s2: Weight of ``L_s2``.
        weight_fp: Weight of ``L_fp``.
        supervised: ``"dice"`` or ``"ce_dice"``.
        dice: The library Dice variant of ``supervised="dice"``: ``"soft"`` or ``"authors"``.

    Returns:
        The loss terms, their weighted total and the confident share of the weak view.

    Raises:
        ValueError: On maps that are not (N, 1, H, W) or differ in shape, a threshold outside [0, 1], a
            negative weight or an unknown ``supervised`` or ``dice``.
    """
    if not 0.0 <= conf_thresh <= 1.0:
        raise ValueError(f"`conf_thresh` must be in [0, 1], got {conf_thresh}.")
    for name, weight in (("weight_s1", weight_s1), ("weight_s2", weight_s2), ("weight_fp", weight_fp)):
        if weight < 0:
            raise ValueError(f"`{name}` must be >= 0, got {weight}.")
    if supervised == "dice":
        sup = dice_loss_function(dice)(torch.sigmoid(logits_labeled), y)
    elif supervised == "ce_dice":
        check_map("logits_labeled", logits_labeled)
        check_map("y", y)
        check_same_shape("logits_labeled", logits_labeled, "y", y)
        z = as_float(logits_labeled)
        t = as_float(y).to(z.dtype)
        sup = (F.binary_cross_entropy_with_logits(z, t) + two_class_dice_loss(torch.sigmoid(z), t)) / 2.0
    else:
        raise ValueError(f"`supervised` must be 'dice' or 'ce_dice', got {supervised!r}.")
    for name, logits in (
        ("logits_partner", logits_partner),
        ("logits_strong1", logits_strong1),
        ("logits_strong2", logits_strong2),
        ("logits_fp", logits_fp),
    ):
        check_map(name, logits)
        check_same_shape("logits_weak", logits_weak, name, logits)
    labels_w, conf_w = pseudo_labels_and_confidence(logits_weak)
    labels_p, conf_p = pseudo_labels_and_confidence(logits_partner)

    def term(logits: Tensor, labels: Tensor, confidence: Tensor) -> Tensor:
        return two_class_dice_loss(torch.sigmoid(as_float(logits)), labels, confidence >= conf_thresh)

    s1 = term(logits_strong1, apply_cutmix(labels_w, labels_p, box1), apply_cutmix(conf_w, conf_p, box1))
    s2 = term(logits_strong2, apply_cutmix(labels_w, labels_p, box2), apply_cutmix(conf_w, conf_p, box2))
    fp = term(logits_fp, labels_w, conf_w)
    total = (sup + weight_s1 * s1 + weight_s2 * s2 + weight_fp * fp) / 2.0
    mask_ratio = (conf_w >= conf_thresh).float().mean()
    return UniMatchLosses(total=total, sup=sup, s1=s1, s2=s2, fp=fp, mask_ratio=mask_ratio)
