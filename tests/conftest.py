from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from gpcps_lightning import SyntheticPolypDataModule
from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.testing import RandomSquaresDataModule

os.environ.setdefault("WANDB_MODE", "offline")
# The CLI's thread policy measures how busy the machine is; tests must not depend on load, so they keep
# PyTorch's thread count (and skip the measurement). tests/test_threads.py tests the policy itself.
os.environ.setdefault("GPCPS_NUM_THREADS", str(torch.get_num_threads()))

#: A small, fast network for tests: timm ResNet-18 cut to three stages (timm drops the
#: unused ones), narrow decoder.
TINY_NET: dict[str, Any] = {
    "arch": "Unet",
    "encoder_name": "tu-resnet18",
    "network_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
}


#: The Trainer arguments every test run shares: CPU, nothing logged, saved or printed, no validation.
QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


@pytest.fixture
def tiny_net() -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_NET.items()}


def tiny_trainer(**overrides: Any) -> L.Trainer:
    """A Trainer with :data:`QUIET_TRAINER`'s arguments, ``overrides`` replacing or adding to them.

    Tests and fixtures ask for the ``tiny_trainer`` fixture; module-level helpers, which cannot, import
    this function.
    """
    return L.Trainer(**{**QUIET_TRAINER, **overrides})


def load_script(name: str) -> Any:
    """The module of ``scripts/<name>.py`` (the scripts are not a package), for tests of their functions."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpointing_trainer(root: Path, **overrides: Any) -> L.Trainer:
    """A one-step :func:`tiny_trainer` writing ``last.ckpt`` into ``root`` (the library's checkpoint I/O)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gpcps_lightning.checkpointing import SafeCheckpointIO

    kwargs: dict[str, Any] = {
        "max_steps": 1,
        "enable_checkpointing": True,
        "plugins": [SafeCheckpointIO()],
        "callbacks": [ModelCheckpoint(dirpath=root, save_last=True)],
        "default_root_dir": root,
    }
    return tiny_trainer(**{**kwargs, **overrides})


@pytest.fixture(name="tiny_trainer", scope="session")
def _tiny_trainer_fixture() -> Callable[..., L.Trainer]:
    return tiny_trainer


def tiny_synthetic_datamodule(root: str | Path, **overrides: Any) -> SyntheticPolypDataModule:
    """The generated polyp data at test size (20 images of 32 px, batches of 2, augmented) under ``root``."""
    kwargs: dict[str, Any] = {
        "num_images": 20,
        "image_size": 32,
        "batch_size": 2,
        "labeled_fraction": 0.25,
        "num_workers": 0,
        "augment": True,
    }
    return SyntheticPolypDataModule(root=str(root), **{**kwargs, **overrides})


@pytest.fixture(name="tiny_synthetic_datamodule", scope="session")
def _tiny_synthetic_datamodule_fixture() -> Callable[..., SyntheticPolypDataModule]:
    return tiny_synthetic_datamodule


def random_semi_batch(n: int = 2, size: int = 32, seed: int = 0) -> SemiSupervisedBatch:
    g = torch.Generator().manual_seed(seed)
    labeled = torch.randn(n, 3, size, size, generator=g)
    unlabeled = torch.randn(n, 3, size, size, generator=g)
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.6).float()
    return SemiSupervisedBatch(labeled=labeled, mask=mask, unlabeled=unlabeled)


class RandomSemiDataModule(RandomSquaresDataModule):
    """:class:`~gpcps_lightning.testing.RandomSquaresDataModule` as the tests' trainings use it.

    The training images come in index order (a resumed run sees the same batches without restoring a
    sampler) and, unless ``mean``/``std`` are given, unnormalised in [0, 1] with no statistics, so that
    modules that check their normalisation against the datamodule's (UniMatch) accept it.
    """

    def __init__(
        self,
        size: int = 32,
        batch_size: int = 2,
        length: int = 8,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, image_size=size, num_train=length, shuffle=False, mean=mean, std=std
        )
