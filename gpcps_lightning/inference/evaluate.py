"""Evaluate checkpoints on image/mask folders they were not trained on (CVC-ClinicDB, CVC-ColonDB, ...).

Every checkpoint is scored on every folder with the library's own evaluation: the folder is read as
:class:`~gpcps_lightning.data.FolderDataModule` reads its test set (``images/`` + ``masks/`` paired by file
stem, any format the data layer reads, resized to the checkpoint's training size and normalised with its
datamodule's mean/std), and each batch goes through the module's own test step, whose metrics (per-image
Dice and IoU at threshold 0.5 by default, at each mask's original size) are read back one image at a time.
So the mean of the per-image scores is the number ``gpcps test`` would report for the same images (with
the datamodules' default ``eval_at_original_size=True``).

An image whose prediction and mask are both empty has no Dice or IoU (0 / 0): as in validation and test,
it is left out of the means and recorded with ``None`` scores.

Command line::

    gpcps evaluate runs/a/best.ckpt runs/b/best.ckpt --folders data/CVC-ClinicDB data/CVC-ColonDB
    gpcps evaluate best.ckpt --folders data/CVC-ClinicDB --json external.json   # keeps every image's scores
    gpcps evaluate best.ckpt --folders data/ETIS-LaribPolypDB --head all --device cuda

Example:
    >>> from gpcps_lightning.inference.evaluate import evaluate_checkpoints
    >>> report = evaluate_checkpoints(["best.ckpt"], ["data/CVC-ClinicDB"])  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
    >>> report.save_json("external.json")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection

from gpcps_lightning._lightning_internals import attached_trainer
from gpcps_lightning._utils import atomic_path, traceback_requested
from gpcps_lightning._version import __version__
from gpcps_lightning.batch import EvaluationBatch
from gpcps_lightning.checkpointing import read_checkpoint
from gpcps_lightning.data.datasets import (
    ImageMaskDataset,
    ImageMaskPair,
    check_image_mask_pairs,
    collate_evaluation,
    pair_image_mask_folders,
)
from gpcps_lightning.data.transforms import normalize
from gpcps_lightning.inference.predict import (
    Preprocessing,
    add_checkpoint_arguments,
    load_module,
    parse_checkpoint_arguments,
)
from gpcps_lightning.methods.base import SegmentationModule, segmentation_metrics

__all__ = [
    "EvaluationReport",
    "FolderEvaluation",
    "ImageScore",
    "bootstrap_interval",
    "evaluate_checkpoints",
    "evaluate_module",
    "main",
    "read_evaluation_folder",
    "resolve_heads",
]

#: What ``head`` takes to evaluate every head of a module.
ALL_HEADS = "all"


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ImageScore:
    """Dice and IoU of one image, at its mask's original size.

    ``dice`` and ``iou`` are ``None`` when the prediction and the mask are both empty: the library's
    metric leaves such an image out of its means (0 / 0).
    """

    name: str
    dice: float | None
    iou: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


@dataclass(frozen=True)
class FolderEvaluation:
    """One head of one checkpoint on one folder: every image's scores and their summary.

    Args:
        checkpoint: The checkpoint path, as given.
        folder: The folder, as given.
        head: The evaluated head (``net1``, ``ensemble``, ``teacher``, ...).
        method: The module class that wrote the checkpoint (``GPCPSModule``, ...).
        threshold: Probability threshold of the binary predictions.
        image_size: Training size ``(height, width)`` the images were resized to.
        images: Per-image scores, sorted by name.
        dice_interval: Bootstrap interval of the mean Dice (see :func:`bootstrap_interval`), or ``None``
            when no image has a score.
    """

    checkpoint: str
    folder: str
    head: str
    method: str
    threshold: float
    image_size: tuple[int, int]
    images: tuple[ImageScore, ...]
    dice_interval: tuple[float, float] | None

    @property
    def n_images(self) -> int:
        """Number of images in the folder."""
        return len(self.images)

    @property
    def n_both_empty(self) -> int:
        """Images whose prediction and mask are both empty (left out of the means)."""
        return sum(s.dice is None for s in self.images)

    @property
    def mean_dice(self) -> float | None:
        """Mean Dice over the images that have one (the library's mDice), ``None`` if none has."""
        return _mean([s.dice for s in self.images])

    @property
    def mean_iou(self) -> float | None:
        """Mean IoU over the images that have one (the library's mIoU), ``None`` if none has."""
        return _mean([s.iou for s in self.images])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: the summary, then every image's ``name``, ``dice`` and ``iou``."""
        return {
            "checkpoint": self.checkpoint,
            "folder": self.folder,
            "head": self.head,
            "method": self.method,
            "threshold": self.threshold,
            "image_size": list(self.image_size),
            "n_images": self.n_images,
            "n_both_empty": self.n_both_empty,
            "mean_dice": self.mean_dice,
            "mean_iou": self.mean_iou,
            "dice_interval": None if self.dice_interval is None else list(self.dice_interval),
            "images": [{"name": s.name, "dice": s.dice, "iou": s.iou} for s in self.images],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FolderEvaluation:
        """Inverse of :meth:`to_dict` (the summary values are recomputed from the images)."""
        interval = data.get("dice_interval")
        h, w = data["image_size"]
        return cls(
            checkpoint=str(data["checkpoint"]),
            folder=str(data["folder"]),
            head=str(data["head"]),
            method=str(data["method"]),
            threshold=float(data["threshold"]),
            image_size=(int(h), int(w)),
            images=tuple(
                ImageScore(
                    str(s["name"]),
                    None if s["dice"] is None else float(s["dice"]),
                    None if s["iou"] is None else float(s["iou"]),
                )
                for s in data["images"]
            ),
            dice_interval=None if interval is None else (float(interval[0]), float(interval[1])),
        )


@dataclass(frozen=True)
class EvaluationReport:
    """Every (checkpoint, folder, head) evaluation of one call, with the bootstrap's settings.

    Args:
        results: The evaluations, checkpoint by checkpoint, folder by folder, head by head.
        resamples: Bootstrap resamples of each interval.
        confidence: Confidence level of the intervals.
        seed: Seed of the bootstrap.
        version: Version of gpcps_lightning that computed the scores.
    """

    results: tuple[FolderEvaluation, ...]
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    version: str = field(default=__version__)

    def to_markdown(self) -> str:
        """A markdown table, one row per result, and a line saying how the numbers were computed."""
        level = f"{self.confidence:.0%}"
        lines = [
            f"| checkpoint | folder | head | images | both empty | mean Dice | Dice {level} CI | mean IoU |",
            "|---|---|---|---:|---:|---:|---|---:|",
        ]
        for r in self.results:
            interval = (
                "n/a" if r.dice_interval is None else f"[{r.dice_interval[0]:.4f}, {r.dice_interval[1]:.4f}]"
            )
            lines.append(
                f"| {_cell(r.checkpoint)} | {_cell(r.folder)} | {r.head} | {r.n_images} | {r.n_both_empty} | "
                f"{_number(r.mean_dice)} | {interval} | {_number(r.mean_iou)} |"
            )
        thresholds = ", ".join(f"{t:g}" for t in sorted({r.threshold for r in self.results}))
        lines += [
            "",
            f"Per-image Dice and IoU at each mask's original size (threshold {thresholds}), as `gpcps test` "
            "computes them; images whose prediction and mask are both empty are left out of the means. "
            f"CI: percentile bootstrap over images, {self.resamples} resamples, seed {self.seed}.",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary holding every per-image score."""
        return {
            "gpcps_lightning": self.version,
            "bootstrap": {"resamples": self.resamples, "confidence": self.confidence, "seed": self.seed},
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict`."""
        bootstrap = data["bootstrap"]
        return cls(
            results=tuple(FolderEvaluation.from_dict(r) for r in data["results"]),
            resamples=int(bootstrap["resamples"]),
            confidence=float(bootstrap["confidence"]),
            seed=int(bootstrap["seed"]),
            version=str(data["gpcps_lightning"]),
        )

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (atomically; strict JSON: no NaN, ``null`` for missing scores)."""
        target = Path(path)
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return target

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> EvaluationReport:
        """Read what :meth:`save_json` wrote.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it is not an evaluation report.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Evaluation report {path} does not exist.")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is not an evaluation report written by `gpcps evaluate --json` ({err})."
            ) from err


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- statistics
def bootstrap_interval(
    values: Sequence[float] | np.ndarray, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling them with replacement).

    Args:
        values: The per-image scores (finite numbers; leave out images without a score).
        resamples: Number of bootstrap resamples.
        confidence: Confidence level, e.g. 0.95 for the 2.5 % and 97.5 % percentiles.
        seed: Seed of the resampling: the same values and seed give the same interval.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: If ``values`` is empty or not finite, ``resamples`` < 1, or ``confidence`` is not in
            (0, 1).
    """
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
        raise ValueError(
            f"`values` must be a non-empty sequence of finite numbers, got shape {a.shape}"
            f"{'' if a.size == 0 or np.isfinite(a).all() else ' with NaN or infinite values'}."
        )
    _check_bootstrap_options(resamples, confidence)
    rng = np.random.default_rng(seed)
    n, total = a.size, int(resamples)
    means = np.empty(total)
    chunk = max(1, 2_000_000 // n)  # bounds the index array's memory on large folders
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        means[start:stop] = a[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check_bootstrap_options(resamples: int, confidence: float) -> None:
    if isinstance(resamples, bool) or int(resamples) != resamples or resamples < 1:
        raise ValueError(f"`resamples` must be a positive integer, got {resamples!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")


# --------------------------------------------------------------------------- inputs
def read_evaluation_folder(folder: str | os.PathLike[str]) -> list[ImageMaskPair]:
    """The image/mask pairs of ``folder/images`` and ``folder/masks``, checked as the datamodules check them.

    Pairing and checks are :class:`~gpcps_lightning.data.FolderDataModule`'s: files are paired by stem
    (extensions may differ; jpg, jpeg, png, bmp, tif, tiff), every header is read, and an unpaired,
    unreadable or mis-sized file is an error that names it.

    Args:
        folder: A folder holding ``images/`` and ``masks/``.

    Returns:
        The pairs, sorted by name.

    Raises:
        FileNotFoundError: If the folder, or its ``images/`` or ``masks/`` folder, does not exist.
        ValueError: On an image without mask (or the reverse), an unsupported entry, an unreadable file or
            an image and mask of different sizes.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Evaluation folder {root} does not exist (or is not a folder). Give folders that hold "
            "images/ and masks/."
        )
    missing = [f"{name}/" for name in ("images", "masks") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Evaluation folder {root} has no {' and no '.join(missing)} folder. It must hold images/ and "
            "masks/, with one mask per image under the same file name (the extension may differ), as "
            "FolderDataModule reads them."
        )
    pairs = pair_image_mask_folders(root / "images", root / "masks")
    check_image_mask_pairs(pairs)
    return pairs


def resolve_heads(
    module: SegmentationModule | type[SegmentationModule], head: str | None = None
) -> tuple[str, ...]:
    """The heads to evaluate: ``head``, every head for ``"all"``, the module's selection head for ``None``.

    The selection head is the one checkpoints are selected on: ``ensemble`` for GP-CPS and CPS,
    ``teacher`` for Mean Teacher, ``net1`` for the supervised baseline.

    Args:
        module: The module, or its class (heads are class attributes).
        head: A head name, ``"all"`` or ``None``.

    Returns:
        The head names.

    Raises:
        ValueError: If ``head`` is not one of the module's heads nor ``"all"``.
    """
    cls = module if isinstance(module, type) else type(module)
    names = tuple(module.head_names)
    if head is None:
        return (module.selection_head,)
    if head == ALL_HEADS:
        return names
    if head not in names:
        raise ValueError(
            f"Unknown head {head!r} for {cls.__name__}, whose heads are {', '.join(names)}; "
            f"choose one of them or 'all' (default: its selection head, {module.selection_head!r})."
        )
    return (head,)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r} was asked for but CUDA is not available here; use 'cpu'.")
    return resolved


