"""Deprecated alias of :mod:`gpcps_lightning.tools.report`."""

from __future__ import annotations

from typing import Any

from gpcps_lightning._utils import moved_attribute


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, "gpcps_lightning.tools.report", name)
