"""Training-step benchmark: ``python -m gpcps_lightning.tools.bench`` (also ``gpcps bench``).

It times the training step of five step kinds on the same pre-made, on-device data, one after the other
in the same run, so that their ratios are comparable:

- ``supervised``: :class:`~gpcps_lightning.GPCPSModule` with ``lambda_semi=0, lambda_grad=0``
  (two networks, ``L_sup`` only);
- ``cps``: ``lambda_grad=0`` (``L_sup + L_semi``: the fused forward pass, no penalty);
- ``gpcps``: the exact method (``L_grad`` every step, second-order gradient);
- ``gpcps_lazy``: ``gp_every_n_steps=k`` (``L_grad`` every k steps with weight ``k * lambda_grad``),
  timed over whole windows of k steps and reported as the mean step of a window (amortized);
- ``plain``: the same GP-CPS loss written as a straightforward PyTorch loop from the pure functions of
  :mod:`gpcps_lightning.losses` with two ``torch.optim.Adam``, no Lightning (the same objective function,
  :func:`~gpcps_lightning.losses.gpcps.gpcps_objective`, around a forward and backward pass written
  independently of the module's).

The Lightning kinds run inside a real :class:`lightning.Trainer`; a callback takes the time at the start
of every training batch (after synchronising the device), so a step is the wall time from one batch start
to the next and includes everything the Trainer does per step (logging included). Each kind reports the
median step after warm-up, images per second (labeled images; each comes with one unlabeled image), FLOPs
per step counted by :class:`torch.utils.flop_counter.FlopCounterMode` (on a warm-up step, so the count does
not disturb the timing), the achieved FLOP/s, and peak memory: the CUDA allocator's peak on a GPU, the
process's peak resident set size on the CPU (each kind then runs in a fresh subprocess so that peaks do not
mix). Ratios to the ``cps`` step (the penalty's overhead) and of ``gpcps`` to ``plain`` (Lightning's
overhead) are taken within each round and their median over rounds is reported, together with the ratio of
the fastest steps (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from gpcps_lightning._utils import code_version
from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.gpcps import (
    fuse_images,
    gpcps_objective,
    input_gradient,
    output_sum,
    penalty_precision_context,
    sample_eps,
)
from gpcps_lightning.methods.gpcps import GPCPSModule
from gpcps_lightning.networks import build_network

__all__ = [
    "STEP_KINDS",
    "BenchConfig",
    "BenchReport",
    "KindResult",
    "count_step_flops",
    "format_report",
    "main",
    "profile_step",
    "run_benchmark",
    "run_kind",
]

#: The step kinds, in the order they run and are reported.
STEP_KINDS: tuple[str, ...] = ("supervised", "cps", "gpcps", "gpcps_lazy", "plain")

_PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "16",
    "16-mixed": "16",
}
_LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
_AUTOCAST_DTYPE = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
# The hyperparameters of the step (GPCPSModule's defaults, METHOD.md), shared by the plain loop.
_LAMBDA_GRAD = 1e-3
_LAMBDA_SEMI = 1.0
_ADAM = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8}
_SEEDS = (1, 2)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark: network, data size, precision and how many steps.

    Args:
        encoder_name: segmentation-models-pytorch encoder (the paper's UNet uses ``"resnet34"``).
        arch: segmentation-models-pytorch architecture.
        network_kwargs: Further ``smp.create_model`` arguments (``encoder_depth``, ``decoder_channels``).
        image_size: Height and width of the square training images.
        batch_size: Labeled images per step (and as many unlabeled ones).
        precision: ``"32"``, ``"bf16"`` or ``"16"`` (Lightning's ``32-true``, ``bf16-mixed``, ``16-mixed``).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        steps: Timed steps per kind (the lazy kind rounds up to whole windows of ``lazy_k`` steps).
        warmup: Untimed steps before the timed ones (after the FLOP-counting steps).
        lazy_k: ``gp_every_n_steps`` of the lazy kind.
        channels_last: Put networks and batches in channels-last memory format.
        cudnn_benchmark: Let cuDNN pick the fastest convolution algorithms (CUDA only).
        seed: Seed of the synthetic batches.
        plain_fused_adam: Give the plain loop PyTorch's fused Adam, as the modules use, instead of the
            default implementation (the straightforward version), to compare like with like.
    """

    encoder_name: str = "resnet34"
    arch: str = "Unet"
    network_kwargs: dict[str, Any] | None = None
    image_size: int = 256
    batch_size: int = 16
    precision: str = "32"
    device: str = "cpu"
    steps: int = 20
    warmup: int = 3
    lazy_k: int = 8
    channels_last: bool = False
    cudnn_benchmark: bool = True
    seed: int = 0
    plain_fused_adam: bool = False

    def checked(self) -> BenchConfig:
        """This configuration with ``precision`` normalised, after checking every field.

        Returns:
            A validated copy.

        Raises:
            ValueError: On a value the benchmark cannot run with; the message names the option.
        """
        precision = _PRECISIONS.get(str(self.precision))
        if precision is None:
            raise ValueError(f"--precision must be one of 32, bf16, 16 (got {self.precision!r}).")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N' (got {self.device!r}).") from err
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N' (got {self.device!r}).")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
        if device.type == "cpu" and precision == "16":
            raise ValueError(
                "--precision 16 (fp16 mixed precision) needs a CUDA device; on the CPU use 32 or bf16."
            )
        depth = int((self.network_kwargs or {}).get("encoder_depth", 5))
        if self.image_size < 2**depth or self.image_size % 2**depth:
            raise ValueError(
                f"--image-size must be a positive multiple of {2**depth} (the encoder downsamples "
                f"{depth} times), got {self.image_size}."
            )
        if self.batch_size < 2:
            raise ValueError(
                f"--batch-size must be at least 2 (BatchNorm in training mode), got {self.batch_size}."
            )
        if self.steps < 3:
            raise ValueError(f"--steps must be at least 3 to give a median, got {self.steps}.")
        if self.warmup < 1:
            raise ValueError(f"--warmup must be at least 1, got {self.warmup}.")
        if self.lazy_k < 1:
            raise ValueError(f"--k must be at least 1, got {self.lazy_k}.")
        return dataclasses.replace(self, precision=precision, device=str(device))

    @property
    def torch_device(self) -> torch.device:
        """The device as a :class:`torch.device`."""
        return torch.device(self.device)

    def network_args(self) -> dict[str, Any]:
        """Network arguments shared by :class:`GPCPSModule` and :func:`build_network`."""
        return {"arch": self.arch, "encoder_name": self.encoder_name, "network_kwargs": self.network_kwargs}


