"""ST++ for the reproduction runner: :func:`stpp_run`, what the runner has per run in, the result out.

The pipeline itself is :mod:`gpcps_lightning.pipelines.stpp` (:func:`~gpcps_lightning.pipelines.run_stpp`
with an :class:`~gpcps_lightning.pipelines.STPPConfig`); this entry takes the runner's loose arguments,
and the datamodule as an instance or as a class (path) with arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from gpcps_lightning._utils import import_object
from gpcps_lightning.data.datamodule import SemiSupervisedDataModule
from gpcps_lightning.pipelines.stpp import STPPConfig, STPPOptions, STPPResult, run_stpp

__all__ = ["stpp_run"]


def stpp_run(
    datamodule: SemiSupervisedDataModule | None = None,
    *,
    datamodule_class: str | type | None = None,
    datamodule_args: Mapping[str, Any] | None = None,
    module_args: Mapping[str, Any] | None = None,
    max_steps: int | Sequence[int],
    val_every: int,
    out_dir: str | os.PathLike[str],
    precision: str = "32-true",
    accelerator: str = "auto",
    seed: int = 0,
    options: STPPOptions | Mapping[str, Any] | None = None,
    progress_bar: bool = False,
) -> STPPResult:
    """ST++ for the reproduction runner: what it has per run in, the final checkpoint and timings out.

    Give the datamodule as an instance, or as its class (or class path) and arguments. The returned
    :attr:`STPPResult.checkpoint` is a SupervisedModule checkpoint selected on validation: validate and
    test it on the same datamodule as any other run's best checkpoint;
    :attr:`~gpcps_lightning.pipelines.STPPResult.stage_seconds` holds the stages' times.

    Args:
        datamodule: The datamodule.
        datamodule_class: Its class or dotted class path, instead of ``datamodule``.
        datamodule_args: Arguments of ``datamodule_class``.
        module_args: SupervisedModule arguments (the runner's method config ``init_args`` with its
            ``network_seed``).
        max_steps: Steps of each training (one integer for all three, or three).
        val_every: Validation interval in steps.
        out_dir: The run's folder (the stages go in it).
        precision: Trainer precision.
        accelerator: Trainer accelerator.
        seed: ``lightning.seed_everything`` seed before each training.
        options: ST++ options (an :class:`STPPOptions` or a config's ``stpp:`` mapping).
        progress_bar: Show Lightning's progress bar.

    Returns:
        See :func:`~gpcps_lightning.pipelines.run_stpp`.

    Raises:
        ValueError: If neither or both of ``datamodule`` and ``datamodule_class`` are given, or as
            :class:`~gpcps_lightning.pipelines.STPPConfig` and :func:`~gpcps_lightning.pipelines.run_stpp`.
    """
    if (datamodule is None) == (datamodule_class is None):
        raise ValueError(
            "Give ST++ its data either as `datamodule` or as `datamodule_class` (with `datamodule_args`): "
            "one of the two."
        )
    if datamodule is None:
        cls = import_object(datamodule_class) if isinstance(datamodule_class, str) else datamodule_class
        assert cls is not None
        datamodule = cls(**dict(datamodule_args or {}))
    if options is None:
        options = STPPOptions()
    elif not isinstance(options, STPPOptions):
        options = STPPOptions.from_mapping(options)
    config = STPPConfig(
        datamodule=datamodule,
        max_steps=max_steps,
        val_every=val_every,
        module_args=dict(module_args or {}),
        precision=precision,
        accelerator=accelerator,
        seed=seed,
        options=options,
        progress_bar=progress_bar,
    )
    return run_stpp(config, out_dir)
