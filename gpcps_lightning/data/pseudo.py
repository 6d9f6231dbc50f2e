"""A folder of labeled and pseudo-labelled pairs, with a strong augmentation of the pseudo-labelled ones.

Self-training (ST++, :mod:`gpcps_lightning.pipelines.stpp`) retrains on the labeled images plus unlabeled
images whose masks are predictions. Both kinds are image/mask pairs of one folder, so they train through
:class:`~gpcps_lightning.data.FolderDataModule`'s labeled stream like any labeled pair; the only
difference is that ``strong_split`` names the pairs whose images also get
:class:`~gpcps_lightning.data.transforms.StrongAugmentation`, whose cutout boxes travel to the loss as
ignore regions (``SemiSupervisedBatch.valid``).

Which labeled pair a training sample holds is read from its stream position
(:func:`~gpcps_lightning.data.sampler.labeled_stream_indices`), so the loaders and compact batches are
those of every other datamodule; the strong draws come from a private stream of the datamodule's seed
and the batch's positions, as the weak augmentation's do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.data.datamodule import FolderDataModule
from gpcps_lightning.data.datasets import CompactTrainBatch
from gpcps_lightning.data.io import preview_names
from gpcps_lightning.data.sampler import labeled_stream_indices
from gpcps_lightning.data.splits import read_split_file
from gpcps_lightning.data.streams import STRONG_AUGMENTATION_STREAM, seeded_rng, stream_seed
from gpcps_lightning.data.transforms import StrongAugmentation

__all__ = ["PseudoLabelDataModule"]


class PseudoLabelDataModule(FolderDataModule):
    """:class:`~gpcps_lightning.data.FolderDataModule` whose ``strong_split`` pairs are strongly augmented.

    The pairs named in ``strong_split`` (pseudo-labelled images) must be labeled training pairs. After
    the datamodule's own augmentation (the same for every labeled pair), their images go through
    :class:`~gpcps_lightning.data.transforms.StrongAugmentation` and the batch's ``valid`` marks the
    cutout boxes as ignored; batches without such a pair have ``valid=None``. ``augment=False`` turns
    both augmentations off.

    Args:
        strong_split: Split file of the labeled training names to augment strongly (``None``: none).
        strong_augmentation: Arguments of :class:`~gpcps_lightning.data.transforms.StrongAugmentation`
            (``None``: its defaults, ST++'s).
        **kwargs: Arguments of :class:`~gpcps_lightning.data.FolderDataModule`.

    Raises:
        ValueError: On invalid options.
    """

    def __init__(
        self,
        strong_split: str | None = None,
        strong_augmentation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.strong_split = strong_split
        self.strong_augmentation = StrongAugmentation(**(strong_augmentation or {}))
        self._strong: np.ndarray | None = None

    @property
    def strong_flags(self) -> np.ndarray:
        """Whether each labeled pair (in the split's order) is strongly augmented.

        Raises:
            ValueError: If ``strong_split`` names a pair that is not a labeled training pair.
        """
        if self._strong is None:
            labeled = [pair.name for pair in self.split.labeled]
            names = set(read_split_file(self.strong_split, "strong_split")) if self.strong_split else set()
            unknown = sorted(names - set(labeled))
            if unknown:
                raise ValueError(
                    f"`strong_split` {self.strong_split} lists {len(unknown)} name(s) that are not labeled "
                    f"training pairs: {preview_names(unknown)}. It names the pseudo-labelled pairs among the "
                    "labeled ones."
                )
            self._strong = np.array([name in names for name in labeled], dtype=bool)
        return self._strong

    def setup(self, stage: str | None = None) -> None:
        """Set up as :class:`~gpcps_lightning.data.FolderDataModule` does, then check ``strong_split``.

        Raises:
            FileNotFoundError, ValueError: On missing or inconsistent files.
        """
        super().setup(stage)
        if stage in ("fit", None):
            self.strong_flags  # noqa: B018 (checks the split file before the first step)

    def make_train_batch(self, batch: CompactTrainBatch, augment: bool | None = None) -> SemiSupervisedBatch:
        """The datamodule's training batch, then the strong augmentation of its ``strong_split`` samples.

        Raises:
            ValueError: If the batch has strongly augmented pairs but no stream positions.
        """
        out = super().make_train_batch(batch, augment)
        flags = self.strong_flags
        if not (self.augment if augment is None else augment) or not flags.any():
            return out
        if batch.positions is None:
            raise ValueError(
                f"{type(self).__name__} finds the pseudo-labelled samples of a batch by their stream "
                "positions; this batch has none. Train with the datamodule's own train_dataloader()."
            )
        chosen = flags[labeled_stream_indices(self.num_labeled, self.seed, batch.positions)]
        if not chosen.any():
            return out
        rows = torch.as_tensor(np.flatnonzero(chosen), device=out.labeled.device)
        device = out.labeled.device
        with seeded_rng(stream_seed(self.seed, STRONG_AUGMENTATION_STREAM, batch.positions), device):
            images, valid_rows = self.strong_augmentation(self.denormalize(out.labeled[rows]).clamp(0.0, 1.0))
        labeled = out.labeled.clone()
        labeled[rows] = self.normalize(images)
        valid = torch.ones_like(out.mask)
        valid[rows] = valid_rows
        return dataclasses.replace(out, labeled=labeled, valid=valid)
