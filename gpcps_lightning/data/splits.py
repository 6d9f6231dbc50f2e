"""Splits: which image/mask pairs a datamodule trains (labeled or not), validates and tests on.

Fraction splits are seeded permutations of the sorted names (so a split does not depend on the order files
are listed in), and labeled subsets are nested across fractions for one seed. Split files hold one file
stem per line. :class:`~gpcps_lightning.data.FolderDataModule` and the Kvasir-SEG datamodule build their
:class:`DataSplit` with these functions.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpcps_lightning.data.datasets import ImageMaskPair, pair_image_mask_folders
from gpcps_lightning.data.io import IMAGE_EXTENSIONS, list_image_files, preview_names

__all__ = ["DataSplit", "ratio_split", "read_split_file", "round_half_up", "split_folder"]


@dataclass
class DataSplit:
    """Which files a datamodule trains, validates and tests on.

    ``unlabeled`` holds image files only: their masks (where they exist) are never opened in training.
    ``unlabeled_pairs`` lists the image/mask pairs among them (the training pairs of a folder that the
    split leaves unlabeled; not the images of ``unlabeled_dir``): setup reads their headers, so that a
    folder is checked in full whatever the split.
    """

    labeled: list[ImageMaskPair]
    unlabeled: list[Path]
    val: list[ImageMaskPair]
    test: list[ImageMaskPair] = field(default_factory=list)
    unlabeled_pairs: list[ImageMaskPair] = field(default_factory=list)


def read_split_file(path: str | Path, option: str = "split file") -> list[str]:
    """Read a split file: one image name (file stem, no extension) per line.

    Blank lines and lines starting with ``#`` are ignored; surrounding whitespace is stripped, and a
    name given with an image extension is accepted as its stem.

    Args:
        path: The text file.
        option: The option that named the file, for error messages.

    Returns:
        The names, in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it lists no name or a name twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{option}`: the split file {path} does not exist.")
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stem, ext = os.path.splitext(line)
        names.append(stem if ext.lower() in IMAGE_EXTENSIONS else line)
    if not names:
        raise ValueError(f"`{option}`: the split file {path} lists no image names (one file stem per line).")
    seen: set[str] = set()
    repeated = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if repeated:
        raise ValueError(
            f"`{option}`: the split file {path} lists names more than once: {preview_names(repeated)}."
        )
    return names


def _check_names(names: Sequence[str], known: set[str], option: str, where: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"`{option}` lists {len(unknown)} name(s) that are not {where}: {preview_names(unknown)}. "
            "Split files hold file stems (no folder, no extension) of existing image/mask pairs."
        )


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest int, halves up: how fractions of an image count become counts.

    Python's ``round`` rounds half to even (``round(0.5) == 0``, ``round(2.5) == 2``); counts of images
    round half up (``0.5 -> 1``, ``2.5 -> 3``).
    """
    return math.floor(x + 0.5)


def _labeled_subset(train: Sequence[str], fraction: float, seed: int, what: str) -> list[str]:
    """The first ``round(fraction * n)`` names of a seeded permutation of ``sorted(train)`` (nested)."""
    ordered = sorted(train)
    k = round_half_up(fraction * len(ordered))
    if k < 1:
        raise ValueError(
            f"`labeled_fraction`={fraction} of the {len(ordered)} training images of {what} leaves no "
            f"labeled image; raise it to at least {1 / max(len(ordered), 1):.4g}."
        )
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in perm[:k]]


def ratio_split(
    names: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], ...]:
    """Split names into train/val/test by fractions of a seeded permutation of ``sorted(names)``.

    Returns:
        ``(train, val, test)`` name lists, each sorted.

    Raises:
        ValueError: If a requested set would be empty or nothing is left for training.
    """
    ordered = sorted(names)
    n = len(ordered)
    n_val, n_test = round_half_up(val_fraction * n), round_half_up(test_fraction * n)
    if val_fraction > 0 and n_val < 1:
        raise ValueError(
            f"`val_fraction`={val_fraction} of {n} images gives an empty validation set; raise it."
        )
    if test_fraction > 0 and n_test < 1:
        raise ValueError(f"`test_fraction`={test_fraction} of {n} images gives an empty test set; raise it.")
    if n - n_val - n_test < 1:
        raise ValueError(
            f"`val_fraction`={val_fraction} and `test_fraction`={test_fraction} leave no training image "
            f"of {n}."
        )
    perm = np.random.default_rng(seed).permutation(n)
    test = sorted(ordered[i] for i in perm[:n_test])
    val = sorted(ordered[i] for i in perm[n_test : n_test + n_val])
    train = sorted(ordered[i] for i in perm[n_test + n_val :])
    return train, val, test


def split_folder(
    root: str | Path,
    *,
    images_subdir: str = "images",
    masks_subdir: str = "masks",
    train_split: str | Path | None = None,
    val_split: str | Path | None = None,
    test_split: str | Path | None = None,
    labeled_split: str | Path | None = None,
    labeled_fraction: float = 0.125,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    unlabeled_dir: str | Path | None = None,
) -> DataSplit:
    """Pair an image/mask folder and split it (see :class:`FolderDataModule` for the options).

    Returns:
        The split; its lists are sorted by name (extra unlabeled images after the training ones).

    Raises:
        FileNotFoundError: If a folder or split file is missing.
        ValueError: On unpaired, duplicate or unknown names, overlapping split files, or fractions that
            leave a set empty.
    """
    root = Path(root)
    pairs = {p.name: p for p in pair_image_mask_folders(root / images_subdir, root / masks_subdir)}
    known = set(pairs)
    if train_split is not None and val_split is not None:
        train = read_split_file(train_split, "train_split")
        val = read_split_file(val_split, "val_split")
        test = read_split_file(test_split, "test_split") if test_split is not None else []
        where = f"image/mask pairs in {root}"
        _check_names(train, known, "train_split", where)
        _check_names(val, known, "val_split", where)
        _check_names(test, known, "test_split", where)
        for (a, na), (b, nb) in (
            (("train_split", train), ("val_split", val)),
            (("train_split", train), ("test_split", test)),
            (("val_split", val), ("test_split", test)),
        ):
            overlap = sorted(set(na) & set(nb))
            if overlap:
                raise ValueError(
                    f"`{a}` and `{b}` share {len(overlap)} name(s): {preview_names(overlap)}. "
                    "A name may be in one split only."
                )
        unused = sorted(known - set(train) - set(val) - set(test))
        if unused:
            warnings.warn(
                f"{len(unused)} image/mask pair(s) in {root} are in none of the split files and are not "
                f"used: {preview_names(unused)}.",
                stacklevel=3,
            )
    else:
        train, val, test = ratio_split(sorted(known), val_fraction, test_fraction, split_seed)
    if labeled_split is not None:
        labeled = read_split_file(labeled_split, "labeled_split")
        _check_names(labeled, set(train), "labeled_split", "in the training set")
    else:
        labeled = _labeled_subset(train, labeled_fraction, split_seed, str(root))
    labeled_set = set(labeled)
    unlabeled_pairs = [pairs[n] for n in sorted(train) if n not in labeled_set]
    unlabeled = [pair.image for pair in unlabeled_pairs]
    if unlabeled_dir is not None:
        unlabeled += list(list_image_files(Path(unlabeled_dir), "unlabeled images").values())
    if not unlabeled and labeled_split is not None:
        raise ValueError(
            f"`labeled_split` {labeled_split} lists all {len(train)} training images of {root}, which leaves "
            "no unlabeled image; remove some names from it or give `unlabeled_dir`."
        )
    if not unlabeled:
        raise ValueError(
            f"`labeled_fraction`={labeled_fraction} labels all {len(train)} training images of {root}, "
            "which leaves no unlabeled image; lower `labeled_fraction` or give `unlabeled_dir`."
        )
    return DataSplit(
        labeled=[pairs[n] for n in sorted(labeled)],
        unlabeled=unlabeled,
        val=[pairs[n] for n in sorted(val)],
        test=[pairs[n] for n in sorted(test)],
        unlabeled_pairs=unlabeled_pairs,
    )
