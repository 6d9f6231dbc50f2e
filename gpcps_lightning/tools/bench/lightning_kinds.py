"""The Lightning step kinds: :class:`~gpcps_lightning.GPCPSModule` in a real :class:`lightning.Trainer`.

A callback takes the time at the start of every training batch, so a step includes everything the Trainer
does per step (logging included).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.methods.gpcps import GPCPSModule
from gpcps_lightning.tools.bench.batches import CycleDataset, identity
from gpcps_lightning.tools.bench.config import (
    ALL_KINDS,
    LAMBDA_GRAD,
    LAMBDA_SEMI,
    METHOD_KINDS,
    SEEDS,
    BenchConfig,
)
from gpcps_lightning.tools.bench.measure import (
    KindResult,
    flop_counter,
    kind_result,
    memory_start,
    n_flop_steps,
    n_timed_steps,
    synchronize,
)

_LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def _module_kwargs(kind: str, config: BenchConfig) -> dict[str, Any]:
    if kind == "supervised":
        return {"lambda_grad": 0.0, "lambda_semi": 0.0}
    if kind == "cps":
        return {"lambda_grad": 0.0, "lambda_semi": LAMBDA_SEMI}
    if kind == "gpcps":
        return {"lambda_grad": LAMBDA_GRAD, "lambda_semi": LAMBDA_SEMI}
    if kind == "gpcps_lazy":
        return {"lambda_grad": LAMBDA_GRAD, "lambda_semi": LAMBDA_SEMI, "gp_every_n_steps": config.lazy_k}
    raise ValueError(f"Unknown step kind {kind!r}; choose from {', '.join(ALL_KINDS)}.")


class _StepRecorder(Callback):
    """Takes the time at every training-batch start and counts FLOPs of the first steps."""

    def __init__(self, device: torch.device, n_flop_steps: int) -> None:
        self.device = device
        self.n_flop_steps = n_flop_steps
        self.starts: list[float] = []
        self.flops: list[int] = []
        self.memory_before: int | None = None
        self._counter: FlopCounterMode | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.memory_before = memory_start(self.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        synchronize(self.device)
        self.starts.append(time.perf_counter())
        if len(self.starts) <= self.n_flop_steps:
            self._counter = flop_counter()
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops.append(int(self._counter.get_total_flops()))
            self._counter = None


def make_trainer(config: BenchConfig, max_steps: int, callbacks: list[Callback]) -> L.Trainer:
    """A bare Trainer for ``max_steps`` training steps: no logger, checkpoints, validation or progress bar."""
    device = config.torch_device
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=_LIGHTNING_PRECISION[config.precision],  # type: ignore[arg-type]
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=config.cudnn_benchmark if device.type == "cuda" else None,
        callbacks=callbacks,
    )


def _method_module(kind: str, config: BenchConfig) -> SegmentationModule:
    """Another method's module with its shipped defaults (``METHOD_KINDS``)."""
    import gpcps_lightning

    cls = {
        "mean_teacher": gpcps_lightning.MeanTeacherModule,
        "gct": gpcps_lightning.GCTModule,
        "psmt": gpcps_lightning.PSMTModule,
        "unimatch": gpcps_lightning.UniMatchModule,
    }[kind]
    args: dict[str, Any] = {"seeds": SEEDS} if kind == "gct" else {"network_seed": SEEDS[0]}
    if kind == "psmt":
        args["warmup_steps"] = 0  # time PS-MT's own step, not its supervised warm-up
    return cls(**args, **config.network_args())


def lightning_module(kind: str, config: BenchConfig) -> SegmentationModule:
    """The module a Lightning step kind trains (GP-CPS with the kind's settings, or another method's)."""
    if kind in METHOD_KINDS:
        module = _method_module(kind, config)
    else:
        module = GPCPSModule(seeds=SEEDS, **_module_kwargs(kind, config), **config.network_args())
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def run_lightning(kind: str, config: BenchConfig, batches: Sequence[SemiSupervisedBatch]) -> KindResult:
    """Time a Lightning step kind in a real Trainer on ``batches``, cycled."""
    n_flop = n_flop_steps(kind, config)
    total = n_flop + config.warmup + n_timed_steps(kind, config) + 1  # the last step only closes the timing
    recorder = _StepRecorder(config.torch_device, n_flop)
    trainer = make_trainer(config, total, [recorder])
    loader = DataLoader(CycleDataset(batches, total), batch_size=None, collate_fn=identity)
    trainer.fit(lightning_module(kind, config), train_dataloaders=loader)
    losses = {
        name.removeprefix("train/"): float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("train/")
    }
    return kind_result(kind, config, recorder.starts, recorder.flops, recorder.memory_before, losses)
