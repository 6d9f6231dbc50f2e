"""Schedules stated for a reference run length and scaled to the length of the run that uses them.

The baselines' official schedules are counted in epochs; the library states them in steps of the paper's
protocol (100 epochs of 50 steps: 5000 steps). A 1000-step run that keeps those step counts spends a
quarter of itself in PS-MT's warm-up and three quarters in GCT's ramp, so its schedule has another shape.
With ``schedule_reference_steps=R`` a method reads its lengths as lengths in a run of ``R`` steps, and a
run of ``T`` steps uses each length times ``T / R`` (rounded; a non-zero length stays at least 1) and
each moving-average decay ``d`` as ``d ** (R / T)``, which keeps the horizon ``1 / (1 - d)`` the same
fraction of the run. The functions are pure; :class:`ScheduleMixin` wires them into a module.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["ScheduleMixin", "check_reference_steps", "run_length", "scale_decay", "scale_steps"]

#: Warm-up plus ramp above this fraction of a run draws a warning.
SCHEDULE_WARNING_FRACTION = 0.5


def check_reference_steps(reference_steps: int | None) -> int | None:
    """``schedule_reference_steps``, checked: ``None`` or a positive integer.

    Raises:
        ValueError: Otherwise.
    """
    if reference_steps is not None and (isinstance(reference_steps, bool) or reference_steps < 1):
        raise ValueError(
            f"`schedule_reference_steps` must be a positive number of steps or None, got {reference_steps}."
        )
    return reference_steps


def scale_steps(steps: int, reference_steps: int | None, run_steps: int | None) -> int:
    """A schedule length of ``steps`` in a run of ``reference_steps``, for a run of ``run_steps``.

    ``round(steps * run_steps / reference_steps)``, at least 1 unless ``steps`` is 0; ``steps`` itself
    when either length is ``None`` (no scaling asked, or no run length known).
    """
    if reference_steps is None or run_steps is None or steps == 0:
        return steps
    return max(1, round(steps * run_steps / reference_steps))


def scale_decay(decay: float, reference_steps: int | None, run_steps: int | None) -> float:
    """A moving-average decay per step in a run of ``reference_steps``, for a run of ``run_steps``.

    ``decay ** (reference_steps / run_steps)``: after the same fraction of either run, a past state keeps
    the same weight. ``decay`` itself when either length is ``None``.
    """
    if reference_steps is None or run_steps is None:
        return decay
    return float(decay ** (reference_steps / run_steps))


def run_length(trainer: Any) -> int | None:
    """Optimizer steps the trainer's fit will run: ``max_steps``, else Lightning's estimate if finite."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else None


class ScheduleMixin:
    """Schedule lengths read through the run's length, for a :class:`~lightning.LightningModule`.

    A method lists the attributes holding lengths in steps (``schedule_step_options``) and decays per step
    (``schedule_decay_options``), sets ``self.schedule_reference_steps``, and reads them with
    :meth:`schedule_steps` / :meth:`schedule_decay`. ``run_steps`` (the run's length) is set when
    ``Trainer.fit`` starts; outside a fit it is ``None`` and lengths are used as given unless it is set by
    hand. ``schedule_span_options`` (warm-up and ramp) draws a warning when their sum exceeds half the run.
    """

    schedule_step_options: tuple[str, ...] = ()
    schedule_decay_options: tuple[str, ...] = ()
    schedule_span_options: tuple[str, ...] = ()
    schedule_reference_steps: int | None = None
    run_steps: int | None = None

    def schedule_steps(self, name: str) -> int:
        """The length option ``name`` in steps of this run."""
        return scale_steps(int(getattr(self, name)), self.schedule_reference_steps, self.run_steps)

    def schedule_decay(self, name: str) -> float | None:
        """The decay option ``name`` per step of this run (``None`` stays ``None``)."""
        value = getattr(self, name)
        return None if value is None else scale_decay(value, self.schedule_reference_steps, self.run_steps)

    def resolved_schedule(self) -> dict[str, Any]:
        """Every schedule option as this run uses it, with the run length and the reference length."""
        out: dict[str, Any] = {name: self.schedule_steps(name) for name in self.schedule_step_options}
        out.update({name: self.schedule_decay(name) for name in self.schedule_decay_options})
        out["run_steps"] = self.run_steps
        out["schedule_reference_steps"] = self.schedule_reference_steps
        return out

    def on_fit_start(self) -> None:
        """Read the run's length from the trainer, then check the schedule against it."""
        super_hook = getattr(super(), "on_fit_start", None)
        if callable(super_hook):
            super_hook()
        trainer = self.trainer  # type: ignore[attr-defined]
        self.run_steps = run_length(trainer)
        if self.run_steps is None and self.schedule_reference_steps is not None:
            raise ValueError(
                "`schedule_reference_steps` scales the schedule to the run's length, but this run has no "
                "finite length: set the Trainer's max_steps (or max_epochs), or set "
                "schedule_reference_steps to None to use the lengths in steps as given."
            )
        self.warn_long_schedule()

    def warn_long_schedule(self) -> None:
        """Warn when warm-up plus ramp take more than half of the run (only once the length is known)."""
        if self.run_steps is None or not self.schedule_span_options:
            return
        span = sum(self.schedule_steps(name) for name in self.schedule_span_options)
        if span > SCHEDULE_WARNING_FRACTION * self.run_steps:
            names = " + ".join(f"`{name}`" for name in self.schedule_span_options)
            rank_zero_warn(
                f"{type(self).__name__}: {names} take {span} of this run's {self.run_steps} steps "
                f"({span / self.run_steps:.0%}), so the method runs at full strength for less than half of "
                "it. Shorten them, or set `schedule_reference_steps` to the run length they were chosen "
                "for (the shipped configs use 5000) so that they scale with the run."
            )