@dataclass
class KindResult:
    """Measurements of one step kind.

    ``median_step_s`` and ``min_step_s`` are over the timed steps. For ``gpcps_lazy`` they are amortized:
    the median over windows of ``lazy_k`` consecutive steps (each holding exactly one penalty step) of the
    window's mean step, and ``(fastest penalty step + (k - 1) * fastest other step) / k``;
    ``penalty_step_s`` / ``no_penalty_step_s`` give the medians of the two step types.
    ``flops_per_step`` is amortized the same way. Peak memory is the CUDA allocator's peak
    (``torch.cuda.max_memory_allocated``) or the process's peak RSS (``memory_measure`` says which);
    ``memory_before_steps_bytes`` is the same measure just before the first step (model, optimizer and
    data in place).
    """

    kind: str
    step_times_s: list[float]
    median_step_s: float
    min_step_s: float
    images_per_s: float
    flops_per_step: float
    achieved_flops_per_s: float
    peak_memory_bytes: int | None
    memory_before_steps_bytes: int | None
    memory_measure: str
    losses: dict[str, float] = field(default_factory=dict)
    losses_finite: bool = True
    penalty_step_s: float | None = None
    no_penalty_step_s: float | None = None


@dataclass
class BenchReport:
    """A benchmark run: configuration, environment, per-round results, summary and ratios."""

    config: dict[str, Any]
    environment: dict[str, Any]
    command: str
    rounds: list[dict[str, KindResult]]
    summary: dict[str, dict[str, Any]]
    ratios: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- helpers
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (Linux), else ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss_bytes() -> int | None:
    """Peak resident set size of this process, else ``None`` where the platform does not say."""
    # /proc's VmHWM is consistent with its VmRSS (getrusage's figure can lag the current RSS).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _GlobalOnlyTracker:
    """Stands in for FlopCounterMode's module tracker, which cannot follow ``torch.autograd.grad``.

    The tracker hooks module inputs with multi-grad hooks; a leaf input such as the fused image of the
    gradient penalty then fails inside ``torch.autograd.grad``. Only the global total is needed here.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnlyTracker:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def _flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnlyTracker()  # type: ignore[assignment]
    return counter


def count_step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), as ``FlopCounterMode`` counts them.

    Only matrix products and convolutions (and the like) count; element-wise work counts 0.

    Args:
        step: Runs one training step (or any computation).

    Returns:
        The total FLOP count.
    """
    counter = _flop_counter()
    with counter:
        step()
    return int(counter.get_total_flops())


