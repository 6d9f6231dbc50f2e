"""Schedules stated for a reference run length and scaled to the run (gpcps_lightning.methods.schedule)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest

from gpcps_lightning import GCTModule, MeanTeacherModule, PSMTModule
from gpcps_lightning.losses import cosine_rampup, warmed_decay
from gpcps_lightning.methods.schedule import check_reference_steps, scale_decay, scale_steps
from tests.conftest import TINY_NET, RandomSemiDataModule


def _net(**extra: Any) -> dict[str, Any]:
    return {**{k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_NET.items()}, **extra}


def test_scale_steps_hand_worked() -> None:
    # PS-MT's 5000-step schedule in a 1000-step run: a fifth of each length
    assert scale_steps(250, 5000, 1000) == 50
    assert scale_steps(600, 5000, 1000) == 120
    assert scale_steps(750, 5000, 2000) == 300
    assert scale_steps(50, 5000, 20000) == 200
    # a non-zero length stays at least one step; zero stays zero
    assert scale_steps(1, 5000, 1000) == 1
    assert scale_steps(0, 5000, 1000) == 0
    # no reference or no run length: as given
    assert scale_steps(250, None, 1000) == 250
    assert scale_steps(250, 5000, None) == 250


def test_scale_decay_keeps_the_horizon_a_fraction_of_the_run() -> None:
    assert scale_decay(0.996, 5000, 1000) == pytest.approx(0.996**5)
    assert scale_decay(0.99, 1000, 2000) == pytest.approx(math.sqrt(0.99))
    assert scale_decay(0.996, None, 1000) == 0.996
    # after a fifth of either run, the state at its start keeps the same weight
    assert scale_decay(0.996, 5000, 1000) ** 200 == pytest.approx(0.996**1000)


def test_warmed_decay_hand_worked() -> None:
    assert [warmed_decay(n, 0.9) for n in range(4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])
    assert warmed_decay(100, 0.9) == 0.9
    for updates, decay in ((-1, 0.9), (0, 1.5)):
        with pytest.raises(ValueError, match=r"updates|decay"):
            warmed_decay(updates, decay)


@pytest.mark.parametrize("value", [0, -5, True])
def test_reference_steps_must_be_positive(value: Any) -> None:
    with pytest.raises(ValueError, match="schedule_reference_steps"):
        check_reference_steps(value)
    with pytest.raises(ValueError, match="schedule_reference_steps"):
        PSMTModule(**_net(schedule_reference_steps=value))


def _fit(module: L.LightningModule, steps: int, tiny_trainer: Callable[..., L.Trainer]) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = tiny_trainer(max_steps=steps)
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=8))
    return trainer


def test_psmt_schedule_scales_to_the_run(tiny_trainer: Callable[..., L.Trainer]) -> None:
    # stated for a 100-step run; this run has 10: warm-up 2, ramp 2, switch every 2
    module = PSMTModule(
        **_net(warmup_steps=20, rampup_steps=20, teacher_switch_every=20, schedule_reference_steps=100)
    )
    _fit(module, 10, tiny_trainer)
    assert module.resolved_schedule() == {
        "warmup_steps": 2,
        "rampup_steps": 2,
        "teacher_switch_every": 2,
        "ema_decay": pytest.approx(0.996**10),
        "run_steps": 10,
        "schedule_reference_steps": 100,
    }
    # steps 2-9 average: teacher 1 after 2, 3, 6, 7; teacher 2 after 4, 5, 8, 9 (unscaled: still warming up)
    assert module.ema_updates.tolist() == [4, 4]
    assert module.ramp_at(1) == 0.0 and module.ramp_at(3) == pytest.approx(cosine_rampup(1, 2))
    # without a reference the same lengths are steps: the whole run is warm-up
    unscaled = PSMTModule(**_net(warmup_steps=20, rampup_steps=20, teacher_switch_every=20))
    with pytest.warns(UserWarning, match="warmup_steps"):
        _fit(unscaled, 10, tiny_trainer)
    assert unscaled.ema_updates.tolist() == [0, 0]
    assert unscaled.resolved_schedule()["warmup_steps"] == 20


def test_a_schedule_longer_than_half_the_run_warns_naming_the_options(
    tiny_trainer: Callable[..., L.Trainer],
) -> None:
    module = MeanTeacherModule(**_net(rampup_steps=6))
    with pytest.warns(UserWarning, match=r"`rampup_steps` take 6 of this run's 10 steps.*schedule_reference"):
        _fit(module, 10, tiny_trainer)


def test_gct_and_mean_teacher_ramps_scale_with_the_run() -> None:
    gct = GCTModule(**_net(rampup_steps=750, schedule_reference_steps=5000))
    gct.run_steps = 1000  # what Trainer.fit sets
    assert gct.resolved_schedule()["rampup_steps"] == 150
    assert gct.dc_weight_at(150) == pytest.approx(gct.dc_weight)
    assert gct.dc_weight_at(75) == pytest.approx(gct.dc_weight * math.exp(-5 * 0.25))
    mt = MeanTeacherModule(
        **_net(rampup_steps=1250, ema_decay=0.99, ema_decay_after_rampup=0.999, schedule_reference_steps=5000)
    )
    mt.run_steps = 1000
    assert mt.consistency_weight_at(125) == pytest.approx(mt.consistency_weight * math.exp(-5 * 0.25))
    assert mt.ema_decay_at(0) == pytest.approx(0.99**5)
    assert mt.ema_decay_at(250) == pytest.approx(0.999**5)
    # outside a fit the run length is unknown and the lengths are used as given
    mt.run_steps = None
    assert mt.ema_decay_at(250) == pytest.approx(0.99)


def test_shipped_configs_scale_their_schedules() -> None:
    from gpcps_lightning.tools.provenance import load_method_config

    for name in ("psmt", "gct", "mean_teacher"):
        assert load_method_config(name).init_args["schedule_reference_steps"] == 5000, name


def test_lr_factor_hand_worked() -> None:
    from gpcps_lightning.callbacks.lr_schedule import lr_factor

    assert [lr_factor(t, 4) for t in range(5)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0]
    )
    assert lr_factor(3, 4, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 4, "linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, 0)


class _SeenLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_lr_schedule_decays_every_group_along_a_cosine(tiny_trainer: Callable[..., L.Trainer]) -> None:
    from gpcps_lightning.callbacks import LRSchedule

    # GCT's flaw detector has its own learning rate: each group decays from its own
    module = GCTModule(**_net(lr=1e-3, fd_lr=1e-4))
    seen = _SeenLR()
    L.seed_everything(0, verbose=False)
    trainer = tiny_trainer(max_steps=4, callbacks=[LRSchedule("cosine"), seen])
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=8))
    factors = [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2]
    assert seen.lrs == [pytest.approx([1e-3 * f, 1e-3 * f, 1e-4 * f]) for f in factors]
    with pytest.raises(ValueError, match="finite length"):
        tiny_trainer(max_steps=-1, max_epochs=-1, callbacks=[LRSchedule()]).fit(
            GCTModule(**_net()), datamodule=RandomSemiDataModule(size=32, batch_size=2, length=8)
        )
