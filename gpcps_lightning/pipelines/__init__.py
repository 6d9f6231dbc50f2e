"""Pipelines: methods that are several trainings, with their artefacts on disk between them.

A layer above :mod:`gpcps_lightning.methods`, :mod:`~gpcps_lightning.data`, :mod:`~gpcps_lightning.inference`
and :mod:`~gpcps_lightning.callbacks`, which it uses; below the command line, and nothing below imports it.

- :mod:`~gpcps_lightning.pipelines.stpp`: ST++ (Yang et al., CVPR 2022), six resumable stages
  (:func:`run_stpp`, and :func:`stpp_run` for the reproduction runner).
"""

from __future__ import annotations

from gpcps_lightning.pipelines.stpp import (
    STAGES,
    StageResult,
    STPPConfig,
    STPPOptions,
    STPPResult,
    foreground_iou,
    reliability_scores,
    run_stpp,
    select_reliable,
    stpp_run,
)

__all__ = [
    "STAGES",
    "STPPConfig",
    "STPPOptions",
    "STPPResult",
    "StageResult",
    "foreground_iou",
    "reliability_scores",
    "run_stpp",
    "select_reliable",
    "stpp_run",
]
