"""The baseline: GP-CPS as a plain PyTorch loop, written independently of the Lightning module.

Only the objective is shared (:func:`~gpcps_lightning.losses.gpcps.gpcps_objective`); the forward passes,
the input gradient, the backward pass and the two ``torch.optim.Adam`` are written out here, so that the
``gpcps / plain`` ratio measures what Lightning and the module add.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.gpcps import (
    fuse_images,
    gpcps_objective,
    input_gradient,
    output_sum,
    penalty_precision_context,
    sample_eps,
)
from gpcps_lightning.networks import build_network
from gpcps_lightning.tools.bench.config import ADAM, LAMBDA_GRAD, LAMBDA_SEMI, SEEDS, BenchConfig
from gpcps_lightning.tools.bench.measure import (
    KindResult,
    count_step_flops,
    kind_result,
    memory_start,
    synchronize,
)

_AUTOCAST_DTYPE = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class PlainGPCPS:
    """GP-CPS written the straightforward way: two networks, two Adams, the pure loss functions.

    With ``penalty=False`` it is the CPS step (``L_sup + L_semi``), used for the profile's phase timing.
    ``phase_times`` (optional) receives the wall time of each phase (device synchronised).
    """

    def __init__(self, config: BenchConfig, penalty: bool = True) -> None:
        self.device = config.torch_device
        self.penalty = penalty
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format
        self.net1 = (
            build_network(seed=SEEDS[0], **config.network_args()).to(self.device).to(memory_format=fmt)
        )
        self.net2 = (
            build_network(seed=SEEDS[1], **config.network_args()).to(self.device).to(memory_format=fmt)
        )
        self.net1.train()
        self.net2.train()
        fused = True if config.plain_fused_adam else None
        self.opt1 = torch.optim.Adam(self.net1.parameters(), **ADAM, fused=fused)  # type: ignore[arg-type]
        self.opt2 = torch.optim.Adam(self.net2.parameters(), **ADAM, fused=fused)  # type: ignore[arg-type]
        self.dtype = _AUTOCAST_DTYPE[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "16" else None

    def _mark(self, phase_times: dict[str, list[float]] | None, name: str, since: float) -> float:
        if phase_times is None:
            return since
        synchronize(self.device)
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
                lambda_semi=LAMBDA_SEMI,
                lambda_grad=LAMBDA_GRAD if self.penalty else 0.0,
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


def run_plain(config: BenchConfig, batches: Sequence[SemiSupervisedBatch]) -> KindResult:
    """Time the ``plain`` kind: :class:`PlainGPCPS` on ``batches``, cycled."""
    device = config.torch_device
    loop = PlainGPCPS(config)
    memory_before = memory_start(device)
    total = 1 + config.warmup + config.steps + 1
    starts: list[float] = []
    flops: list[int] = []
    out: dict[str, Tensor] = {}
    for i in range(total):
        batch = batches[i % len(batches)]
        synchronize(device)
        starts.append(time.perf_counter())
        if i == 0:
            flops.append(count_step_flops(functools.partial(loop.step, batch)))
        else:
            out = loop.step(batch)
    losses = {name: float(value) for name, value in out.items()}
    return kind_result("plain", config, starts, flops, memory_before, losses)