def make_batches(config: BenchConfig, count: int = 2) -> list[SemiSupervisedBatch]:
    """Synthetic training batches, already on the benchmark device.

    Each mask holds one random rectangle of foreground (a quarter to a half of each side), so that the
    penalty's background set is a realistic, non-empty part of the image.

    Args:
        config: A checked configuration.
        count: Number of different batches.

    Returns:
        ``count`` batches of ``config.batch_size`` labeled and unlabeled images.
    """
    g = torch.Generator().manual_seed(config.seed)
    n, s = config.batch_size, config.image_size
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    batches = []
    for _ in range(count):
        labeled = torch.randn(n, 3, s, s, generator=g)
        unlabeled = torch.randn(n, 3, s, s, generator=g)
        mask = torch.zeros(n, 1, s, s)
        for i in range(n):
            h, w = (int(v) for v in torch.randint(s // 4, s // 2 + 1, (2,), generator=g))
            top, left = (int(v) for v in torch.randint(0, s - max(h, w) + 1, (2,), generator=g))
            mask[i, :, top : top + h, left : left + w] = 1.0
        labeled = labeled + mask  # foreground is brighter: something to learn
        batches.append(
            SemiSupervisedBatch(
                labeled=labeled.to(config.torch_device).contiguous(memory_format=fmt),
                mask=mask.to(config.torch_device).contiguous(memory_format=fmt),
                unlabeled=unlabeled.to(config.torch_device).contiguous(memory_format=fmt),
            )
        )
    return batches


class _CycleDataset(Dataset):
    """``length`` items cycling through pre-made batches (yielded as they are with ``batch_size=None``)."""

    def __init__(self, batches: Sequence[SemiSupervisedBatch], length: int) -> None:
        self.batches, self.length = list(batches), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SemiSupervisedBatch:
        return self.batches[index % len(self.batches)]


def _identity(item: Any) -> Any:
    return item


def _module_kwargs(kind: str, config: BenchConfig) -> dict[str, Any]:
    if kind == "supervised":
        return {"lambda_grad": 0.0, "lambda_semi": 0.0}
    if kind == "cps":
        return {"lambda_grad": 0.0, "lambda_semi": _LAMBDA_SEMI}
    if kind == "gpcps":
        return {"lambda_grad": _LAMBDA_GRAD, "lambda_semi": _LAMBDA_SEMI}
    if kind == "gpcps_lazy":
        return {"lambda_grad": _LAMBDA_GRAD, "lambda_semi": _LAMBDA_SEMI, "gp_every_n_steps": config.lazy_k}
    raise ValueError(f"Unknown step kind {kind!r}; choose from {', '.join(STEP_KINDS)}.")


def _memory_start(device: torch.device) -> int | None:
    """Reset the CUDA peak (model, optimizer and data stay counted) and return the current figure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return _rss_bytes()


def _memory_peak(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return _peak_rss_bytes(), "process_peak_rss"


def _n_flop_steps(kind: str, config: BenchConfig) -> int:
    # The lazy kind counts one step with the penalty (step 0) and one without (step 1) and amortizes.
    return 2 if kind == "gpcps_lazy" and config.lazy_k > 1 else 1


def _n_timed_steps(kind: str, config: BenchConfig) -> int:
    if kind == "gpcps_lazy":
        return math.ceil(config.steps / config.lazy_k) * config.lazy_k
    return config.steps


def _finish(
    kind: str,
    config: BenchConfig,
    starts: Sequence[float],
    flops: Sequence[int],
    memory_before: int | None,
    losses: dict[str, float],
) -> KindResult:
    """Turn batch start times (one more than the steps) and FLOP counts into a :class:`KindResult`."""
    first = _n_flop_steps(kind, config) + config.warmup
    timed = _n_timed_steps(kind, config)
    times = [starts[i + 1] - starts[i] for i in range(first, first + timed)]
    penalty_s: float | None = None
    no_penalty_s: float | None = None
    if kind == "gpcps_lazy":
        k = config.lazy_k
        windows = [statistics.fmean(times[j : j + k]) for j in range(0, timed, k)]
        median = statistics.median(windows)
        # Global step `first + i` has the penalty when it is a multiple of k.
        with_penalty = [t for i, t in enumerate(times) if (first + i) % k == 0]
        without = [t for i, t in enumerate(times) if (first + i) % k != 0]
        penalty_s = statistics.median(with_penalty)
        no_penalty_s = statistics.median(without) if without else None
        # Amortized from the fastest step of each type, comparable with the other kinds' fastest step.
        best = (min(with_penalty) + (k - 1) * min(without)) / k if without else min(with_penalty)
        step_flops = flops[0] if k == 1 else (flops[0] + (k - 1) * flops[1]) / k
    else:
        median, best = statistics.median(times), min(times)
        step_flops = float(flops[0])
    peak, measure = _memory_peak(torch.device(config.device))
    return KindResult(
        kind=kind,
        step_times_s=times,
        median_step_s=median,
        min_step_s=best,
        images_per_s=config.batch_size / median,
        flops_per_step=float(step_flops),
        achieved_flops_per_s=float(step_flops) / median,
        peak_memory_bytes=peak,
        memory_before_steps_bytes=memory_before,
        memory_measure=measure,
        losses=losses,
        losses_finite=all(math.isfinite(v) for v in losses.values()),
        penalty_step_s=penalty_s,
        no_penalty_step_s=no_penalty_s,
    )


# --------------------------------------------------------------------------------------------- Lightning
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
        _synchronize(self.device)
        self.memory_before = _memory_start(self.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(self.device)
        self.starts.append(time.perf_counter())
        if len(self.starts) <= self.n_flop_steps:
            self._counter = _flop_counter()
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops.append(int(self._counter.get_total_flops()))
            self._counter = None


def _trainer(config: BenchConfig, max_steps: int, callbacks: list[Callback]) -> L.Trainer:
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


def _lightning_module(kind: str, config: BenchConfig) -> GPCPSModule:
    module = GPCPSModule(seeds=_SEEDS, **_module_kwargs(kind, config), **config.network_args())
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _run_lightning(kind: str, config: BenchConfig, batches: Sequence[SemiSupervisedBatch]) -> KindResult:
    n_flop = _n_flop_steps(kind, config)
    total = n_flop + config.warmup + _n_timed_steps(kind, config) + 1  # the last step only closes the timing
    recorder = _StepRecorder(config.torch_device, n_flop)
    trainer = _trainer(config, total, [recorder])
    loader = DataLoader(_CycleDataset(batches, total), batch_size=None, collate_fn=_identity)
    trainer.fit(_lightning_module(kind, config), train_dataloaders=loader)
    losses = {
        name.removeprefix("train/"): float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("train/")
    }
    return _finish(kind, config, recorder.starts, recorder.flops, recorder.memory_before, losses)


# --------------------------------------------------------------------------------------------- plain loop
class _PlainGPCPS:
    """GP-CPS written the straightforward way: two networks, two Adams, the pure loss functions.

    With ``penalty=False`` it is the CPS step (``L_sup + L_semi``), used for the profile's phase timing.
    ``phase_times`` (optional) receives the wall time of each phase (device synchronised).
    """

    def __init__(self, config: BenchConfig, penalty: bool = True) -> None:
        self.device = config.torch_device
        self.penalty = penalty
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format
        self.net1 = (
            build_network(seed=_SEEDS[0], **config.network_args()).to(self.device).to(memory_format=fmt)
        )
        self.net2 = (
            build_network(seed=_SEEDS[1], **config.network_args()).to(self.device).to(memory_format=fmt)
        )
        self.net1.train()
        self.net2.train()
        fused = True if config.plain_fused_adam else None
        self.opt1 = torch.optim.Adam(self.net1.parameters(), **_ADAM, fused=fused)  # type: ignore[arg-type]
        self.opt2 = torch.optim.Adam(self.net2.parameters(), **_ADAM, fused=fused)  # type: ignore[arg-type]
        self.dtype = _AUTOCAST_DTYPE[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "16" else None

    def _mark(self, phase_times: dict[str, list[float]] | None, name: str, since: float) -> float:
        if phase_times is None:
            return since
        _synchronize(self.device)
        now = time.perf_counter()
        phase_times.setdefault(name, []).append(now - since)
        return now

    def step(
        self, batch: SemiSupervisedBatch, phase_times: dict[str, list[float]] | None = None
    ) -> dict[str, Tensor]:
        """One training step; returns the detached loss terms.

        The forward passes, the input gradient and the backward pass are written out here; the loss is
        the library's :func:`~gpcps_lightning.losses.gpcps.gpcps_objective`, given the input gradient.
        """
        t = time.perf_counter()
        labeled, y, unlabeled = batch.labeled, batch.mask, batch.unlabeled
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            p1_labeled = torch.sigmoid(self.net1(labeled))
            p2_labeled = torch.sigmoid(self.net2(labeled))
            eps = sample_eps(labeled.shape[0], device=labeled.device)
            fused = fuse_images(labeled, unlabeled, eps)
            if self.penalty:
                fused.requires_grad_(True)
            with penalty_precision_context(self.device.type, self.penalty):
                p1 = torch.sigmoid(self.net1(fused))
                p2 = torch.sigmoid(self.net2(fused))
            t = self._mark(phase_times, "forward", t)
            grad = None
            if self.penalty:
                grad = input_gradient(output_sum(p1, p2), fused)
                t = self._mark(phase_times, "input_gradient", t)
            losses = gpcps_objective(
                p1_labeled,
                p2_labeled,
                y,
                p1,
                p2,
                eps,
                input_grad=grad,
                lambda_semi=_LAMBDA_SEMI,
                lambda_grad=_LAMBDA_GRAD if self.penalty else 0.0,
            )
            t = self._mark(phase_times, "losses", t)
        self.opt1.zero_grad(set_to_none=True)
        self.opt2.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(losses.total).backward()
            t = self._mark(phase_times, "final_backward", t)
            self.scaler.step(self.opt1)
            self.scaler.step(self.opt2)
            self.scaler.update()
        else:
            losses.total.backward()
            t = self._mark(phase_times, "final_backward", t)
            self.opt1.step()
            self.opt2.step()
        self._mark(phase_times, "optimizer", t)
        return {
            "loss": losses.total.detach(),
            "loss_sup": losses.sup.detach(),
            "loss_semi": losses.semi.detach(),
            "loss_grad": losses.penalty.detach(),
        }


def _run_plain(config: BenchConfig, batches: Sequence[SemiSupervisedBatch]) -> KindResult:
    device = config.torch_device
    loop = _PlainGPCPS(config)
    memory_before = _memory_start(device)
    total = 1 + config.warmup + config.steps + 1
    starts: list[float] = []
    flops: list[int] = []
    out: dict[str, Tensor] = {}
    for i in range(total):
        batch = batches[i % len(batches)]
        _synchronize(device)
        starts.append(time.perf_counter())
        if i == 0:
            flops.append(count_step_flops(functools.partial(loop.step, batch)))
        else:
            out = loop.step(batch)
    losses = {name: float(value) for name, value in out.items()}
    return _finish("plain", config, starts, flops, memory_before, losses)


# --------------------------------------------------------------------------------------------- running
def run_kind(kind: str, config: BenchConfig) -> KindResult:
    """Benchmark one step kind in this process.

    Args:
        kind: One of :data:`STEP_KINDS`.
        config: The configuration (checked here).

    Returns:
        The measurements.

    Raises:
        ValueError: On an unknown kind or a bad configuration.
    """
    config = config.checked()
    if kind not in STEP_KINDS:
        raise ValueError(f"Unknown step kind {kind!r}; choose from {', '.join(STEP_KINDS)}.")
    device = config.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    batches = make_batches(config)
    try:
        with warnings.catch_warnings():
            # Lightning's advice about dataloader workers and the like does not apply to on-device data.
            warnings.simplefilter("ignore")
            if kind == "plain":
                return _run_plain(config, batches)
            return _run_lightning(kind, config, batches)
    finally:
        del batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _run_kind_isolated(kind: str, config: BenchConfig, threads: int | None) -> KindResult:
    """Run one kind in a fresh Python process (so that its peak RSS is its own)."""
    with tempfile.TemporaryDirectory(prefix="gpcps-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "gpcps_lightning.tools.bench",
            "--worker",
            kind,
            "--worker-config",
            json.dumps(dataclasses.asdict(config)),
            "--worker-out",
            str(out),
        ]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        # The worker must import this very copy of the package.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"The benchmark worker for step kind {kind!r} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}"
            )
        return KindResult(**json.loads(out.read_text()))


def _git_commit() -> str | None:
    commit = code_version()["commit"]
    return None if commit == "unknown" else commit


def _environment(config: BenchConfig) -> dict[str, Any]:
    import segmentation_models_pytorch as smp

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = config.torch_device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "segmentation_models_pytorch": smp.__version__,
        "commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _ratio(rounds: list[dict[str, KindResult]], num: str, den: str) -> dict[str, Any] | None:
    pairs = [(r[num], r[den]) for r in rounds if num in r and den in r]
    if not pairs:
        return None
    per_round = [a.median_step_s / b.median_step_s for a, b in pairs]
    # The fastest steps are the least disturbed by other load on the machine: a second estimate.
    of_min = min(a.min_step_s for a, _ in pairs) / min(b.min_step_s for _, b in pairs)
    return {"median": statistics.median(per_round), "per_round": per_round, "of_min_steps": of_min}


def run_benchmark(
    config: BenchConfig,
    kinds: Sequence[str] = STEP_KINDS,
    rounds: int = 1,
    isolate: bool | None = None,
    threads: int | None = None,
    command: str = "",
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Benchmark the given step kinds, ``rounds`` times in rotation, and summarise.

    Args:
        config: The configuration (checked here).
        kinds: Step kinds, a subset of :data:`STEP_KINDS`.
        rounds: How many times to run every kind; ratios are taken within a round, then their median.
        isolate: Run each kind in a fresh subprocess; ``None``: on the CPU only (where peak RSS needs it;
            on CUDA the allocator's peak is reset per kind instead).
        threads: ``torch.set_num_threads`` for the runs (``None``: PyTorch's default).
        command: The command line, recorded in the report.
        progress: Called with a line of text after each kind.

    Returns:
        The report.

    Raises:
        ValueError: On a bad configuration, an unknown or repeated kind, or ``rounds < 1``.
    """
    config = config.checked()
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in STEP_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"--kinds must be distinct names from {', '.join(STEP_KINDS)}, got {kinds}.")
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}.")
    if isolate is None:
        isolate = config.torch_device.type == "cpu"
    if threads is not None:
        torch.set_num_threads(threads)
    environment = _environment(config)
    all_rounds: list[dict[str, KindResult]] = []
    for r in range(rounds):
        results: dict[str, KindResult] = {}
        for kind in kinds:
            results[kind] = _run_kind_isolated(kind, config, threads) if isolate else run_kind(kind, config)
            if progress is not None:
                progress(f"round {r + 1}/{rounds} {kind}: {1e3 * results[kind].median_step_s:.1f} ms/step")
        all_rounds.append(results)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        runs = [r[kind] for r in all_rounds]
        median = statistics.median(x.median_step_s for x in runs)
        peaks = [x.peak_memory_bytes for x in runs if x.peak_memory_bytes is not None]
        summary[kind] = {
            "median_step_s": median,
            "min_step_s": min(x.min_step_s for x in runs),
            "images_per_s": config.batch_size / median,
            "flops_per_step": runs[0].flops_per_step,
            "achieved_flops_per_s": runs[0].flops_per_step / median,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "memory_before_steps_bytes": runs[0].memory_before_steps_bytes,
            "memory_measure": runs[0].memory_measure,
            "losses_finite": all(x.losses_finite for x in runs),
        }
        if kind == "gpcps_lazy":
            summary[kind]["penalty_step_s"] = statistics.median(x.penalty_step_s or math.nan for x in runs)
            no_penalty = [x.no_penalty_step_s for x in runs if x.no_penalty_step_s is not None]
            summary[kind]["no_penalty_step_s"] = statistics.median(no_penalty) if no_penalty else None
    ratios = {
        name: value
        for name, value in {
            "gpcps_over_cps": _ratio(all_rounds, "gpcps", "cps"),
            "gpcps_lazy_over_cps": _ratio(all_rounds, "gpcps_lazy", "cps"),
            "gpcps_over_plain": _ratio(all_rounds, "gpcps", "plain"),
            "cps_over_supervised": _ratio(all_rounds, "cps", "supervised"),
        }.items()
        if value is not None
    }
    if "gpcps" in summary and "cps" in summary:
        ratios["gpcps_over_cps_flops"] = {
            "median": summary["gpcps"]["flops_per_step"] / summary["cps"]["flops_per_step"]
        }
    return BenchReport(
        config=dataclasses.asdict(config),
        environment=environment,
        command=command,
        rounds=all_rounds,
        summary=summary,
        ratios=ratios,
    )


