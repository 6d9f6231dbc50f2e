"""Datasets over image/mask files, and the compact uint8 batches the loaders ship.

Datasets return decoded, resized **uint8** tensors (small to move between processes and to the device);
the datamodule turns them into float, augmented, normalised :mod:`gpcps_lightning.batch` structures on
the device (:meth:`SemiSupervisedDataModule.on_after_batch_transfer
<gpcps_lightning.data.SemiSupervisedDataModule.on_after_batch_transfer>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gpcps_lightning.data.cache import SharedUInt8Cache
from gpcps_lightning.data.io import (
    list_image_files,
    preview_names,
    read_image,
    read_image_and_size,
    read_image_size,
    read_mask,
    read_mask_and_size,
    resize_image,
    resize_mask,
)

__all__ = [
    "CompactEvaluationBatch",
    "CompactPredictionBatch",
    "CompactTrainBatch",
    "ImageDataset",
    "ImageMaskDataset",
    "ImageMaskPair",
    "SemiSupervisedTrainDataset",
    "check_image_mask_pairs",
    "check_images",
    "collate_evaluation",
    "collate_prediction",
    "collate_train",
    "pair_image_mask_folders",
]

#: A training item with its stream position: ``(labeled_image, mask, unlabeled_image, position)``.
TrainItem = tuple[Tensor, Tensor, Tensor, int]


@dataclass(frozen=True)
class ImageMaskPair:
    """An image file and its mask file, named by their common stem."""

    name: str
    image: Path
    mask: Path


def pair_image_mask_folders(images_dir: str | Path, masks_dir: str | Path) -> list[ImageMaskPair]:
    """Pair the files of an image folder and a mask folder by file stem (extensions may differ).

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks, one per image, with the image's file stem.

    Returns:
        The pairs, sorted by name.

    Raises:
        FileNotFoundError: If a folder is missing.
        ValueError: If a folder is empty or holds unsupported entries or duplicate stems, or if an image
            has no mask or a mask no image (the names are listed).
    """
    images = list_image_files(Path(images_dir), "images")
    masks = list_image_files(Path(masks_dir), "masks")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) in {images_dir} have no mask in {masks_dir}: {preview_names(no_mask)}"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) in {masks_dir} have no image in {images_dir}: {preview_names(no_image)}"
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Each image needs a mask with the same file name (the extension may "
            "differ); add the missing files or remove the unpaired ones. Images without masks belong in a "
            "separate unlabeled folder."
        )
    return [ImageMaskPair(name, images[name], masks[name]) for name in images]


def _map(fn: Any, items: Sequence[Any], threads: int) -> list[Any]:
    if threads <= 1 or len(items) < 8:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow releases the GIL while decoding
        return list(pool.map(fn, items))


def check_image_mask_pairs(
    pairs: Sequence[ImageMaskPair], full: bool = False, threads: int = 1, *, unlabeled: bool = False
) -> list[tuple[int, int]]:
    """Check that every pair is readable and that image and mask have the same size.

    Args:
        pairs: Pairs to check.
        full: Decode every file completely (finds truncated files and non-binary masks up front); by
            default only the headers are read, which finds unreadable files and size mismatches.
        threads: Threads to read with.
        unlabeled: The pairs are training images that the split leaves unlabeled: training never reads
            their masks, so only the headers are read (also with ``full``), and a size mismatch says why
            an unused mask matters.

    Returns:
        The (height, width) of each pair, in order.

    Raises:
        ValueError: On an unreadable or truncated file (named) or an image and mask of different sizes
            (both named).
    """
    why = (
        " The split leaves this pair unlabeled, so training would not read the mask, but another split or "
        "`labeled_fraction` would: every pair of the folder must be valid."
        if unlabeled
        else ""
    )

    def one(pair: ImageMaskPair) -> tuple[int, int]:
        if full and not unlabeled:
            hw_image = read_image(pair.image).shape[:2]
            hw_mask = read_mask(pair.mask).shape[:2]
        else:
            hw_image = read_image_size(pair.image)
            hw_mask = read_image_size(pair.mask)
        if tuple(hw_image) != tuple(hw_mask):
            raise ValueError(
                f"Image {pair.image} is {hw_image[1]}x{hw_image[0]} (WxH) but its mask {pair.mask} is "
                f"{hw_mask[1]}x{hw_mask[0]}. A mask must have its image's size; fix or remove the pair.{why}"
            )
        return int(hw_image[0]), int(hw_image[1])

    return _map(one, pairs, threads)


def check_images(paths: Sequence[Path], full: bool = False, threads: int = 1) -> list[tuple[int, int]]:
    """Check that every image is readable (header only, or fully decoded when ``full``).

    Returns:
        The (height, width) of each image, in order.

    Raises:
        ValueError: On an unreadable or truncated file (named).
    """

    def one(path: Path) -> tuple[int, int]:
        if full:
            h, w = read_image(path).shape[:2]
            return int(h), int(w)
        return read_image_size(path)

    return _map(one, list(paths), threads)


def _as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


class ImageMaskDataset(Dataset):
    """Image/mask pairs, decoded and resized to a fixed size, as uint8 tensors.

    ``dataset[i]`` is ``(image, mask, original_mask, name)``: the image (3, H, W) uint8 RGB, its mask
    (1, H, W) uint8 in {0, 1} at the same size, the mask at the file's resolution (1, h, w) uint8 in
    {0, 1} when ``original_masks`` (else ``None``), and the pair's name.

    Args:
        pairs: The image/mask files.
        image_size: Output size, an int (square) or ``(height, width)``.
        original_masks: Also return each mask at its original resolution.
        cache: Keep decoded, resized items in memory after first use.
        shared_cache: Put the cache in shared memory (for DataLoader workers).
        sizes: The pairs' original (height, width) as :func:`check_image_mask_pairs` returns them;
            needed only to cache original-resolution masks (read from the headers when missing).
    """

    def __init__(
        self,
        pairs: Sequence[ImageMaskPair],
        image_size: int | tuple[int, int] = 256,
        original_masks: bool = False,
        cache: bool = False,
        shared_cache: bool = False,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.size = _as_size(image_size)
        self.original_masks = original_masks
        self.image_cache: SharedUInt8Cache | None = None
        self.mask_cache: SharedUInt8Cache | None = None
        self.original_cache: SharedUInt8Cache | None = None
        if cache:
            h, w = self.size
            n = len(self.pairs)
            self.image_cache = SharedUInt8Cache([(3, h, w)] * n, shared_cache, "images")
            self.mask_cache = SharedUInt8Cache([(1, h, w)] * n, shared_cache, "masks")
            if original_masks:
                if sizes is None:
                    sizes = [read_image_size(p.mask) for p in self.pairs]
                self.original_cache = SharedUInt8Cache(
                    [(1, hh, ww) for hh, ww in sizes], shared_cache, "original-size masks"
                )

    @classmethod
    def from_folder(
        cls, root: str | Path, images: str = "images", masks: str = "masks", **kwargs: Any
    ) -> ImageMaskDataset:
        """All pairs of ``root/images`` and ``root/masks`` (see :func:`pair_image_mask_folders`)."""
        root = Path(root)
        return cls(pair_image_mask_folders(root / images, root / masks), **kwargs)

    @property
    def names(self) -> list[str]:
        """The pairs' names, in order."""
        return [p.name for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        pair = self.pairs[i]
        # The full-resolution mask is needed for evaluation at the original size; otherwise both files
        # may be decoded at a reduced scale (the same for both, as they have the same size).
        draft = None if self.original_masks else self.size
        image, hw_image = read_image_and_size(pair.image, draft)
        mask, hw_mask = read_mask_and_size(pair.mask, draft)
        if hw_image != hw_mask:
            raise ValueError(
                f"Image {pair.image} is {hw_image[1]}x{hw_image[0]} (WxH) but its mask {pair.mask} is "
                f"{hw_mask[1]}x{hw_mask[0]}. A mask must have its image's size; fix or remove the pair."
            )
        small_image = torch.from_numpy(resize_image(image, self.size)).permute(2, 0, 1).contiguous()
        small_mask = torch.from_numpy(resize_mask(mask, self.size))[None]
        return small_image, small_mask, torch.from_numpy(mask)[None]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor | None, str]:
        i = int(i)
        name = self.pairs[i].name
        if self.image_cache is not None and self.mask_cache is not None:
            image, mask = self.image_cache.get(i), self.mask_cache.get(i)
            original = self.original_cache.get(i) if self.original_cache is not None else None
            if image is not None and mask is not None and (original is not None or not self.original_masks):
                return image.clone(), mask.clone(), original.clone() if original is not None else None, name
        image, mask, original = self._load(i)
        if self.image_cache is not None and self.mask_cache is not None:
            self.image_cache.put(i, image)
            self.mask_cache.put(i, mask)
            if self.original_cache is not None:
                self.original_cache.put(i, original)
        return image, mask, (original if self.original_masks else None), name


