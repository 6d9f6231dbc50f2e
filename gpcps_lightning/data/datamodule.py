"""Lightning datamodules: the semi-supervised base and :class:`FolderDataModule` for a user's own data.

The loaders ship compact uint8 batches (:mod:`gpcps_lightning.data.datasets`); on the device,
:meth:`SemiSupervisedDataModule.on_after_batch_transfer` converts them to float, augments training
batches with kornia and normalises, giving the :mod:`gpcps_lightning.batch` structures the modules
consume. Training batches carry per-sample fusion weights ``eps``, drawn here with the augmentation
from private streams of the datamodule's seed, so that every method sees the same batches; the fused
image ``f = eps * l + (1 - eps) * u`` is *not* built here: the method fuses (its ``eps`` policy is a
method option), and supervised baselines need no fusion.
"""

from __future__ import annotations

import contextlib
import math
import os
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader

from gpcps_lightning._lightning_internals import fit_loop_counters
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.data.datasets import (
    CompactEvaluationBatch,
    CompactPredictionBatch,
    CompactTrainBatch,
    ImageDataset,
    ImageMaskDataset,
    ImageMaskPair,
    SemiSupervisedTrainDataset,
    check_image_mask_pairs,
    check_images,
    collate_evaluation,
    collate_prediction,
    collate_train,
)
from gpcps_lightning.data.sampler import SemiSupervisedPairSampler
from gpcps_lightning.data.splits import DataSplit, split_folder
from gpcps_lightning.data.streams import AUGMENTATION_STREAM, fusion_weights, seeded_rng, stream_seed
from gpcps_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationAugmentation,
    denormalize,
    normalize,
)

__all__ = ["FolderDataModule", "SemiSupervisedDataModule"]

CheckFiles = Literal["header", "full"]


def _default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, max(0, cpus - 1))


