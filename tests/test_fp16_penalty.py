"""fp16 mixed precision: the gradient penalty must train the networks as it does in fp32.

Under fp16 the second backward pass of the penalty underflows (each element of G's graph receives about
lambda_grad / |B|), so these tests compare the penalty's parameter gradient under fp16 autocast with
fp32, and check that a skipped fp16 step is reported as skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_NET, RandomSemiDataModule
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

import gpcps_lightning.methods.mean_teacher as baselines_mod
from gpcps_lightning import GPCPSModule, MeanTeacherModule
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.testing import fp16_penalty_agreement

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAMBDA_GRAD = 1e-3


def _conv_net(seed: int, batchnorm: bool) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = [3, 8, 8]
    for c_in, c_out in itertools.pairwise(channels):
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU())
    layers.append(nn.Conv2d(channels[-1], 1, 3, padding=1))
    return nn.Sequential(*layers)


def _module(network: str, monkeypatch: pytest.MonkeyPatch) -> GPCPSModule:
    if network != "smp":
        batchnorm = network == "conv_bn"
        monkeypatch.setattr(GPCPSModule, "make_network", lambda self, seed: _conv_net(seed, batchnorm))
    return GPCPSModule(**TINY_NET, lambda_grad=LAMBDA_GRAD)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", ["conv", "conv_bn", "smp"])
def test_fp16_penalty_parameter_gradient_matches_fp32(
    network: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _module(network, monkeypatch)
    agreement = fp16_penalty_agreement(module, device)
    assert agreement["fp32_norm"] > 0  # the penalty has a gradient to compare with
    assert agreement["finite"]
    assert agreement["cosine"] > 0.99, agreement
    assert agreement["relative_norm_error"] < 0.05, agreement


def _weights(module: L.LightningModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in module.parameters()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_fp16_penalty_changes_the_training_update(
    device: str, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    # Same initialisation, data and fusion draws: the update differs only by the penalty's gradient,
    # which fp16 used to drop (the two runs then ended bit-identical).
    results = {}
    for lambda_grad in (0.0, LAMBDA_GRAD):
        L.seed_everything(0, verbose=False)
        module = GPCPSModule(**TINY_NET, lambda_grad=lambda_grad, gradient_clip_val=None)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
        fp16 = MixedPrecision("16-mixed", device, scaler=scaler)
        tiny_trainer(accelerator=device, max_steps=2, plugins=[fp16]).fit(module, RandomSemiDataModule())
        assert module.fp16_skipped_steps.item() == 0
        results[lambda_grad] = _weights(module)
    assert torch.isfinite(results[LAMBDA_GRAD]).all()
    assert not torch.equal(results[0.0], results[LAMBDA_GRAD])


@pytest.mark.slow
def test_fp16_skipped_step_is_reported_and_mean_teacher_keeps_its_teacher(
    monkeypatch: pytest.MonkeyPatch, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    returned: list[bool] = []
    real_step = SegmentationModule.optimization_step

    def recording_step(self: SegmentationModule, *args: Any, **kwargs: Any) -> bool:
        stepped = real_step(self, *args, **kwargs)
        returned.append(stepped)
        return stepped

    monkeypatch.setattr(SegmentationModule, "optimization_step", recording_step)
    ema_calls: list[int] = []
    real_ema = baselines_mod.ema_update
    monkeypatch.setattr(baselines_mod, "ema_update", lambda *a, **k: ema_calls.append(1) or real_ema(*a, **k))
    L.seed_everything(0, verbose=False)
    module = MeanTeacherModule(**TINY_NET)
    # An absurd initial scale overflows the first steps; the scaler divides it by 2^30 at each overflow.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-30)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    tiny_trainer(max_steps=4, plugins=[fp16]).fit(module, RandomSemiDataModule())
    skipped = int(module.fp16_skipped_steps.item())
    assert 0 < skipped < 4  # some steps skipped, some not: both branches are exercised
    assert returned == [False] * skipped + [True] * (4 - skipped)
    assert len(ema_calls) == 4 - skipped
