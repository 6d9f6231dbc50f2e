"""Deprecated alias of :mod:`gpcps_lightning.tools.bench`."""

from __future__ import annotations

from typing import Any

from gpcps_lightning._utils import moved_attribute


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, "gpcps_lightning.tools.bench", name)


if __name__ == "__main__":  # ``python -m gpcps_lightning.bench`` keeps working
    import runpy

    runpy.run_module("gpcps_lightning.tools.bench", run_name="__main__", alter_sys=True)
