"""gpcps_lightning: GP-CPS semi-supervised segmentation for PyTorch Lightning."""

from __future__ import annotations

from gpcps_lightning._version import __version__
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.data import FolderDataModule, KvasirSEGDataModule, SyntheticPolypDataModule
from gpcps_lightning.methods import (
    CPSModule,
    GCTModule,
    GPCPSModule,
    MeanTeacherModule,
    SegmentationModule,
    SupervisedModule,
)
from gpcps_lightning.predict import Segmenter

__all__ = [
    "CPSModule",
    "EvaluationBatch",
    "FolderDataModule",
    "GCTModule",
    "GPCPSModule",
    "KvasirSEGDataModule",
    "MeanTeacherModule",
    "PredictionBatch",
    "SegmentationModule",
    "Segmenter",
    "SemiSupervisedBatch",
    "SupervisedModule",
    "SyntheticPolypDataModule",
    "__version__",
]
