"""Deprecated: the baselines moved to :mod:`gpcps_lightning.methods` and :mod:`gpcps_lightning.losses`.

The modules import from ``gpcps_lightning`` (``SupervisedModule``, ``CPSModule``, ``MeanTeacherModule``),
their losses and helpers from :mod:`gpcps_lightning.losses.baselines`. Every name this module had still
imports from here, with a ``DeprecationWarning`` naming its new place.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports and warns
    from gpcps_lightning.losses.baselines import (
        CPSLosses,
        MeanTeacherLosses,
        SupervisedLosses,
        add_gaussian_noise,
        ema_decay_at,
        ema_update,
    )
    from gpcps_lightning.methods.cps import CPSModule
    from gpcps_lightning.methods.mean_teacher import MeanTeacherModule
    from gpcps_lightning.methods.supervised import SupervisedModule

__all__ = [
    "CPSLosses",
    "CPSModule",
    "MeanTeacherLosses",
    "MeanTeacherModule",
    "SupervisedLosses",
    "SupervisedModule",
    "add_gaussian_noise",
    "ema_decay_at",
    "ema_update",
]

_MOVED: dict[str, tuple[str, str]] = {
    "CPSModule": ("gpcps_lightning.methods.cps", "CPSModule"),
    "MeanTeacherModule": ("gpcps_lightning.methods.mean_teacher", "MeanTeacherModule"),
    "SupervisedModule": ("gpcps_lightning.methods.supervised", "SupervisedModule"),
    "CPSLosses": ("gpcps_lightning.losses.baselines", "CPSLosses"),
    "MeanTeacherLosses": ("gpcps_lightning.losses.baselines", "MeanTeacherLosses"),
    "SupervisedLosses": ("gpcps_lightning.losses.baselines", "SupervisedLosses"),
    "add_gaussian_noise": ("gpcps_lightning.losses.baselines", "add_gaussian_noise"),
    "ema_decay_at": ("gpcps_lightning.losses.baselines", "ema_decay_at"),
    "ema_update": ("gpcps_lightning.losses.baselines", "ema_update"),
    "consistency_loss": ("gpcps_lightning.losses.baselines", "consistency_loss"),
    "cps_loss": ("gpcps_lightning.losses.baselines", "cps_loss"),
    "sigmoid_rampup": ("gpcps_lightning.losses.baselines", "sigmoid_rampup"),
    "authors_dice_loss": ("gpcps_lightning.losses.dice", "authors_dice_loss"),
    "soft_dice_loss": ("gpcps_lightning.losses.dice", "soft_dice_loss"),
    "DiceVariant": ("gpcps_lightning.losses.dice", "DiceVariant"),
    "_dice_function": ("gpcps_lightning.losses.dice", "dice_loss_function"),
    "SegmentationModule": ("gpcps_lightning.methods.base", "SegmentationModule"),
    "SemiSupervisedBatch": ("gpcps_lightning.batch", "SemiSupervisedBatch"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new_name = _MOVED[name]
    warnings.warn(
        f"gpcps_lightning.baselines is deprecated: import {new_name} from {module} instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new_name)


def __dir__() -> list[str]:
    return sorted(_MOVED)
