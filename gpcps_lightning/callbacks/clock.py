"""A training's wall time, carried through its checkpoints so that a resumed run reports all of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L

__all__ = ["TrainingClock"]


class TrainingClock(L.Callback):
    """Count the wall time of ``fit``, and save it in every checkpoint so that resuming adds to it.

    A run interrupted and resumed from a checkpoint reports the time its earlier parts took up to that
    checkpoint (the work after it was lost and is done again) plus the time of this part:
    :attr:`seconds`. Validation inside ``fit`` counts; the time before ``fit`` starts does not.

    Args:
        clock: Wall clock in seconds (tests replace it).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        #: Seconds of earlier parts, read from the checkpoint ``fit`` resumed from; ``None`` when this
        #: ``fit`` restored none (a new run, or a checkpoint written without this callback).
        self.restored_seconds: float | None = None
        self._started: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        # Lightning calls setup before it restores the checkpoint's callback states.
        if stage == "fit":
            self._started = self.clock()
            self.restored_seconds = None

    @property
    def seconds(self) -> float:
        """Wall time so far: the restored earlier parts plus this ``fit``'s (0 before ``fit``)."""
        this_part = 0.0 if self._started is None else self.clock() - self._started
        return (self.restored_seconds or 0.0) + this_part

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.restored_seconds = float(state_dict["seconds"])
