"""The losses of GP-CPS and of the baselines, as pure functions of tensors (no Lightning).

- :mod:`~gpcps_lightning.losses.dice`: the soft Dice loss and its variants.
- :mod:`~gpcps_lightning.losses.gpcps`: GP-CPS's equations (docs/method.md, Eq. 1-17) and
  :func:`~gpcps_lightning.losses.gpcps.gpcps_objective`, the whole of Eq. 17.
- :mod:`~gpcps_lightning.losses.baselines`: CPS and Mean Teacher (docs/baselines.md).
- :mod:`~gpcps_lightning.losses.gct`: GCT's flaw maps, targets and objective.

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
    soft_dice_loss,
)
from gpcps_lightning.losses.gct import (
    GCTLosses,
    GCTMode,
    blur_kernel_size,
    dynamic_consistency_loss,
    dynamic_consistency_targets,
    flaw_correction_loss,
    flaw_detector_loss,
    flaw_detector_target,
    gaussian_blur,
    gaussian_kernel1d,
    gct_objective,
    postprocess_flaw_map,
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

__all__ = [
    "BackgroundVariant",
    "CPSLosses",
    "DiceReduction",
    "DiceVariant",
    "EpsMode",
    "GCTLosses",
    "GCTMode",
    "GPCPSLosses",
    "MeanTeacherLosses",
    "SupervisedLosses",
    "add_gaussian_noise",
    "authors_background_mask",
    "authors_dice_loss",
    "background_mask",
    "blur_kernel_size",
    "consistency_loss",
    "cps_loss",
    "cps_objective",
    "dice_loss",
    "dice_loss_function",
    "dynamic_consistency_loss",
    "dynamic_consistency_targets",
    "ema_decay_at",
    "ema_update",
    "flaw_correction_loss",
    "flaw_detector_loss",
    "flaw_detector_target",
    "fuse_images",
    "fused_pseudo_labels",
    "gaussian_blur",
    "gaussian_kernel1d",
    "gct_objective",
    "gpcps_objective",
    "gradient_penalty",
    "hard_pseudo_labels",
    "input_gradient",
    "mean_teacher_objective",
    "output_sum",
    "penalty_precision_context",
    "postprocess_flaw_map",
    "sample_eps",
    "semi_supervised_loss",
    "sigmoid_rampup",
    "soft_dice_loss",
    "supervised_loss",
    "supervised_objective",
    "total_loss",
]
