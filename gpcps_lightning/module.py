"""Deprecated: the modules moved to :mod:`gpcps_lightning.methods` (import them from ``gpcps_lightning``).

Every name this module had still imports from here, with a ``DeprecationWarning`` naming its new place.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports and warns
    from gpcps_lightning.losses.gpcps import GPCPSLosses
    from gpcps_lightning.methods.base import SegmentationModule, _segmentation_metrics  # noqa: F401
    from gpcps_lightning.methods.gpcps import GPCPSModule

__all__ = ["GPCPSLosses", "GPCPSModule", "SegmentationModule"]

_MOVED: dict[str, str] = {
    "GPCPSModule": "gpcps_lightning.methods.gpcps",
    "SegmentationModule": "gpcps_lightning.methods.base",
    "GPCPSLosses": "gpcps_lightning.losses.gpcps",
    "Stage": "gpcps_lightning.methods.base",
    "_batch_images": "gpcps_lightning.methods.base",
    "_segmentation_metrics": "gpcps_lightning.methods.base",
    "_nonfinite_flag": "gpcps_lightning.losses.gpcps",
    "__version__": "gpcps_lightning._version",
    "EvaluationBatch": "gpcps_lightning.batch",
    "PredictionBatch": "gpcps_lightning.batch",
    "SemiSupervisedBatch": "gpcps_lightning.batch",
    "CHECKPOINT_KEY": "gpcps_lightning.checkpointing",
    "capture_rng_state": "gpcps_lightning.checkpointing",
    "read_checkpoint": "gpcps_lightning.checkpointing",
    "restart_after_finished_epoch": "gpcps_lightning.checkpointing",
    "restore_rng_state": "gpcps_lightning.checkpointing",
    "build_network": "gpcps_lightning.networks",
    "authors_background_mask": "gpcps_lightning.losses.gpcps",
    "authors_dice_loss": "gpcps_lightning.losses.dice",
    "background_mask": "gpcps_lightning.losses.gpcps",
    "fuse_images": "gpcps_lightning.losses.gpcps",
    "fused_pseudo_labels": "gpcps_lightning.losses.gpcps",
    "gradient_penalty": "gpcps_lightning.losses.gpcps",
    "input_gradient": "gpcps_lightning.losses.gpcps",
    "penalty_precision_context": "gpcps_lightning.losses.gpcps",
    "sample_eps": "gpcps_lightning.losses.gpcps",
    "soft_dice_loss": "gpcps_lightning.losses.dice",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = _MOVED[name]
    warnings.warn(
        f"gpcps_lightning.module is deprecated: import {name} from {new} instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(new), name)


def __dir__() -> list[str]:
    return sorted(_MOVED)