def _check_options(batch_size: int, threshold: float | None, num_workers: int) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}.")
    if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")


# --------------------------------------------------------------------------- scoring
class _PerImageMetrics(MetricCollection):
    """The library's evaluation metrics (:func:`segmentation_metrics`), computed on each update alone.

    Given original-size masks, the test step updates its metrics once per image, so each update's value
    is that image's score: NaN where the metric leaves the image out (prediction and mask both empty).
    """

    def __init__(self) -> None:
        super().__init__(dict(segmentation_metrics().items()), compute_groups=False)
        self.records: list[dict[str, float]] = []

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self.records.append({name: float(value) for name, value in super().compute().items()})
        self.reset()


@contextlib.contextmanager
def _scoring(
    module: SegmentationModule, threshold: float | None, device: torch.device
) -> Iterator[nn.ModuleDict]:
    """Swap the module's test metrics for per-image recorders; restore the module afterwards."""
    saved_metrics, saved_threshold = module.test_metrics, module.threshold
    saved_trainer = attached_trainer(module)
    was_training = module.training
    recorders = nn.ModuleDict({h: _PerImageMetrics() for h in module.head_names}).to(device)
    module.test_metrics = recorders
    if threshold is not None:
        module.threshold = threshold
    # Without a Trainer, the test step's self.log_dict only warns; with one (a module evaluated during a
    # run) it would log outside any loop.
    module.trainer = None
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*You are trying to `self\.log\(\)`")
            yield recorders
    finally:
        module.test_metrics = saved_metrics
        module.threshold = saved_threshold
        module.trainer = saved_trainer
        module.train(was_training)


