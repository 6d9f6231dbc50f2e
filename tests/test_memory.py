"""Memory stays flat over many training steps: no tensor, and so no (second-order) graph, outlives its step.

The census below registers, through ``torch.autograd.graph.saved_tensors_hooks``, every tensor that autograd
saves during a training step (forward passes, the ``create_graph`` input gradient and the final backward),
holding it only weakly. After each step (sampled at the start of the next batch, when the Trainer is done
with the previous one, after ``gc.collect()``) it counts the registered tensors still alive and all Python
tensor objects. A leaked graph keeps its saved tensors alive; a leaked loss keeps a Python tensor. The counts
are deterministic (no timing, no allocator statistics), so the test is not flaky.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import lightning as L
import pytest
import torch
from conftest import RandomSemiDataModule, tiny_trainer
from lightning.pytorch.callbacks import Callback

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.methods.gpcps import GPCPSModule


class SavedTensorCensus(Callback):
    def __init__(self, full_census_at: tuple[int, ...] = ()) -> None:
        self._refs: dict[int, weakref.ref] = {}
        self._hooks: Any = None
        self.saved_alive: list[int] = []  # registered tensors alive after each step
        self.python_tensors: list[int] = []  # Python tensor objects after the steps in full_census_at
        self.full_census_at = set(full_census_at)  # 1-based step numbers (gc.get_objects is slow)
        # Shapes of the alive registered tensors after each step that are not parameters or buffers.
        self.kept_past_step: list[list[tuple[int, ...]]] = []
        self._steps_started = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._refs[id(t)] = weakref.ref(t)
        return t

    def _sample(self, module: torch.nn.Module) -> None:
        # Without gc.collect(): a graph caught in a reference cycle would also hold memory until the cyclic
        # collector runs, so it counts as kept here.
        persistent = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
        alive = [t for t in (r() for r in self._refs.values()) if t is not None]
        self.saved_alive.append(len(alive))
        self.kept_past_step.append([tuple(t.shape) for t in alive if id(t) not in persistent])
        del alive
        if len(self.saved_alive) in self.full_census_at:
            gc.collect()
            count = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
            self.python_tensors.append(count)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._steps_started > 0:
            self._sample(pl_module)
        self._steps_started += 1
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._hooks.__exit__(None, None, None)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._sample(pl_module)


def _fit(
    module: GPCPSModule, steps: int, precision: str = "32-true", full_census_at: tuple[int, ...] = ()
) -> SavedTensorCensus:
    census = SavedTensorCensus(full_census_at)
    trainer = tiny_trainer(max_steps=steps, precision=precision, callbacks=[census])
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=2 * steps))
    return census


class _LeakyGPCPS(GPCPSModule):
    """Keeps the penalty of an extra forward pass each step: its second-order graph is never freed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kept: list[torch.Tensor] = []

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> torch.Tensor:
        out = super().training_step(batch, batch_idx)
        self.kept.append(self.compute_losses(batch, 0).grad)
        return out


@pytest.mark.parametrize(
    ("precision", "gp_every_n_steps"),
    [
        ("32-true", 1),
        pytest.param("bf16-mixed", 1, marks=pytest.mark.slow),  # 30 steps each
        pytest.param("32-true", 4, marks=pytest.mark.slow),
    ],
)
def test_no_tensor_outlives_its_step(tiny_net: dict[str, Any], precision: str, gp_every_n_steps: int) -> None:
    steps = 30
    torch.manual_seed(0)
    module = GPCPSModule(gp_every_n_steps=gp_every_n_steps, **tiny_net)
    census = _fit(module, steps, precision, full_census_at=(2, 10, 20, 30))
    assert len(census.saved_alive) == steps  # one sample after every step
    for step, kept in enumerate(census.kept_past_step):
        # Only parameters and BatchNorm buffers (saved by reference) survive: no activation, no graph.
        assert kept == [], f"after step {step}: {len(kept)} saved tensors outlived the step: {kept[:5]}"
    assert census.saved_alive == [census.saved_alive[0]] * steps
    # Python tensor objects: flat too (a few of slack for Lightning's bookkeeping; a leak adds one a step).
    assert len(census.python_tensors) == 4
    assert max(census.python_tensors) - min(census.python_tensors) <= 3, census.python_tensors


def test_census_detects_a_leaked_second_order_graph(tiny_net: dict[str, Any]) -> None:
    # The census must be able to fail: a module that keeps one penalty per step is caught at once.
    steps = 5
    module = _LeakyGPCPS(**tiny_net)
    census = _fit(module, steps, full_census_at=(1, 2, 3, 4, 5))
    growth = [b - a for a, b in zip(census.saved_alive, census.saved_alive[1:], strict=False)]
    assert all(g > 50 for g in growth), census.saved_alive  # four forwards and a double backward per step
    assert all(b > a for a, b in zip(census.python_tensors, census.python_tensors[1:], strict=False))
    assert len(census.kept_past_step[-1]) > 50 * steps
