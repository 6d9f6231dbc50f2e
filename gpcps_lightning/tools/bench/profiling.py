"""``--profile``: a :mod:`torch.profiler` table and trace of a Lightning step, and the plain step's phases."""

from __future__ import annotations

import dataclasses
import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from gpcps_lightning.tools.bench.batches import CycleDataset, identity, make_batches
from gpcps_lightning.tools.bench.config import STEP_KINDS, BenchConfig
from gpcps_lightning.tools.bench.lightning_kinds import lightning_module, make_trainer
from gpcps_lightning.tools.bench.plain import PlainGPCPS

__all__ = ["profile_step"]


class _ProfileWindow(Callback):
    """Profiles training steps ``start`` to ``start + count - 1`` with :mod:`torch.profiler`."""

    def __init__(self, start: int, count: int, activities: list[torch.profiler.ProfilerActivity]) -> None:
        self.start, self.count, self.activities = start, count, activities
        self.step = 0
        self.profiler: torch.profiler.profile | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.step == self.start:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.__enter__()
        elif self.step == self.start + self.count and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        self.step += 1


def profile_step(
    config: BenchConfig, out_dir: str | Path, kind: str = "gpcps", steps: int = 3
) -> dict[str, Any]:
    """Profile a Lightning step kind with :mod:`torch.profiler` and time the phases of the plain step.

    Writes ``<kind>_ops.txt`` (the operator table of ``steps`` Lightning steps after warm-up, sorted by
    self time), ``<kind>_trace.json`` (a Chrome trace) and ``phases.json`` (median wall time per phase of
    the plain loop with and without the penalty: forward passes and losses, the ``create_graph`` input
    gradient, the final backward, the optimizer steps; the device is synchronised between phases).

    Args:
        config: The configuration (checked here).
        out_dir: Folder for the files (created).
        kind: Lightning step kind to profile.
        steps: Profiled steps.

    Returns:
        The phase timings (also in ``phases.json``).

    Raises:
        ValueError: On a bad configuration or kind.
    """
    config = config.checked()
    if kind not in STEP_KINDS or kind == "plain":
        raise ValueError(f"--profile-kind must be a Lightning step kind, got {kind!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = config.torch_device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    batches = make_batches(config)
    window = _ProfileWindow(config.warmup + 1, steps, activities)
    total = config.warmup + 1 + steps + 1
    trainer = make_trainer(config, total, [window])
    loader = DataLoader(CycleDataset(batches, total), batch_size=None, collate_fn=identity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lightning_module(kind, config), train_dataloaders=loader)
    if window.profiler is None:
        raise RuntimeError("The profiler did not start; the Trainer ran fewer steps than expected.")
    averages = window.profiler.key_averages()
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        # PyTorch 2.4 renamed the CUDA column.
        sort = (
            "self_device_time_total"
            if hasattr(averages[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
    (out / f"{kind}_ops.txt").write_text(averages.table(sort_by=sort, row_limit=40))
    window.profiler.export_chrome_trace(str(out / f"{kind}_trace.json"))

    phases: dict[str, Any] = {}
    for name, penalty in (("cps", False), ("gpcps", True)):
        loop = PlainGPCPS(config, penalty=penalty)
        times: dict[str, list[float]] = {}
        for i in range(config.warmup + config.steps):
            loop.step(batches[i % len(batches)], phase_times=times if i >= config.warmup else None)
        phases[name] = {phase: statistics.median(v) for phase, v in times.items()}
        phases[name]["step"] = sum(phases[name].values())
    (out / "phases.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), "phases_s": phases}, indent=2)
    )
    return phases