@torch.no_grad()
def evaluate_module(
    module: SegmentationModule,
    pairs: Sequence[ImageMaskPair],
    preprocessing: Preprocessing,
    heads: str | Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, tuple[ImageScore, ...]]:
    """Per-image Dice and IoU of a module's heads on image/mask pairs, as its test step computes them.

    The images are read and resized as the datamodules read their test sets (``ImageMaskDataset`` with
    original-size masks), normalised with ``preprocessing``, and given to the module's test step; the
    module is left as it was (device aside: it is moved to ``device``).

    Args:
        module: The trained module.
        pairs: The image/mask files (see :func:`read_evaluation_folder`).
        preprocessing: The training size and normalisation of the module's datamodule.
        heads: Head names (or ``"all"``) to report; default: every head (all are computed anyway).
        threshold: Probability threshold (default: the module's ``threshold``).
        batch_size: Images per forward pass.
        device: Where to run (default: CUDA if available, else CPU).
        num_workers: DataLoader worker processes reading the files.

    Returns:
        ``{head: scores}``, the scores in the order of ``pairs``.

    Raises:
        ValueError: On an unknown head, a bad option, or a file that cannot be decoded (named).
    """
    _check_options(batch_size, threshold, num_workers)
    if heads is None:
        heads = [ALL_HEADS]
    elif isinstance(heads, str):
        heads = [heads]
    wanted = tuple(dict.fromkeys(h for name in heads for h in resolve_heads(module, name)))
    target = _device(device)
    module.to(target)
    dataset = ImageMaskDataset(pairs, preprocessing.image_size, original_masks=True)
    loader = DataLoader(
        dataset, batch_size=int(batch_size), collate_fn=collate_evaluation, num_workers=num_workers
    )
    with _scoring(module, threshold, target) as recorders:
        for compact in loader:
            assert compact.original_masks is not None  # the dataset was built with original_masks=True
            # What SemiSupervisedDataModule.make_evaluation_batch builds on the device.
            batch = EvaluationBatch(
                image=normalize(compact.image.to(target), preprocessing.mean, preprocessing.std),
                mask=compact.mask.to(target).float(),
                original_masks=[m.to(target).float() for m in compact.original_masks],
                names=list(compact.names),
            )
            module._evaluation_step(batch, "test")
        out = {}
        for head in wanted:
            recorder = recorders[head]
            assert isinstance(recorder, _PerImageMetrics)  # installed by _scoring
            records = recorder.records
            # One update per image is what makes a record an image's score.
            assert len(records) == len(pairs), f"{len(records)} metric updates for {len(pairs)} images"
            out[head] = tuple(
                ImageScore(pair.name, _score(r["dice"]), _score(r["iou"]))
                for pair, r in zip(pairs, records, strict=True)
            )
    return out


