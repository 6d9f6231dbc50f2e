"""Non-finite values during training: stop with a clear error, or skip and count; fp16 scaler skips."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_NET, RandomSemiDataModule, tiny_trainer
from lightning.pytorch.plugins.precision import MixedPrecision

import gpcps_lightning.losses.baselines as baselines_mod
import gpcps_lightning.losses.gpcps as module_mod
from gpcps_lightning import GPCPSModule, MeanTeacherModule


def _fit(module: L.LightningModule, steps: int, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = tiny_trainer(max_steps=steps, **kwargs)
    trainer.fit(module, RandomSemiDataModule(length=16))
    return trainer


def _nan_on_calls(real: Any, calls: set[int]) -> Any:
    count = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        n, count["n"] = count["n"], count["n"] + 1
        return out * math.nan if n in calls else out

    return wrapped


def test_nonfinite_loss_term_stops_with_the_step_and_term(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module_mod, "gradient_penalty", _nan_on_calls(module_mod.gradient_penalty, {1}))
    module = GPCPSModule(**TINY_NET)
    with pytest.raises(FloatingPointError, match=r"training step 1: loss=nan, loss_grad=nan\. Lower the"):
        _fit(module, steps=3)


def test_nonfinite_input_gradient_is_caught_even_when_the_loss_is_finite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an overflow outside the background leaves L_grad finite; the input gradient itself is checked
    monkeypatch.setattr(module_mod, "_nonfinite_flag", lambda g: torch.tensor(math.nan))
    with pytest.raises(FloatingPointError, match="training step 0: penalty input gradient=nan"):
        _fit(GPCPSModule(**TINY_NET), steps=1)


def test_skip_mode_drops_and_counts_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module_mod, "gradient_penalty", _nan_on_calls(module_mod.gradient_penalty, {1}))
    module = GPCPSModule(**TINY_NET, nonfinite="skip")
    updates: list[torch.Tensor] = []
    original_step = module.optimization_step

    def recording(losses: dict[str, torch.Tensor], flag: torch.Tensor | None = None) -> bool:
        before = module.net1.segmentation_head[0].weight.detach().clone()
        stepped = original_step(losses, flag)
        updates.append(torch.equal(before, module.net1.segmentation_head[0].weight))  # unchanged?
        return stepped

    module.optimization_step = recording  # type: ignore[method-assign]
    trainer = _fit(module, steps=3)
    assert updates == [False, True, False, False]  # the second step left the weights as they were
    assert module.skipped_steps.item() == 1
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1
    assert trainer.global_step == 3  # three optimizer steps were still taken


def test_skipped_mean_teacher_step_leaves_the_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines_mod, "consistency_loss", _nan_on_calls(baselines_mod.consistency_loss, {0}))
    module = MeanTeacherModule(**TINY_NET, nonfinite="skip")
    teacher = [p.detach().clone() for p in module.teacher.parameters()]
    _fit(module, steps=1, max_epochs=1, limit_train_batches=1)
    assert module.skipped_steps.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(teacher, module.teacher.parameters(), strict=True))


def test_fp16_scaler_skips_are_counted_and_logged() -> None:
    # a huge initial scale overflows the scaled penalty at first; the scaler halves it until it fits
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    module = GPCPSModule(**TINY_NET)
    trainer = _fit(module, steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    halvings = round(math.log2(2.0**40 / scaler.get_scale()))
    assert halvings >= 1
    assert module.fp16_skipped_steps.item() == halvings
    assert trainer.callback_metrics["train/fp16_skipped_steps"].item() == halvings


def test_bad_nonfinite_option() -> None:
    with pytest.raises(ValueError, match="`nonfinite` must be 'raise' or 'skip'"):
        GPCPSModule(**TINY_NET, nonfinite="ignore")  # type: ignore[arg-type]
