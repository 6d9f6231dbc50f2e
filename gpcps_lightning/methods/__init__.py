"""The methods as LightningModules: each file holds a method's forward passes and one objective call.

- :mod:`~gpcps_lightning.methods.base`: :class:`SegmentationModule`, the hooks and the training-step template.
- :mod:`~gpcps_lightning.methods.step`: the manual optimisation step (precision, scaler, non-finite policy).
- :mod:`~gpcps_lightning.methods.gpcps`, ``supervised``, ``cps``, ``mean_teacher``, ``gct``, ``psmt``,
  ``unimatch``: the methods.
"""

from __future__ import annotations

from gpcps_lightning.methods.base import SegmentationModule, TwoNetworkModule
from gpcps_lightning.methods.cps import CPSModule
from gpcps_lightning.methods.gct import GCTModule
from gpcps_lightning.methods.gpcps import GPCPSModule
from gpcps_lightning.methods.mean_teacher import MeanTeacherModule
from gpcps_lightning.methods.psmt import PSMTModule
from gpcps_lightning.methods.step import ManualStepModule
from gpcps_lightning.methods.supervised import SupervisedModule
from gpcps_lightning.methods.unimatch import UniMatchModule

__all__ = [
    "CPSModule",
    "GCTModule",
    "GPCPSModule",
    "ManualStepModule",
    "MeanTeacherModule",
    "PSMTModule",
    "SegmentationModule",
    "SupervisedModule",
    "TwoNetworkModule",
    "UniMatchModule",
]