class SemiSupervisedDataModule(L.LightningDataModule):
    """Base of the library's datamodules: a labeled, an unlabeled, a validation and a test set.

    Training steps receive a :class:`~gpcps_lightning.SemiSupervisedBatch` with ``batch_size`` labeled
    images (with masks) and ``batch_size`` unlabeled images, augmented and normalised on the device,
    and per-sample fusion weights ``eps``; ``fused`` is left ``None`` (the method fuses). The
    augmentation draws and ``eps`` are functions of ``seed`` and the samples' stream positions only,
    whatever the method draws elsewhere (:meth:`make_train_batch`). The labeled set is cycled with
    reshuffling, the unlabeled set reshuffled at every pass
    (:class:`~gpcps_lightning.data.SemiSupervisedPairSampler`).
    Validation and test steps receive an :class:`~gpcps_lightning.EvaluationBatch`, prediction steps a
    :class:`~gpcps_lightning.PredictionBatch` of the images in ``predict_dir``.

    Subclasses implement :meth:`build_split`.

    Args:
        batch_size: Labeled images per step (and as many unlabeled ones); also the evaluation batch size.
        image_size: Training size, an int (square) or ``(height, width)``; every image is resized to it.
        labeled_fraction: Fraction of the training images used with their masks; the rest are unlabeled.
        steps_per_epoch: Training steps per epoch; default ``ceil((labeled + unlabeled) / batch_size)``.
        num_workers: DataLoader worker processes; default ``min(8, CPUs - 1)``.
        augment: Augment training batches (flips, affine, colour jitter, blur) on the device.
        cache: Keep decoded, resized uint8 images and masks in memory after first use (shared memory
            with workers; needs about ``3 * H * W`` bytes per image).
        eval_at_original_size: Give validation/test batches each mask at its original resolution, so
            that metrics are computed there (predictions resized back), as the polyp literature does;
            ``False``: metrics at the training size.
        seed: Seed of the training stream (non-negative): its shuffles, augmentation draws and fusion
            weights.
        mean: Per-channel normalisation mean (ImageNet's by default).
        std: Per-channel normalisation standard deviation (ImageNet's by default).
        predict_dir: Folder of images (any size, any supported format) that ``predict_dataloader`` reads.
        check_files: At setup, read every file's ``"header"`` (finds unreadable files and size
            mismatches; fast) or decode it in ``"full"`` (also finds truncated files and non-binary
            masks up front, slow). With ``"header"``, a truncated file is reported when first decoded.

    Raises:
        ValueError: On an invalid option (the message names it).
    """

    def __init__(
        self,
        batch_size: int = 16,
        image_size: int | tuple[int, int] = 256,
        labeled_fraction: float = 0.125,
        steps_per_epoch: int | None = None,
        num_workers: int | None = None,
        augment: bool = True,
        cache: bool = False,
        eval_at_original_size: bool = True,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        predict_dir: str | None = None,
        check_files: CheckFiles = "header",
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        if len(size) != 2 or any(
            not isinstance(s, Real) or isinstance(s, bool) or int(s) != s or s < 1 for s in size
        ):
            raise ValueError(
                f"`image_size` must be a positive integer or a (height, width) pair of them, "
                f"got {image_size!r}."
            )
        if not 0.0 < float(labeled_fraction) <= 1.0:
            raise ValueError(f"`labeled_fraction` must be in (0, 1], got {labeled_fraction!r}.")
        if steps_per_epoch is not None and (int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1):
            raise ValueError(
                f"`steps_per_epoch` must be a positive integer or None, got {steps_per_epoch!r}."
            )
        if num_workers is not None and (int(num_workers) != num_workers or num_workers < 0):
            raise ValueError(f"`num_workers` must be a non-negative integer or None, got {num_workers!r}.")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"`mean` and `std` must have 3 values (RGB), got {mean!r} and {std!r}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"`std` must be positive, got {std!r}.")
        if check_files not in ("header", "full"):
            raise ValueError(f"`check_files` must be 'header' or 'full', got {check_files!r}.")
        self.save_hyperparameters()
        self.batch_size = int(batch_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.labeled_fraction = float(labeled_fraction)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.num_workers = _default_num_workers() if num_workers is None else int(num_workers)
        self.augment = bool(augment)
        self.cache = bool(cache)
        self.eval_at_original_size = bool(eval_at_original_size)
        self.seed = int(seed)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.predict_dir = predict_dir
        self.check_files = check_files
        self.augmentation: SegmentationAugmentation | None = self.build_augmentation() if augment else None
        self._split: DataSplit | None = None
        self._checked: dict[str, list[tuple[int, int]]] = {}
        self._resume_position: tuple[int, int, int | None] | None = None
        self.train_dataset: SemiSupervisedTrainDataset | None = None
        self.val_dataset: ImageMaskDataset | None = None
        self.test_dataset: ImageMaskDataset | None = None
        self.predict_dataset: ImageDataset | None = None

    # ----------------------------------------------------------------- to override
    def build_split(self) -> DataSplit:
        """Find the files and split them into labeled, unlabeled, validation and test sets.

        Raises:
            FileNotFoundError, ValueError: On missing or malformed data (the message names the file).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_split().")

    def build_augmentation(self) -> SegmentationAugmentation:
        """The training augmentation (override to change it)."""
        return SegmentationAugmentation()

    # ----------------------------------------------------------------- setup
    @property
    def split(self) -> DataSplit:
        """The data split (built on first access)."""
        if self._split is None:
            split = self.build_split()
            if not split.labeled:
                raise ValueError(
                    f"{type(self).__name__}: no labeled training image (labeled_fraction="
                    f"{self.labeled_fraction}); raise `labeled_fraction` or add labeled images."
                )
            if not split.unlabeled:
                raise ValueError(
                    f"{type(self).__name__}: no unlabeled training image (labeled_fraction="
                    f"{self.labeled_fraction}); lower `labeled_fraction` or give unlabeled images."
                )
            self._split = split
        return self._split

    @property
    def num_labeled(self) -> int:
        """Number of labeled training images."""
        return len(self.split.labeled)

    @property
    def num_unlabeled(self) -> int:
        """Number of unlabeled training images."""
        return len(self.split.unlabeled)

    def _world(self) -> tuple[int, int]:
        """``(number of ranks, this rank)`` of the attached Trainer, ``(1, 0)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    @property
    def train_steps_per_epoch(self) -> int:
        """Steps per epoch and rank: ``steps_per_epoch`` or ``ceil((labeled + unlabeled) / (batch * ranks))``.

        By default an epoch is one pass over the training images with the global batch
        ``batch_size * ranks``, so it has the same meaning on one device and on several.
        """
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return math.ceil((self.num_labeled + self.num_unlabeled) / (self.batch_size * self._world()[0]))

    @property
    def _threads(self) -> int:
        return max(1, self.num_workers)

    @property
    def _shared_cache(self) -> bool:
        return self.cache and self.num_workers > 0

    def _check_pairs(self, key: str, pairs: list[ImageMaskPair]) -> list[tuple[int, int]]:
        if key not in self._checked:
            self._checked[key] = check_image_mask_pairs(pairs, self.check_files == "full", self._threads)
        return self._checked[key]

    def _evaluation_dataset(self, key: str, pairs: list[ImageMaskPair]) -> ImageMaskDataset:
        if not pairs:
            raise ValueError(f"{type(self).__name__} has no {key} set (it has 0 images); it cannot {key}.")
        sizes = self._check_pairs(key, pairs)
        return ImageMaskDataset(
            pairs,
            self.image_size,
            original_masks=self.eval_at_original_size,
            cache=self.cache,
            shared_cache=self._shared_cache,
            sizes=sizes,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or all).

        Every file of the stage's sets is checked (see ``check_files``). Fitting checks every pair of the
        split, the test set's and the pairs it leaves unlabeled included, so that a bad pair is reported
        before training whichever set the split puts it in; of an unlabeled pair's mask only the header
        is read (training never opens it).

        Raises:
            FileNotFoundError, ValueError: On missing, unreadable or inconsistent files.
        """
        if stage in ("fit", None) and self.train_dataset is None:
            split = self.split
            self._check_pairs("labeled", split.labeled)
            if "unlabeled" not in self._checked:
                self._checked["unlabeled"] = check_images(
                    split.unlabeled, self.check_files == "full", self._threads
                )
            if "unlabeled_pairs" not in self._checked:
                self._checked["unlabeled_pairs"] = check_image_mask_pairs(
                    split.unlabeled_pairs, threads=self._threads, unlabeled=True
                )
            if split.test:
                self._check_pairs("test", split.test)
            labeled = ImageMaskDataset(
                split.labeled, self.image_size, cache=self.cache, shared_cache=self._shared_cache
            )
            unlabeled = ImageDataset(
                split.unlabeled,
                self.image_size,
                cache=self.cache,
                shared_cache=self._shared_cache,
                names=[p.stem for p in split.unlabeled],
            )
            self.train_dataset = SemiSupervisedTrainDataset(labeled, unlabeled)
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            self.val_dataset = self._evaluation_dataset("validate", self.split.val)
        # setup(None) (all stages, for interactive use) skips an empty test set; setup("test") reports it.
        if (stage == "test" or (stage is None and self.split.test)) and self.test_dataset is None:
            self.test_dataset = self._evaluation_dataset("test", self.split.test)
        if stage in ("predict", None) and self.predict_dataset is None and self.predict_dir is not None:
            self.predict_dataset = ImageDataset.from_folder(self.predict_dir, image_size=self.image_size)
            check_images(self.predict_dataset.paths, self.check_files == "full", self._threads)

    # ----------------------------------------------------------------- loaders
    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # A private generator: starting an epoch's iterator must not draw from the global RNG, whose
            # state a resumed run restores (the order of the data comes from the sampler, not from it).
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_sampler(self, num_replicas: int = 1, rank: int = 0) -> SemiSupervisedPairSampler:
        """The training stream's sampler (per-rank ``steps_per_epoch``; see the class for the layout)."""
        return SemiSupervisedPairSampler(
            self.num_labeled,
            self.num_unlabeled,
            self.batch_size,
            self.train_steps_per_epoch,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
        )

    def _resume_next_position(self, steps_per_epoch: int) -> tuple[int, int]:
        """``(epoch, step)`` where the resumed stream starts: the saved epoch's next step or the next epoch.

        An epoch is finished when its steps done reach the length Lightning ran it with (saved as
        ``epoch_length``; checkpoints without it: the sampler's full epoch).
        """
        assert self._resume_position is not None
        epoch, done, length = self._resume_position
        ran = steps_per_epoch if length is None else min(length, steps_per_epoch)
        return (epoch + 1, 0) if done >= ran else (epoch, done)

    def train_dataloader(self) -> DataLoader:
        """``train_steps_per_epoch`` batches of :class:`~gpcps_lightning.data.CompactTrainBatch` per rank.

        Under a distributed strategy each rank gets its own slice of the training stream; a run resumed
        from a mid-epoch checkpoint continues the epoch where the checkpoint left it.
        """
        if self.train_dataset is None:
            self.setup("fit")
        sampler = self.train_sampler(*self._world())
        if self._resume_position is not None:
            epoch, step = self._resume_next_position(sampler.steps_per_epoch)
            # Set the epoch now: Lightning builds the resumed run's first iterator before it calls
            # `set_epoch`, and worker processes draw their first indices as soon as it is built.
            sampler.set_epoch(epoch)
            sampler.set_start_step(step, epoch=epoch)
            self._resume_position = None
        return self._loader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_train,
            drop_last=False,
        )

    def _evaluation_loader(self, dataset: ImageMaskDataset | None, stage: str) -> DataLoader:
        if dataset is None:
            self.setup(stage)
            dataset = self.val_dataset if stage == "validate" else self.test_dataset
        replicas, rank = self._world()
        if replicas > 1:
            # Each image exactly once over all ranks (Lightning's default sampler would pad the last
            # shard with repeated images, which biases a per-image mean); the metrics gather the ranks.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
            return self._loader(
                dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_evaluation
            )
        return self._loader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_evaluation)

    def val_dataloader(self) -> DataLoader:
        """The validation set, in order, as :class:`~gpcps_lightning.data.CompactEvaluationBatch`."""
        return self._evaluation_loader(self.val_dataset, "validate")

    def test_dataloader(self) -> DataLoader:
        """The test set, in order, as :class:`~gpcps_lightning.data.CompactEvaluationBatch`."""
        return self._evaluation_loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """The images of ``predict_dir`` in name order, as ``CompactPredictionBatch``.

        Raises:
            ValueError: If ``predict_dir`` is not set.
        """
        if self.predict_dir is None:
            raise ValueError(
                f"{type(self).__name__}: set `predict_dir` to the folder of images to segment "
                "before predicting."
            )
        if self.predict_dataset is None:
            self.setup("predict")
        return self._loader(
            self.predict_dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_prediction
        )

    # ----------------------------------------------------------------- device side
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) images to the networks' normalised float input.

        Shape:
            - images: (N, 3, H, W)
        """
        return normalize(images, self.mean, self.std)

    def denormalize(self, images: Tensor) -> Tensor:
        """Invert the normalisation: network input back to [0, 1] images (for drawing).

        Shape:
            - images: (N, 3, H, W) or (3, H, W)
        """
        return denormalize(images, self.mean, self.std)

    def make_train_batch(self, batch: CompactTrainBatch, augment: bool | None = None) -> SemiSupervisedBatch:
        """Float, augmented (if ``augment``, default the datamodule's), normalised training batch.

        For a batch with stream ``positions`` (every batch of :meth:`train_dataloader`), the
        augmentation draws and the per-sample fusion weights ``eps`` come from private streams keyed by
        ``(seed, positions)`` (:mod:`gpcps_lightning.data.streams`), not from the global random state:
        they are the same for every method trained with this seed. Without positions, the augmentation
        draws from the global random state and ``eps`` is left ``None`` (the method draws it).
        """
        labeled = batch.labeled.float() / 255.0
        unlabeled = batch.unlabeled.float() / 255.0
        mask = batch.mask.float()
        positions = batch.positions
        if (self.augment if augment is None else augment) and self.augmentation is not None:
            private = (
                seeded_rng(stream_seed(self.seed, AUGMENTATION_STREAM, positions), labeled.device)
                if positions is not None
                else contextlib.nullcontext()
            )
            with private:
                labeled, aug_mask = self.augmentation(labeled, mask)
                assert aug_mask is not None  # given a mask, the augmentation returns one
                mask = aug_mask
                unlabeled, _ = self.augmentation(unlabeled)
        eps = fusion_weights(self.seed, positions, labeled.device) if positions is not None else None
        return SemiSupervisedBatch(
            labeled=self.normalize(labeled), mask=mask, unlabeled=self.normalize(unlabeled), eps=eps
        )

    def make_evaluation_batch(self, batch: CompactEvaluationBatch) -> EvaluationBatch:
        """Float, normalised evaluation batch (masks float in {0, 1})."""
        originals = [m.float() for m in batch.original_masks] if batch.original_masks is not None else None
        return EvaluationBatch(
            image=self.normalize(batch.image),
            mask=batch.mask.float(),
            original_masks=originals,
            names=list(batch.names),
        )

    def make_prediction_batch(self, batch: CompactPredictionBatch) -> PredictionBatch:
        """Float, normalised prediction batch."""
        return PredictionBatch(
            image=self.normalize(batch.image),
            original_sizes=[(int(h), int(w)) for h, w in batch.original_sizes],
            names=list(batch.names),
        )

    # ----------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Any]:
        """Where the training stream stands (saved in checkpoints).

        ``epoch`` and ``steps_done`` (steps of it done on each rank), and ``epoch_length``: the steps
        Lightning runs in that epoch (``train_steps_per_epoch`` cut by ``Trainer(limit_train_batches)``),
        which tells a finished epoch from one interrupted at the same step.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        # The batch counters belong to the last epoch that started (the checkpoint may be written after
        # Lightning already counted that epoch as completed). "processed": the step ran; its end-of-batch
        # hooks, where mid-epoch checkpoints are written, may still be running.
        counters = fit_loop_counters(trainer)
        epoch = max(counters.epoch_ready - 1, 0)
        state = {"epoch": int(epoch), "steps_done": int(counters.batch_processed), "seed": self.seed}
        length = trainer.num_training_batches
        if isinstance(length, int) or (isinstance(length, float) and math.isfinite(length)):
            state["epoch_length"] = int(length)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where a checkpoint left it (see :meth:`state_dict`).

        Raises:
            ValueError: If the checkpoint's data seed differs from ``seed``.
        """
        if not state_dict:
            return
        if int(state_dict.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"The checkpoint was trained with data seed {state_dict['seed']}, this datamodule has seed "
                f"{self.seed}; resume with the same `seed` (or start a new run)."
            )
        length = state_dict.get("epoch_length")
        self._resume_position = (
            int(state_dict["epoch"]),
            int(state_dict["steps_done"]),
            None if length is None else int(length),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn the loaders' compact uint8 batches into the library's batch structures, on the device."""
        if isinstance(batch, CompactTrainBatch):
            return self.make_train_batch(batch)
        if isinstance(batch, CompactEvaluationBatch):
            return self.make_evaluation_batch(batch)
        if isinstance(batch, CompactPredictionBatch):
            return self.make_prediction_batch(batch)
        return batch


class FolderDataModule(SemiSupervisedDataModule):
    """Your own image/mask folder as a semi-supervised datamodule.

    ``root/images`` and ``root/masks`` hold the pairs, matched by file stem (extensions may differ:
    jpg, jpeg, png, bmp, tif, tiff). Masks may be 0/1, 0/255, RGB or JPEG-compressed (thresholded at
    half their range). The pairs are split into train/val/test either by split files (one file stem
    per line) or by fractions of a seeded shuffle; the labeled subset of the training set comes from
    ``labeled_split`` or ``labeled_fraction`` (nested across fractions for one ``split_seed``). The other
    training images are unlabeled (their masks are never opened in training), joined by the images of
    ``unlabeled_dir`` if given. See ``docs/data.md``.

    Args:
        root: Folder holding the image and mask folders.
        images_subdir: Name of the image folder in ``root``.
        masks_subdir: Name of the mask folder in ``root``.
        train_split: Split file of the training names (with ``val_split``; optionally ``test_split``).
        val_split: Split file of the validation names.
        test_split: Split file of the test names (no test set if not given with split files).
        labeled_split: Split file of the labeled training names (overrides ``labeled_fraction``).
        val_fraction: Validation fraction when no split files are given.
        test_fraction: Test fraction when no split files are given.
        split_seed: Seed of the fraction-based splits and of the labeled subset.
        unlabeled_dir: Folder of extra unlabeled images (no masks needed).
        **kwargs: Common arguments of :class:`SemiSupervisedDataModule` (``batch_size``, ``image_size``,
            ``labeled_fraction``, ...).

    Raises:
        ValueError: On invalid options.
    """

    def __init__(
        self,
        root: str,
        images_subdir: str = "images",
        masks_subdir: str = "masks",
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        labeled_split: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        unlabeled_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (train_split is None) != (val_split is None):
            raise ValueError("`train_split` and `val_split` go together: give both split files or neither.")
        if test_split is not None and train_split is None:
            raise ValueError("`test_split` needs `train_split` and `val_split` as well.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}.")
        if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`test_fraction` must be in [0, 1) with val_fraction + test_fraction < 1, "
                f"got {test_fraction!r}."
            )
        if int(split_seed) != split_seed or split_seed < 0:
            raise ValueError(f"`split_seed` must be a non-negative integer, got {split_seed!r}.")
        self.root = root
        self.images_subdir = images_subdir
        self.masks_subdir = masks_subdir
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.labeled_split = labeled_split
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.unlabeled_dir = unlabeled_dir

    def _root(self) -> Path:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"The data root {root} does not exist. Create it with `{self.images_subdir}/` and "
                f"`{self.masks_subdir}/` folders of images and masks, or fix `root`."
            )
        return root

    def build_split(self) -> DataSplit:  # noqa: D102
        return split_folder(
            self._root(),
            images_subdir=self.images_subdir,
            masks_subdir=self.masks_subdir,
            train_split=self.train_split,
            val_split=self.val_split,
            test_split=self.test_split,
            labeled_split=self.labeled_split,
            labeled_fraction=self.labeled_fraction,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
            unlabeled_dir=self.unlabeled_dir,
        )
