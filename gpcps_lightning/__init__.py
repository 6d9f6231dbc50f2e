"""gpcps_lightning: GP-CPS semi-supervised segmentation for PyTorch Lightning."""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from gpcps_lightning.baselines import CPSModule, MeanTeacherModule, SupervisedModule
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.module import GPCPSModule, SegmentationModule
from gpcps_lightning.predict import Segmenter

__all__ = [
    "CPSModule",
    "EvaluationBatch",
    "GPCPSModule",
    "MeanTeacherModule",
    "PredictionBatch",
    "SegmentationModule",
    "Segmenter",
    "SemiSupervisedBatch",
    "SupervisedModule",
    "__version__",
]