def format_report(report: BenchReport) -> str:
    """The report as a readable text table with the ratios below it."""
    c = report.config
    env = report.environment
    lines = [
        f"{c['arch']}/{c['encoder_name']} {c['image_size']}px batch {c['batch_size']} "
        f"precision {c['precision']} on {c['device']} ({env['device']}, {env['torch_threads']} threads), "
        f"{c['steps']} timed steps after {c['warmup']} warm-up, k={c['lazy_k']}, "
        f"rounds={len(report.rounds)}, channels_last={c['channels_last']}, commit {env['commit']}",
    ]
    header = (
        f"{'kind':<12} {'median ms':>10} {'min ms':>9} {'img/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} "
        f"{'peak MiB':>9} {'before MiB':>10}"
    )
    lines += [header, "-" * len(header)]
    for kind, s in report.summary.items():
        peak, before = (
            "n/a" if b is None else f"{b / 2**20:.0f}"
            for b in (s["peak_memory_bytes"], s["memory_before_steps_bytes"])
        )
        lines.append(
            f"{kind:<12} {1e3 * s['median_step_s']:>10.1f} {1e3 * s['min_step_s']:>9.1f} "
            f"{s['images_per_s']:>8.2f} {s['flops_per_step'] / 1e9:>11.2f} "
            f"{s['achieved_flops_per_s'] / 1e9:>9.1f} {peak:>9} {before:>10}"
        )
    first = next(iter(report.summary.values()))
    lines.append(f"(peak memory: {first['memory_measure']}; before: the same just before the first step)")
    lazy = report.summary.get("gpcps_lazy")
    if lazy is not None:
        no_pen = lazy.get("no_penalty_step_s")
        other = "" if no_pen is None else f", other steps {1e3 * no_pen:.1f} ms"
        lines.append(
            f"gpcps_lazy: amortized over k={c['lazy_k']} steps; "
            f"penalty step {1e3 * lazy['penalty_step_s']:.1f} ms{other}"
        )
    labels = {
        "gpcps_over_cps": "penalty overhead, gpcps / cps step",
        "gpcps_lazy_over_cps": "lazy penalty, gpcps_lazy / cps step",
        "gpcps_over_plain": "Lightning overhead, gpcps / plain step",
        "cps_over_supervised": "cps / supervised step",
        "gpcps_over_cps_flops": "FLOP ratio gpcps / cps",
    }
    for name, value in report.ratios.items():
        per_round = value.get("per_round")
        detail = (
            ""
            if per_round is None or len(per_round) < 2
            else " (rounds: " + ", ".join(f"{x:.3f}" for x in per_round) + ")"
        )
        of_min = "" if "of_min_steps" not in value else f", of the fastest steps {value['of_min_steps']:.3f}"
        lines.append(f"{labels[name]:<40} {value['median']:.3f}{of_min}{detail}")
    bad = [k for k, s in report.summary.items() if not s["losses_finite"]]
    if bad:
        lines.append(f"WARNING: non-finite losses in {', '.join(bad)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- profile
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
    trainer = _trainer(config, total, [window])
    loader = DataLoader(_CycleDataset(batches, total), batch_size=None, collate_fn=_identity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_lightning_module(kind, config), train_dataloaders=loader)
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
        loop = _PlainGPCPS(config, penalty=penalty)
        times: dict[str, list[float]] = {}
        for i in range(config.warmup + config.steps):
            loop.step(batches[i % len(batches)], phase_times=times if i >= config.warmup else None)
        phases[name] = {phase: statistics.median(v) for phase, v in times.items()}
        phases[name]["step"] = sum(phases[name].values())
    (out / "phases.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), "phases_s": phases}, indent=2)
    )
    return phases


# --------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpcps bench",
        description=(
            "Time training steps of the supervised, CPS, GP-CPS (exact and lazy) and plain-PyTorch GP-CPS "
            "steps on synthetic on-device data. Defaults are the paper's size (resnet34 UNet, 256 px, "
            "batch 16), meant for a GPU; on a CPU try --encoder resnet18 --image-size 64 --batch-size 4."
        ),
    )
    p.add_argument("--encoder", default="resnet34", help="smp encoder name (default: resnet34).")
    p.add_argument("--arch", default="Unet", help="smp architecture (default: Unet).")
    p.add_argument(
        "--network-kwargs",
        type=json.loads,
        default=None,
        help="Further smp.create_model arguments as JSON, e.g. '{\"encoder_depth\": 3}'.",
    )
    p.add_argument("--image-size", type=int, default=256, help="Square image size in pixels (default: 256).")
    p.add_argument(
        "--batch-size", type=int, default=16, help="Labeled (and unlabeled) images per step (default: 16)."
    )
    p.add_argument("--precision", default="32", help="32, bf16 or 16 (fp16, CUDA only) (default: 32).")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)."
    )
    p.add_argument("--steps", type=int, default=20, help="Timed steps per kind (default: 20).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed warm-up steps per kind (default: 3).")
    p.add_argument("--k", type=int, default=8, help="gp_every_n_steps of the lazy kind (default: 8).")
    p.add_argument(
        "--kinds",
        default=",".join(STEP_KINDS),
        help=f"Comma-separated step kinds (default: {','.join(STEP_KINDS)}).",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="Run all kinds this many times in rotation (default: 1)."
    )
    p.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Each kind in a fresh subprocess: auto = on the CPU only (peak RSS per kind) (default: auto).",
    )
    p.add_argument("--channels-last", action="store_true", help="Channels-last networks and batches.")
    p.add_argument(
        "--no-cudnn-benchmark", action="store_true", help="Do not let cuDNN autotune convolutions (CUDA)."
    )
    p.add_argument(
        "--plain-fused-adam",
        action="store_true",
        help="Fused Adam in the plain loop, as in the modules (default: PyTorch's default Adam).",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data (default: 0).")
    p.add_argument("--json", default=None, metavar="PATH", help="Also write the full report as JSON here.")
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="Instead of benchmarking, profile the --profile-kind step and time the plain step's phases.",
    )
    p.add_argument("--profile-kind", default="gpcps", help="Lightning step kind to profile (default: gpcps).")
    p.add_argument("--quiet", action="store_true", help="No progress lines.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gpcps_lightning.tools.bench`` / ``gpcps bench``.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad option values (unparsable options exit with status 2
        through argparse's ``SystemExit``).
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.threads is not None:
        if args.threads < 1:
            print(f"gpcps bench: error: --threads must be at least 1, got {args.threads}.", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        config = BenchConfig(**json.loads(args.worker_config))
        result = run_kind(args.worker, config)
        Path(args.worker_out).write_text(json.dumps(dataclasses.asdict(result)))
        return 0
    config = BenchConfig(
        encoder_name=args.encoder,
        arch=args.arch,
        network_kwargs=args.network_kwargs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        steps=args.steps,
        warmup=args.warmup,
        lazy_k=args.k,
        channels_last=args.channels_last,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        seed=args.seed,
        plain_fused_adam=args.plain_fused_adam,
    )
    try:
        config = config.checked()
        if args.profile is not None:
            phases = profile_step(config, args.profile, kind=args.profile_kind)
            for name, values in phases.items():
                print(name + ": " + ", ".join(f"{phase} {1e3 * t:.1f} ms" for phase, t in values.items()))
            print(f"operator table and trace written to {args.profile}")
            return 0
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        isolate = {"auto": None, "yes": True, "no": False}[args.isolate]
        report = run_benchmark(
            config,
            kinds,
            rounds=args.rounds,
            isolate=isolate,
            threads=args.threads,
            command="python -m gpcps_lightning.tools.bench " + " ".join(args_list),
            progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as err:
        print(f"gpcps bench: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