class ImageDataset(Dataset):
    """Images without masks, decoded and resized to a fixed size, as uint8 tensors.

    ``dataset[i]`` is ``(image, name, original_size)``: the image (3, H, W) uint8 RGB, its name (file
    stem) and its original ``(height, width)``. Mask files are never opened.

    Args:
        paths: Image files.
        image_size: Output size, an int (square) or ``(height, width)``.
        cache: Keep decoded, resized images in memory after first use.
        shared_cache: Put the cache in shared memory (for DataLoader workers).
        names: The images' names (default: the file stems).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        image_size: int | tuple[int, int] = 256,
        cache: bool = False,
        shared_cache: bool = False,
        names: Sequence[str] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.names = list(names) if names is not None else [p.stem for p in self.paths]
        if len(self.names) != len(self.paths):
            raise ValueError(f"Got {len(self.paths)} paths but {len(self.names)} names.")
        self.size = _as_size(image_size)
        self.cache: SharedUInt8Cache | None = None
        if cache:
            self.cache = SharedUInt8Cache([(3, *self.size)] * len(self.paths), shared_cache, "images")
            self._sizes = torch.zeros(len(self.paths), 2, dtype=torch.int64)
            if shared_cache:
                self._sizes.share_memory_()

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs: Any) -> ImageDataset:
        """All images of ``folder`` (see :func:`gpcps_lightning.data.io.list_image_files`)."""
        files = list_image_files(Path(folder), "images")
        return cls(list(files.values()), names=list(files), **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, str, tuple[int, int]]:
        i = int(i)
        if self.cache is not None:
            cached = self.cache.get(i)
            if cached is not None:
                h, w = (int(v) for v in self._sizes[i])
                return cached.clone(), self.names[i], (h, w)
        image, (h, w) = read_image_and_size(self.paths[i], self.size)
        small = torch.from_numpy(resize_image(image, self.size)).permute(2, 0, 1).contiguous()
        if self.cache is not None:
            self._sizes[i, 0], self._sizes[i, 1] = h, w
            self.cache.put(i, small)
        return small, self.names[i], (int(h), int(w))


class SemiSupervisedTrainDataset(Dataset):
    """The training stream's dataset: ``dataset[(l, u)]`` is labeled pair ``l`` and unlabeled image ``u``.

    Indexed by ``(labeled_index, unlabeled_index)`` pairs, or by the
    ``(labeled_index, unlabeled_index, position)`` triples that
    :class:`~gpcps_lightning.data.SemiSupervisedPairSampler` yields. Returns
    ``(labeled_image, mask, unlabeled_image)``, uint8 tensors of shapes (3, H, W), (1, H, W), (3, H, W),
    followed by the stream position when the index has one. Unlabeled images come from an
    :class:`ImageDataset`, so their masks are never opened.

    Args:
        labeled: Labeled pairs (original-resolution masks are not used here).
        unlabeled: Unlabeled images, at the labeled images' size.

    Raises:
        ValueError: If the two datasets resize to different sizes.
    """

    def __init__(self, labeled: ImageMaskDataset, unlabeled: ImageDataset) -> None:
        if labeled.size != unlabeled.size:
            raise ValueError(f"Labeled size {labeled.size} and unlabeled size {unlabeled.size} differ.")
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __len__(self) -> int:
        """Number of distinct (labeled, unlabeled) pairs."""
        return len(self.labeled) * len(self.unlabeled)

    def __getitem__(self, index: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor] | TrainItem:
        li, ui, *position = index
        image, mask, _, _ = self.labeled[li]
        unlabeled, _, _ = self.unlabeled[ui]
        if position:
            return image, mask, unlabeled, int(position[0])
        return image, mask, unlabeled


# --------------------------------------------------------------------------- compact batches
def _pin(x: Tensor | None) -> Tensor | None:
    return x.pin_memory() if x is not None else None


@dataclass
class CompactTrainBatch:
    """A training batch as the loader ships it: uint8, not yet augmented or normalised.

    ``positions`` holds each sample's global position in the training stream (plain ints, which stay
    on the host when the batch moves to the device); it keys the batch's random draws. ``None`` for
    batches that do not come from :class:`~gpcps_lightning.data.SemiSupervisedPairSampler`.

    Shape:
        - labeled: (N, 3, H, W) uint8
        - mask: (N, 1, H, W) uint8 in {0, 1}
        - unlabeled: (N, 3, H, W) uint8
        - positions: N ints, or ``None``
    """

    labeled: Tensor
    mask: Tensor
    unlabeled: Tensor
    positions: tuple[int, ...] | None = None

    def pin_memory(self) -> CompactTrainBatch:
        """Pinned copy (called by the DataLoader's ``pin_memory``)."""
        return CompactTrainBatch(
            self.labeled.pin_memory(), self.mask.pin_memory(), self.unlabeled.pin_memory(), self.positions
        )


@dataclass
class CompactEvaluationBatch:
    """An evaluation batch as the loader ships it (uint8).

    Shape:
        - image: (N, 3, H, W) uint8
        - mask: (N, 1, H, W) uint8 in {0, 1}
        - original_masks: N tensors (1, h_i, w_i) uint8 in {0, 1}, or ``None``
    """

    image: Tensor
    mask: Tensor
    original_masks: list[Tensor] | None = None
    names: list[str] = field(default_factory=list)

    def pin_memory(self) -> CompactEvaluationBatch:
        """Pinned copy (called by the DataLoader's ``pin_memory``)."""
        originals = [m.pin_memory() for m in self.original_masks] if self.original_masks is not None else None
        return CompactEvaluationBatch(self.image.pin_memory(), self.mask.pin_memory(), originals, self.names)


@dataclass
class CompactPredictionBatch:
    """A prediction batch as the loader ships it (uint8).

    Shape:
        - image: (N, 3, H, W) uint8
    """

    image: Tensor
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def pin_memory(self) -> CompactPredictionBatch:
        """Pinned copy (called by the DataLoader's ``pin_memory``)."""
        return CompactPredictionBatch(self.image.pin_memory(), self.original_sizes, self.names)


def collate_train(items: Sequence[tuple[Tensor, Tensor, Tensor] | TrainItem]) -> CompactTrainBatch:
    """Stack :class:`SemiSupervisedTrainDataset` items into a :class:`CompactTrainBatch`.

    The batch has ``positions`` when every item has one.
    """
    labeled = torch.stack([item[0] for item in items])
    mask = torch.stack([item[1] for item in items])
    unlabeled = torch.stack([item[2] for item in items])
    positions = tuple(item[3] for item in items if len(item) == 4)
    return CompactTrainBatch(labeled, mask, unlabeled, positions if len(positions) == len(items) else None)


def collate_evaluation(items: Sequence[tuple[Tensor, Tensor, Tensor | None, str]]) -> CompactEvaluationBatch:
    """Stack :class:`ImageMaskDataset` items into a :class:`CompactEvaluationBatch`."""
    images, masks, originals, names = zip(*items, strict=True)
    original_masks = None if any(o is None for o in originals) else list(originals)
    return CompactEvaluationBatch(torch.stack(images), torch.stack(masks), original_masks, list(names))


def collate_prediction(items: Sequence[tuple[Tensor, str, tuple[int, int]]]) -> CompactPredictionBatch:
    """Stack :class:`ImageDataset` items into a :class:`CompactPredictionBatch`."""
    images, names, sizes = zip(*items, strict=True)
    return CompactPredictionBatch(torch.stack(images), [tuple(s) for s in sizes], list(names))
