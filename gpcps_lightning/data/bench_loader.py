"""Deprecated alias of :mod:`gpcps_lightning.tools.bench_loader`."""

from __future__ import annotations

from typing import Any

from gpcps_lightning._utils import moved_attribute


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, "gpcps_lightning.tools.bench_loader", name)


if __name__ == "__main__":  # ``python -m gpcps_lightning.data.bench_loader`` keeps working
    import runpy

    runpy.run_module("gpcps_lightning.tools.bench_loader", run_name="__main__", alter_sys=True)
