"""Data: image/mask folders, Kvasir-SEG, a synthetic polyp dataset, and the semi-supervised datamodules.

See ``docs/data.md``. The datamodules yield :class:`~gpcps_lightning.SemiSupervisedBatch` (training),
:class:`~gpcps_lightning.EvaluationBatch` (validation/test) and :class:`~gpcps_lightning.PredictionBatch`
(prediction), built on the device in ``on_after_batch_transfer``.
"""

from __future__ import annotations

from gpcps_lightning.data.datamodule import FolderDataModule, SemiSupervisedDataModule
from gpcps_lightning.data.datasets import (
    CompactEvaluationBatch,
    CompactPredictionBatch,
    CompactTrainBatch,
    ImageDataset,
    ImageMaskDataset,
    ImageMaskPair,
    SemiSupervisedTrainDataset,
    pair_image_mask_folders,
)
from gpcps_lightning.data.io import IMAGE_EXTENSIONS, binarize_mask, read_image, read_mask
from gpcps_lightning.data.kvasir import KVASIR_SEG_URL, KvasirSEGDataModule, download_kvasir_seg
from gpcps_lightning.data.pseudo import PseudoLabelDataModule
from gpcps_lightning.data.sampler import SemiSupervisedPairSampler, labeled_stream_indices
from gpcps_lightning.data.splits import DataSplit, ratio_split, read_split_file, split_folder
from gpcps_lightning.data.synthetic import SyntheticPolypDataModule, generate_synthetic_polyps
from gpcps_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationAugmentation,
    StrongAugmentation,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "KVASIR_SEG_URL",
    "CompactEvaluationBatch",
    "CompactPredictionBatch",
    "CompactTrainBatch",
    "DataSplit",
    "FolderDataModule",
    "ImageDataset",
    "ImageMaskDataset",
    "ImageMaskPair",
    "KvasirSEGDataModule",
    "PseudoLabelDataModule",
    "SegmentationAugmentation",
    "SemiSupervisedDataModule",
    "SemiSupervisedPairSampler",
    "SemiSupervisedTrainDataset",
    "StrongAugmentation",
    "SyntheticPolypDataModule",
    "binarize_mask",
    "download_kvasir_seg",
    "generate_synthetic_polyps",
    "labeled_stream_indices",
    "pair_image_mask_folders",
    "ratio_split",
    "read_image",
    "read_mask",
    "read_split_file",
    "split_folder",
]
