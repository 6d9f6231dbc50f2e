"""Pipelines: methods that are several trainings, with their artefacts on disk between them.

A layer above :mod:`gpcps_lightning.methods`, :mod:`~gpcps_lightning.data`, :mod:`~gpcps_lightning.inference`
and :mod:`~gpcps_lightning.callbacks`, which it uses; below the command line, and nothing below imports it.

- :mod:`~gpcps_lightning.pipelines.stpp`: ST++ (Yang et al., CVPR 2022), six resumable stages
  (:func:`run_stpp`; each stage is a function of its own).
"""

from __future__ import annotations

from gpcps_lightning.pipelines.stpp import (
    STAGES,
    StageOutput,
    StageResult,
    STPPConfig,
    STPPOptions,
    STPPResult,
    foreground_iou,
    pseudo_label_stage,
    reliability_scores,
    reliability_stage,
    retrain_stage,
    run_stpp,
    select_reliable,
    supervised_stage,
)

__all__ = [
    "STAGES",
    "STPPConfig",
    "STPPOptions",
    "STPPResult",
    "StageOutput",
    "StageResult",
    "foreground_iou",
    "pseudo_label_stage",
    "reliability_scores",
    "reliability_stage",
    "retrain_stage",
    "run_stpp",
    "select_reliable",
    "supervised_stage",
]
