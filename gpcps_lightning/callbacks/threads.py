"""Counting the data-loader workers in the CPU thread policy by their measured use."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from gpcps_lightning.threads import THREADS_ENV, child_cpu_seconds, policy_overridden, threads_after_workers

__all__ = ["LoaderWorkerThreads"]


class LoaderWorkerThreads(L.Callback):
    """Once, early in training, take from PyTorch the cores the data-loader workers are seen to use.

    The thread policy (:mod:`gpcps_lightning.threads`) gives PyTorch the cores other processes leave
    free when a run starts, before its loader workers exist. Between training steps ``start_step`` and
    ``start_step + window_steps`` this callback measures the CPU time of the run's child processes (the
    workers) per second of wall time, and if they use a whole core or more, lowers PyTorch's threads by
    that many (at least one thread stays), saying so once. It never raises the threads, and does
    nothing when ``GPCPS_NUM_THREADS`` or ``OMP_NUM_THREADS`` sets them, or where ``/proc`` is missing.
    ``gpcps fit`` adds it on the CPU when the datamodule has loader workers.

    Args:
        start_step: The training step at which the measurement starts (the workers have filled their
            queues by then).
        window_steps: Steps measured.
        reader: CPU seconds of the child processes so far (tests replace it).
        clock: Wall clock in seconds (tests replace it).
    """

    def __init__(
        self,
        start_step: int = 10,
        window_steps: int = 20,
        reader: Callable[[], float | None] = child_cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start_step < 0 or window_steps < 1:
            raise ValueError(
                f"`start_step` must be >= 0 and `window_steps` >= 1, got {start_step} and {window_steps}."
            )
        self.start_step = start_step
        self.window_steps = window_steps
        self.reader = reader
        self.clock = clock
        self.worker_cores: float | None = None
        self.window_start: tuple[int, float, float] | None = None
        self.finished = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.finished = policy_overridden()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if self.finished:
            return
        step = trainer.global_step
        if self.window_start is None:
            if step >= self.start_step:
                cpu = self.reader()
                if cpu is None:
                    self.finished = True
                else:
                    self.window_start = (step, self.clock(), cpu)
            return
        first, began, cpu_before = self.window_start
        if step < first + self.window_steps:
            return
        self.finished = True
        cpu, wall = self.reader(), self.clock() - began
        if cpu is None or wall <= 0:
            return
        self.worker_cores = (cpu - cpu_before) / wall
        threads = torch.get_num_threads()
        fewer = threads_after_workers(threads, self.worker_cores)
        if fewer < threads:
            torch.set_num_threads(fewer)
            print(
                f"gpcps: the data-loader workers used {self.worker_cores:.1f} cores over steps "
                f"{first}-{step}: PyTorch now uses {fewer} CPU thread(s) instead of {threads}; set "
                f"{THREADS_ENV} to choose (docs/performance.md).",
                flush=True,
            )
