"""gpcps_lightning: GP-CPS semi-supervised segmentation for PyTorch Lightning."""

from __future__ import annotations

from gpcps_lightning._version import __version__
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.data import FolderDataModule, KvasirSEGDataModule, SyntheticPolypDataModule
from gpcps_lightning.inference.predict import Segmenter
from gpcps_lightning.methods import (
    CPSModule,
    GCTModule,
    GPCPSModule,
    MeanTeacherModule,
    PSMTModule,
    SegmentationModule,
    SupervisedModule,
    UniMatchModule,
)

__all__ = [
    "CPSModule",
    "EvaluationBatch",
    "FolderDataModule",
    "GCTModule",
    "GPCPSModule",
    "KvasirSEGDataModule",
    "MeanTeacherModule",
    "PSMTModule",
    "PredictionBatch",
    "SegmentationModule",
    "Segmenter",
    "SemiSupervisedBatch",
    "SupervisedModule",
    "SyntheticPolypDataModule",
    "UniMatchModule",
    "__version__",
]