def _score(value: float) -> float | None:
    return None if math.isnan(value) else value


def evaluate_checkpoints(
    checkpoints: Sequence[str | os.PathLike[str]],
    folders: Sequence[str | os.PathLike[str]],
    head: str | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    threshold: float | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    model_class: type[SegmentationModule] | None = None,
    num_workers: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    verbose: bool = False,
) -> EvaluationReport:
    """Evaluate every checkpoint on every folder (see the module docstring for what is computed).

    Every input is checked before anything is computed: the checkpoint files exist, the folders hold
    paired, readable images and masks.

    Args:
        checkpoints: ``.ckpt`` files written by the library's modules.
        folders: Folders holding ``images/`` and ``masks/`` (paired by file stem).
        head: Head to evaluate; ``None``: each checkpoint's selection head (``ensemble`` for GP-CPS/CPS,
            ``teacher`` for Mean Teacher, ``net1`` for the supervised baseline); ``"all"``: every head.
        batch_size: Images per forward pass.
        device: Where to run (default: CUDA if available, else CPU).
        threshold: Probability threshold (default: each checkpoint's).
        image_size: Training size, for checkpoints that do not record their datamodule's.
        mean: Normalisation mean, likewise.
        std: Normalisation standard deviation, likewise.
        model_class: Module class, for checkpoints that do not record theirs.
        num_workers: DataLoader worker processes reading the files.
        resamples: Bootstrap resamples of the mean Dice's interval.
        confidence: Confidence level of the interval.
        seed: Seed of the bootstrap.
        verbose: Say on standard error which checkpoint and folder are being evaluated.

    Returns:
        The report: one :class:`FolderEvaluation` per checkpoint, folder and head, in that order.

    Raises:
        FileNotFoundError: If a checkpoint or folder (or its ``images/``/``masks/``) does not exist.
        ValueError: On an unreadable checkpoint or file, unpaired images, an unknown head or a bad option.
    """
    if not checkpoints:
        raise ValueError("Give at least one checkpoint to evaluate.")
    if not folders:
        raise ValueError("Give at least one folder (holding images/ and masks/) to evaluate on.")
    _check_options(batch_size, threshold, num_workers)
    _check_bootstrap_options(resamples, confidence)
    target = _device(device)
    for path in checkpoints:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"Checkpoint file not found: {os.fspath(path)}. Give the .ckpt files of trained runs "
                "(e.g. runs/quickstart/checkpoints/best.ckpt)."
            )
    folder_pairs = [(os.fspath(f), read_evaluation_folder(f)) for f in folders]
    results = []
    for path in checkpoints:
        name = os.fspath(path)
        ckpt = read_checkpoint(path, expected_class=model_class or SegmentationModule)
        preprocessing = Preprocessing.from_hparams(
            ckpt.get("datamodule_hyper_parameters"), image_size, mean, std, source=f"Checkpoint {name!r}"
        )
        module = load_module(ckpt, model_class)
        heads = resolve_heads(module, head)
        used_threshold = float(module.threshold if threshold is None else threshold)
        for folder, pairs in folder_pairs:
            if verbose:
                print(
                    f"gpcps evaluate: {name} on {folder} ({len(pairs)} images)", file=sys.stderr, flush=True
                )
            scores = evaluate_module(
                module, pairs, preprocessing, heads, threshold, batch_size, target, num_workers
            )
            for h in heads:
                dice = [s.dice for s in scores[h] if s.dice is not None]
                results.append(
                    FolderEvaluation(
                        checkpoint=name,
                        folder=folder,
                        head=h,
                        method=type(module).__name__,
                        threshold=used_threshold,
                        image_size=preprocessing.image_size,
                        images=scores[h],
                        dice_interval=bootstrap_interval(dice, resamples, confidence, seed) if dice else None,
                    )
                )
        del module
    return EvaluationReport(tuple(results), resamples=int(resamples), confidence=float(confidence), seed=seed)


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``gpcps evaluate``: evaluate checkpoints on image/mask folders; print a table, optionally write JSON.

    Args:
        argv: Arguments without the program name.

    Returns:
        The exit status: 0, or 2 on a bad input (the message on standard error).
    """
    parser = argparse.ArgumentParser(
        prog="gpcps evaluate",
        description="Evaluate checkpoints on image/mask folders they were not trained on (e.g. CVC-ClinicDB, "
        "CVC-ColonDB, ETIS-LaribPolypDB): per-image Dice and IoU at each mask's original size, as `gpcps "
        "test` computes them, at the checkpoint's training size and normalisation. Prints a markdown table "
        "with a bootstrap interval of the mean Dice; --json keeps every image's scores.",
    )
    parser.add_argument("checkpoints", nargs="+", help="The .ckpt files (e.g. runs/a/checkpoints/best.ckpt).")
    parser.add_argument(
        "--folders",
        nargs="+",
        required=True,
        help="Folders holding images/ and masks/ (paired by file stem; jpg, jpeg, png, bmp, tif, tiff).",
    )
    parser.add_argument(
        "--head",
        default=None,
        help="Head to evaluate (net1, net2, ensemble, teacher, student) or 'all' (default: the head each "
        "checkpoint was selected on: ensemble for GP-CPS/CPS, teacher for Mean Teacher, net1 supervised).",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Images per forward pass (default 8).")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)."
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="Probability threshold (default: the checkpoint's)."
    )
    parser.add_argument("--json", default=None, help="Write every per-image score to this JSON file.")
    parser.add_argument("--resamples", type=int, default=2000, help="Bootstrap resamples (default 2000).")
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="Confidence level of the interval (default 0.95)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap (default 0).")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader processes reading the files (default 0)."
    )
    add_checkpoint_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)

    model_class, size = parse_checkpoint_arguments(parser, args)
    try:
        report = evaluate_checkpoints(
            args.checkpoints,
            args.folders,
            args.head,
            batch_size=args.batch_size,
            device=args.device,
            threshold=args.threshold,
            image_size=size,
            mean=args.mean,
            std=args.std,
            model_class=model_class,
            num_workers=args.num_workers,
            resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
            verbose=True,
        )
    except (FileNotFoundError, ValueError) as err:
        if traceback_requested():  # GPCPS_TRACEBACK=1 or `gpcps --traceback evaluate ...`
            raise
        print(f"gpcps evaluate: error: {err}", file=sys.stderr)
        return 2
    print(report.to_markdown())
    if args.json:
        print(f"Per-image scores written to {report.save_json(args.json)}", file=sys.stderr)
    return 0
