"""Using a trained module: segment images, export a head, evaluate checkpoints on other folders.

- :mod:`~gpcps_lightning.inference.predict`: :class:`Segmenter` (in-memory images, masks at each image's
  original size), :class:`Preprocessing` and :func:`load_module`, shared by the other two.
- :mod:`~gpcps_lightning.inference.export`: TorchScript and ONNX export (``gpcps export``).
- :mod:`~gpcps_lightning.inference.evaluate`: per-image scores on image/mask folders (``gpcps evaluate``).
- :mod:`~gpcps_lightning.inference.tta`: test-time augmentation (scales and flips), as ST++ pseudo-labels.
"""

from __future__ import annotations

from gpcps_lightning.inference.evaluate import (
    EvaluationReport,
    FolderEvaluation,
    ImageScore,
    evaluate_checkpoints,
    evaluate_module,
)
from gpcps_lightning.inference.export import ExportedHead, export_onnx, export_torchscript
from gpcps_lightning.inference.predict import Preprocessing, Segmenter, load_module
from gpcps_lightning.inference.tta import TTA_SCALES, tta_probabilities

__all__ = [
    "TTA_SCALES",
    "EvaluationReport",
    "ExportedHead",
    "FolderEvaluation",
    "ImageScore",
    "Preprocessing",
    "Segmenter",
    "evaluate_checkpoints",
    "evaluate_module",
    "export_onnx",
    "export_torchscript",
    "load_module",
    "tta_probabilities",
]
