"""Soak: a few hundred CPU steps, validating and checkpointing often; memory stays flat, no leftovers."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_NET, RandomSemiDataModule

from gpcps_lightning import GPCPSModule
from gpcps_lightning.callbacks import BestCheckpoint
from gpcps_lightning.checkpointing import SafeCheckpointIO

STEPS, EVERY = 240, 20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class _Probe(L.Callback):
    """At every validation: live tensors held by Python, and the process's resident memory."""

    def __init__(self) -> None:
        self.tensors: list[int] = []
        self.rss: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some torch objects warns about deprecations
            warnings.simplefilter("ignore")
            self.tensors.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
        self.rss.append(_rss_mib())


@pytest.mark.slow
def test_long_run_with_frequent_validation_and_checkpoints(
    tmp_path: Path, tiny_trainer: Callable[..., L.Trainer]
) -> None:
    L.seed_everything(0, verbose=False)
    probe = _Probe()
    trainer = tiny_trainer(
        max_steps=STEPS,
        val_check_interval=EVERY,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        plugins=[SafeCheckpointIO()],
        callbacks=[BestCheckpoint(), probe],
    )
    trainer.fit(GPCPSModule(**TINY_NET), RandomSemiDataModule(length=16))
    assert trainer.global_step == STEPS
    assert len(probe.tensors) == STEPS // EVERY
    # After the first validations (optimizer state, metric states and caches appear), nothing accumulates.
    settled = probe.tensors[2:]
    assert max(settled) - min(settled) <= 2, probe.tensors
    assert probe.rss[-1] - probe.rss[2] < 64, probe.rss  # MiB, over 180 steps
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["checkpoints/best.ckpt", "checkpoints/last.ckpt"], files  # no temporary files left
