"""The losses of GP-CPS and of the baselines, as pure functions of tensors (no Lightning).

- :mod:`~gpcps_lightning.losses.dice`: the soft Dice loss and its variants.
- :mod:`~gpcps_lightning.losses.gpcps`: GP-CPS's equations (docs/method.md, Eq. 1-17) and
  :func:`~gpcps_lightning.losses.gpcps.gpcps_objective`, the whole of Eq. 17.
- :mod:`~gpcps_lightning.losses.baselines`: CPS and Mean Teacher (docs/baselines.md).
- :mod:`~gpcps_lightning.losses.psmt`, :mod:`~gpcps_lightning.losses.unimatch`: PS-MT and UniMatch
  (docs/baselines.md). Their CutMix helpers differ (each follows its official code), so
  ``apply_cutmix`` is imported from the method's own module.

Every name is importable from ``gpcps_lightning.losses`` as well.
"""

from __future__ import annotations

from gpcps_lightning.losses.baselines import (
    CPSLosses,
    MeanTeacherLosses,
    SupervisedLosses,
    add_gaussian_noise,
    consistency_loss,
    cps_loss,
    cps_objective,
    ema_decay_at,
    ema_update,
    hard_pseudo_labels,
    mean_teacher_objective,
    sigmoid_rampup,
    supervised_objective,
)
from gpcps_lightning.losses.dice import (
    DiceReduction,
    DiceVariant,
    authors_dice_loss,
    dice_loss,
    dice_loss_function,
    dice_loss_with_ignore,
    soft_dice_loss,
)
from gpcps_lightning.losses.gpcps import (
    BackgroundVariant,
    EpsMode,
    GPCPSLosses,
    authors_background_mask,
    background_mask,
    fuse_images,
    fused_pseudo_labels,
    gpcps_objective,
    gradient_penalty,
    input_gradient,
    output_sum,
    penalty_precision_context,
    sample_eps,
    semi_supervised_loss,
    supervised_loss,
    total_loss,
)
from gpcps_lightning.losses.psmt import (
    CutMixBoxes,
    PSMTLosses,
    active_teacher,
    bernoulli_kl_with_logits,
    confidence_weighted_ce,
    cosine_rampup,
    cutmix_boxes,
    draw_cutmix,
    psmt_objective,
    teacher_target,
    vat_perturbation,
)
from gpcps_lightning.losses.unimatch import (
    UniMatchLosses,
    UniMatchSupervised,
    cutmix_box,
    pseudo_labels_and_confidence,
    two_class_dice_loss,
    unimatch_objective,
)

__all__ = [
    "BackgroundVariant",
    "CPSLosses",
    "CutMixBoxes",
    "DiceReduction",
    "DiceVariant",
    "EpsMode",
    "GPCPSLosses",
    "MeanTeacherLosses",
    "PSMTLosses",
    "SupervisedLosses",
    "UniMatchLosses",
    "UniMatchSupervised",
    "active_teacher",
    "add_gaussian_noise",
    "authors_background_mask",
    "authors_dice_loss",
    "background_mask",
    "bernoulli_kl_with_logits",
    "confidence_weighted_ce",
    "consistency_loss",
    "cosine_rampup",
    "cps_loss",
    "cps_objective",
    "cutmix_box",
    "cutmix_boxes",
    "dice_loss",
    "dice_loss_function",
    "dice_loss_with_ignore",
    "draw_cutmix",
    "ema_decay_at",
    "ema_update",
    "fuse_images",
    "fused_pseudo_labels",
    "gpcps_objective",
    "gradient_penalty",
    "hard_pseudo_labels",
    "input_gradient",
    "mean_teacher_objective",
    "output_sum",
    "penalty_precision_context",
    "pseudo_labels_and_confidence",
    "psmt_objective",
    "sample_eps",
    "semi_supervised_loss",
    "sigmoid_rampup",
    "soft_dice_loss",
    "supervised_loss",
    "supervised_objective",
    "teacher_target",
    "total_loss",
    "two_class_dice_loss",
    "unimatch_objective",
    "vat_perturbation",
]
