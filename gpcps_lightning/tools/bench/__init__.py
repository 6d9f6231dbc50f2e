"""Training-step benchmark: ``gpcps bench`` / ``python -m gpcps_lightning.tools.bench``.

It times the :data:`STEP_KINDS` one after the other on the same on-device batches, so that their ratios
are comparable; docs/performance.md describes what is measured and how. The modules:

- :mod:`.config`: :class:`BenchConfig` and the step kinds;
- :mod:`.batches`: the synthetic batches;
- :mod:`.measure`: timing, FLOP counting and peak memory, into a :class:`KindResult`;
- :mod:`.lightning_kinds`: the Lightning kinds in a real Trainer;
- :mod:`.plain`: the plain PyTorch GP-CPS loop the Lightning step is compared with;
- :mod:`.runner`: in process or in a worker subprocess, for some rounds;
- :mod:`.report`: summary, ratios and the text table;
- :mod:`.profiling`: ``--profile``;
- :mod:`.cli`: the command line.
"""

from __future__ import annotations

from gpcps_lightning.tools.bench.batches import make_batches
from gpcps_lightning.tools.bench.cli import main
from gpcps_lightning.tools.bench.config import ALL_KINDS, METHOD_KINDS, STEP_KINDS, BenchConfig
from gpcps_lightning.tools.bench.measure import KindResult, count_step_flops
from gpcps_lightning.tools.bench.profiling import profile_step
from gpcps_lightning.tools.bench.report import BenchReport, format_report
from gpcps_lightning.tools.bench.runner import run_benchmark, run_kind

__all__ = [
    "ALL_KINDS",
    "METHOD_KINDS",
    "STEP_KINDS",
    "BenchConfig",
    "BenchReport",
    "KindResult",
    "count_step_flops",
    "format_report",
    "main",
    "make_batches",
    "profile_step",
    "run_benchmark",
    "run_kind",
]
