"""ST++ (Yang et al., CVPR 2022; official code LiheYoung/ST-PlusPlus) as six resumable stages.

"ST++: Make Self-training Work Better for Semi-supervised Semantic Segmentation", adapted to binary
segmentation on the library's networks, data and trainings (docs/baselines.md):

1. ``supervised``: :class:`~gpcps_lightning.SupervisedModule` on the labeled images (the datamodule given),
   with weights-only snapshots at 1/3, 2/3 and the end of training (the official ``epochs // 3``,
   ``epochs * 2 // 3``, ``epochs``) besides the best (validation) and last checkpoints.
2. ``reliability``: each unlabeled image's reliability, the mean foreground IoU between the two early
   snapshots' predictions and the final one's (:func:`reliability_scores`); the more stable half is
   reliable (:func:`select_reliable`). Written to ``reliability.json``.
3. ``pseudo_reliable``: the reliable images pseudo-labelled by stage 1's best checkpoint with test-time
   augmentation (:func:`~gpcps_lightning.inference.tta.tta_probabilities`), PNG masks at each image's
   original size, named after the image.
4. ``retrain_reliable``: a freshly initialised SupervisedModule on the labeled and the reliable
   pseudo-labelled pairs, which train through :class:`~gpcps_lightning.data.PseudoLabelDataModule` (a
   :class:`~gpcps_lightning.data.FolderDataModule` over a folder of links), the pseudo-labelled ones with
   ST++'s strong augmentation and its cutout boxes ignored by the loss.
5. ``pseudo_all``: the unreliable images pseudo-labelled by stage 4's best checkpoint (the official
   code; ``relabel="all"`` relabels every unlabeled image); ``masks/`` then holds every unlabeled image's
   pseudo-label.
6. ``retrain_all``: a freshly initialised SupervisedModule on the labeled and all pseudo-labelled pairs;
   its best checkpoint (selected on validation) is the result.

Every stage lives in ``<out_dir>/<k>_<name>/`` with a ``manifest.json``: its settings (those of the
training as the reproduction runner records them, the ST++ options it depends on, and the fingerprints
of the stages it reads), its artefacts with their sha256, and the time it took. A later call skips a
finished stage whose settings are the same and whose artefacts are unchanged, resumes an interrupted
training from its ``last.ckpt``, and refuses (naming the keys) a stage made with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from gpcps_lightning._utils import atomic_path, sha256_file
from gpcps_lightning._version import __version__
from gpcps_lightning.data.datamodule import SemiSupervisedDataModule
from gpcps_lightning.data.datasets import ImageDataset, ImageMaskPair, collate_prediction
from gpcps_lightning.data.io import preview_names
from gpcps_lightning.data.pseudo import PseudoLabelDataModule
from gpcps_lightning.data.splits import DataSplit
from gpcps_lightning.data.transforms import StrongAugmentation, normalize
from gpcps_lightning.inference.predict import load_module, resize_to_original
from gpcps_lightning.inference.tta import TTA_SCALES, tta_probabilities
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.methods.supervised import SupervisedModule
from gpcps_lightning.settings import jsonable, run_settings
from gpcps_lightning.training import TrainingSpec, build_trainer, selected_checkpoint

__all__ = [
    "STAGES",
    "STPPConfig",
    "STPPOptions",
    "STPPResult",
    "StageOutput",
    "StageResult",
    "foreground_iou",
    "pseudo_label_stage",
    "reliability_scores",
    "reliability_stage",
    "retrain_stage",
    "run_stpp",
    "select_reliable",
    "supervised_stage",
]

log = logging.getLogger(__name__)

#: The stages in order; stage ``k`` lives in ``<out_dir>/<k>_<name>``.
STAGES: tuple[str, ...] = (
    "supervised",
    "reliability",
    "pseudo_reliable",
    "retrain_reliable",
    "pseudo_all",
    "retrain_all",
)
_MANIFEST = "manifest.json"
_MANIFEST_SCHEMA = 1


# ============================================================================ reliability (pure)
def foreground_iou(a: Tensor, b: Tensor, empty: float = 0.0) -> Tensor:
    """IoU of the foregrounds of two binary masks, per image; ``empty`` where both are empty.

    The foreground IoU, not the mean over background and foreground that the official code's
    multi-class ``meanIOU`` would give for two classes: that mean is 1 for two empty predictions (the
    background agrees perfectly, the foreground is left out as 0 / 0), which would rank images where the
    models find nothing as the most reliable. Two empty masks agree on nothing to segment; ``empty``
    (default 0) says how reliable that is.

    Args:
        a: Binary masks (bool, or numbers compared with 0.5).
        b: Binary masks of the same images.
        empty: IoU of two empty masks.

    Returns:
        float64 IoUs in [0, 1].

    Raises:
        ValueError: If the shapes differ or are not (N, 1, H, W).

    Shape:
        - a, b: (N, 1, H, W)
        - output: (N,)
    """
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(
            f"`a` and `b` must be masks of one shape (N, 1, H, W), got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    fa = (a if a.dtype == torch.bool else a >= 0.5).flatten(1)
    fb = (b if b.dtype == torch.bool else b >= 0.5).flatten(1)
    intersection = (fa & fb).sum(1).double()
    union = (fa | fb).sum(1).double()
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.full_like(union, float(empty)))


def reliability_scores(early: Sequence[Tensor], final: Tensor, empty: float = 0.0) -> Tensor:
    """ST++'s reliability: the mean foreground IoU of each early prediction with the final one.

    Args:
        early: Binary predictions of the early checkpoints (ST++: at 1/3 and 2/3 of training).
        final: Binary predictions of the final checkpoint.
        empty: IoU of two empty masks (see :func:`foreground_iou`).

    Returns:
        float64 scores in [0, 1]; higher is more stable.

    Raises:
        ValueError: If ``early`` is empty or the shapes differ.

    Shape:
        - early: each (N, 1, H, W)
        - final: (N, 1, H, W)
        - output: (N,)
    """
    if not early:
        raise ValueError("`early` must hold at least one early checkpoint's predictions.")
    return torch.stack([foreground_iou(e, final, empty) for e in early]).mean(0)


def select_reliable(scores: Mapping[str, float], fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """Rank images by reliability (highest first, ties by name) and split off the most reliable ones.

    Args:
        scores: Reliability of each image, by name.
        fraction: Share of the images that is reliable: ``floor(n * fraction)`` of them (the official
            ``n // 2`` for 0.5), at least one.

    Returns:
        ``(reliable, unreliable)`` names, each in rank order.

    Raises:
        ValueError: If ``fraction`` is not in (0, 1] or there are no scores.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`reliable_fraction` must be in (0, 1], got {fraction!r}.")
    if not scores:
        raise ValueError("There are no reliability scores to rank (no unlabeled image).")
    order = sorted(scores, key=lambda name: (-float(scores[name]), name))
    k = max(1, math.floor(len(order) * fraction + 1e-9))
    return order[:k], order[k:]


# ============================================================================ options
@dataclass(frozen=True)
class STPPOptions:
    """ST++'s own options, with the official defaults.

    Args:
        reliable_fraction: Share of the unlabeled images selected as reliable (official: half).
        empty_iou: Foreground IoU of two empty predictions in the reliability score (see
            :func:`foreground_iou`); 0 ranks images where the checkpoints agree on finding nothing
            among the least reliable.
        tta_scales: Scales of the test-time augmentation of the pseudo-labels (official: 0.5 to 2).
        tta_flip: Also average over horizontal flips (official: yes).
        relabel: Which images stage 5 pseudo-labels with the retrained model: ``"unreliable"`` (the
            official code; the reliable ones keep their stage-3 labels) or ``"all"``.
        oversample_labeled: Repeat the labeled pairs ``ceil(pseudo / labeled)`` times in the retraining
            set, as the official ``SemiDataset`` does, so that about half the samples are labeled.
        strong_augmentation: Overrides of :class:`~gpcps_lightning.data.transforms.StrongAugmentation`'s
            arguments (its defaults are the official ones).

    Raises:
        ValueError: On an invalid option (the message names it).
    """

    reliable_fraction: float = 0.5
    empty_iou: float = 0.0
    tta_scales: tuple[float, ...] = TTA_SCALES
    tta_flip: bool = True
    relabel: Literal["unreliable", "all"] = "unreliable"
    oversample_labeled: bool = True
    strong_augmentation: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.reliable_fraction <= 1.0:
            raise ValueError(f"`reliable_fraction` must be in (0, 1], got {self.reliable_fraction!r}.")
        if not 0.0 <= self.empty_iou <= 1.0:
            raise ValueError(f"`empty_iou` must be in [0, 1], got {self.empty_iou!r}.")
        scales = tuple(float(s) for s in self.tta_scales)
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(
                f"`tta_scales` must be positive numbers (at least one), got {self.tta_scales!r}."
            )
        object.__setattr__(self, "tta_scales", scales)
        if self.relabel not in ("unreliable", "all"):
            raise ValueError(f"`relabel` must be 'unreliable' or 'all', got {self.relabel!r}.")
        strong = dict(self.strong_augmentation)
        try:
            StrongAugmentation(**strong)
        except TypeError as err:
            raise ValueError(
                "`strong_augmentation` takes the arguments of StrongAugmentation, got "
                f"{sorted(strong)} ({err})."
            ) from err
        object.__setattr__(self, "strong_augmentation", strong)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> STPPOptions:
        """The options of a mapping such as a config file's ``stpp:`` block.

        Raises:
            ValueError: On an unknown key (the allowed ones are listed) or an invalid value.
        """
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown ST++ option(s) {unknown}; the options are {known}.")
        if "tta_scales" in values:
            values["tta_scales"] = tuple(values["tta_scales"])
        return cls(**values)

    def settings(self) -> dict[str, Any]:
        """The options as flat ``stpp.<name>`` settings (JSON-compatible; the strong augmentation resolved).

        For a run record's settings, next to :func:`gpcps_lightning.settings.run_settings`.
        """
        values = jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        values["strong_augmentation"] = self.strong_augmentation_args()
        return {f"stpp.{k}": v for k, v in values.items()}

    def strong_augmentation_args(self) -> dict[str, Any]:
        """Every argument of the strong augmentation: its defaults, overridden by ``strong_augmentation``."""
        defaults = {
            name: param.default
            for name, param in inspect.signature(StrongAugmentation.__init__).parameters.items()
            if param.default is not inspect.Parameter.empty
        }
        return jsonable({**defaults, **self.strong_augmentation})


def _check_steps(max_steps: int | Sequence[int]) -> tuple[int, int, int]:
    steps = (max_steps,) * 3 if isinstance(max_steps, int) else tuple(max_steps)
    if (
        len(steps) != 3
        or any(isinstance(s, bool) or int(s) != s for s in steps)
        or steps[0] < 3
        or min(steps) < 1
    ):
        raise ValueError(
            "`max_steps` must be one integer or three (stages supervised, retrain_reliable, retrain_all), "
            f"the first at least 3 (its snapshots are at 1/3 and 2/3), got {max_steps!r}."
        )
    return int(steps[0]), int(steps[1]), int(steps[2])


@dataclass
class STPPConfig:
    """What one ST++ run needs: the data, the network, the training lengths and ST++'s options.

    Args:
        datamodule: The labeled/unlabeled/validation/test data (any library datamodule: Kvasir-SEG,
            a folder, the synthetic data). Stage 1 trains on it; the retrainings train on its labeled,
            validation and test pairs plus the pseudo-labelled unlabeled images, with its batch size,
            image size, normalisation, augmentation and seed.
        max_steps: Training steps of stages 1, 4 and 6: one integer for all three (as the official code,
            which trains each for the same number of epochs) or three.
        val_every: Validation interval in steps (selects each training's best checkpoint).
        module_args: Arguments of :class:`~gpcps_lightning.SupervisedModule` (network, optimizer,
            ``network_seed``); every training starts from the same fresh initialisation.
        precision: Trainer precision of the trainings (predictions run in float32).
        accelerator: Trainer accelerator; predictions run on the matching device.
        seed: Seed of ``lightning.seed_everything`` before each training.
        options: ST++'s options.
        progress_bar: Show Lightning's progress bar.

    Raises:
        TypeError: If ``datamodule`` is not a library datamodule.
        ValueError: On invalid steps, interval or module arguments.
    """

    datamodule: SemiSupervisedDataModule
    max_steps: int | Sequence[int]
    val_every: int
    module_args: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "32-true"
    accelerator: str = "auto"
    seed: int = 0
    options: STPPOptions = field(default_factory=STPPOptions)
    progress_bar: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.datamodule, SemiSupervisedDataModule):
            raise TypeError(
                "ST++ needs a gpcps_lightning datamodule (a SemiSupervisedDataModule such as "
                "KvasirSEGDataModule or FolderDataModule) for its split, got "
                f"{type(self.datamodule).__name__}."
            )
        self.stage_steps = _check_steps(self.max_steps)
        if isinstance(self.val_every, bool) or int(self.val_every) != self.val_every or self.val_every < 1:
            raise ValueError(f"`val_every` must be a positive integer, got {self.val_every!r}.")
        if self.val_every > min(self.stage_steps):
            raise ValueError(
                f"`val_every`={self.val_every} exceeds the shortest training ({min(self.stage_steps)} "
                "steps): that training would never validate, so it would have no best checkpoint."
            )
        if isinstance(self.options, Mapping):
            self.options = STPPOptions.from_mapping(self.options)
        self.module_args = dict(self.module_args)
        self.make_module()  # checks the arguments now rather than after the first stage

    def make_module(self) -> SupervisedModule:
        """A freshly initialised SupervisedModule with ``module_args``.

        Raises:
            ValueError: If SupervisedModule does not take the arguments.
        """
        try:
            return SupervisedModule(**self.module_args)
        except TypeError as err:
            raise ValueError(f"`module_args` are not SupervisedModule arguments: {err}.") from err

    def run_settings(self, max_steps: int) -> dict[str, Any]:
        """The settings of one of the three trainings, as the reproduction runner records a run's."""
        return run_settings(
            self.make_module(),
            self.datamodule,
            max_steps=max_steps,
            val_every=self.val_every,
            precision=self.precision,
        )

    def training(self, max_steps: int) -> TrainingSpec:
        """The Trainer settings of one of the three trainings."""
        return TrainingSpec(
            max_steps=max_steps,
            val_every=self.val_every,
            precision=self.precision,
            accelerator=self.accelerator,
            progress_bar=self.progress_bar,
        )

    @property
    def snapshot_steps(self) -> tuple[int, int, int]:
        """Steps of stage 1's snapshots: 1/3, 2/3 and the end (rounded down, as the official epochs)."""
        s = self.stage_steps[0]
        return (s // 3, 2 * s // 3, s)


# ============================================================================ results
@dataclass(frozen=True)
class StageResult:
    """One stage of a call to :func:`run_stpp`.

    Attributes:
        name: The stage (one of :data:`STAGES`).
        folder: Its folder.
        skipped: Whether a finished result was reused (nothing was computed).
        seconds: Time this call spent on the stage (checking and reusing it, when skipped).
        recorded_seconds: Time the stage took when it was computed (from its manifest; a resumed
            training's counts the part after the interruption only).
    """

    name: str
    folder: Path
    skipped: bool
    seconds: float
    recorded_seconds: float


@dataclass(frozen=True)
class STPPResult:
    """What :func:`run_stpp` produced.

    Attributes:
        checkpoint: The final model: stage 6's best checkpoint (a SupervisedModule checkpoint, selected
            on validation Dice), to test like any other run's.
        stages: The stages, in order.
        reliability: The reliability scores (``2_reliability/reliability.json``).
        pseudo_labels: The folder of every unlabeled image's final pseudo-label (``5_pseudo_all/masks``).
    """

    checkpoint: Path
    stages: tuple[StageResult, ...]
    reliability: Path
    pseudo_labels: Path

    @property
    def stage_seconds(self) -> dict[str, float]:
        """Time each stage took when it was computed, by name."""
        return {s.name: s.recorded_seconds for s in self.stages}

    @property
    def skipped(self) -> list[str]:
        """The stages this call reused."""
        return [s.name for s in self.stages if s.skipped]


# ============================================================================ manifests
def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:60]}…"


class _Stage:
    """One stage's folder and manifest."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.index = STAGES.index(name) + 1
        self.dir = out_dir / f"{self.index}_{name}"
        self.manifest_path = self.dir / _MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"ST++ stage {self.name!r}: {self.manifest_path} is not valid JSON ({err}); delete "
                f"{self.dir} to redo the stage."
            ) from err
        return data if isinstance(data, dict) else None

    def check(self, settings: Mapping[str, Any]) -> str | None:
        """``"done"`` (reusable), ``"started"`` (interrupted, same settings) or ``None`` (not started).

        Raises:
            ValueError: If the stage was made with other settings, or a finished stage's artefacts are
                missing or changed.
        """
        manifest = self.manifest()
        if manifest is None:
            return None
        recorded = manifest.get("settings") or {}
        current = jsonable(dict(settings))
        missing = object()
        differences = [
            f"{key}: {'absent' if recorded.get(key, missing) is missing else _show(recorded[key])} there, "
            f"{'absent' if current.get(key, missing) is missing else _show(current[key])} now"
            for key in sorted(set(recorded) | set(current))
            if recorded.get(key, missing) != current.get(key, missing)
        ]
        if differences:
            raise ValueError(
                f"ST++ stage {self.name!r} in {self.dir} was made with other settings than this call: "
                f"{'; '.join(differences)}. Pass another `out_dir` for these settings, or delete {self.dir} "
                "and the stages after it to redo them with these."
            )
        if manifest.get("status") != "done":
            return "started"
        for rel, digest in (manifest.get("artefacts") or {}).items():
            path = self.dir / rel
            if not path.is_file() or sha256_file(path) != digest:
                raise ValueError(
                    f"ST++ stage {self.name!r}: its artefact {path} is missing or was changed after the "
                    f"stage finished. Delete {self.dir} and the stages after it to redo them."
                )
        return "done"

    def _write(self, content: dict[str, Any]) -> None:
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")

    def start(self, settings: Mapping[str, Any], fresh: bool) -> None:
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write(
            {
                "schema": _MANIFEST_SCHEMA,
                "stage": self.name,
                "status": "started",
                "settings": jsonable(dict(settings)),
                "version": __version__,
            }
        )

    def finish(
        self,
        settings: Mapping[str, Any],
        artefacts: Sequence[Path],
        outputs: Mapping[str, Any],
        seconds: float,
    ) -> None:
        hashes = {p.relative_to(self.dir).as_posix(): sha256_file(p) for p in sorted(artefacts)}
        content = {
            "schema": _MANIFEST_SCHEMA,
            "stage": self.name,
            "status": "done",
            "settings": jsonable(dict(settings)),
            "artefacts": hashes,
            "outputs": jsonable(dict(outputs)),
            "seconds": round(float(seconds), 3),
            "version": __version__,
        }
        content["fingerprint"] = hashlib.sha256(
            json.dumps({"settings": content["settings"], "artefacts": hashes}, sort_keys=True).encode()
        ).hexdigest()[:16]
        self._write(content)

    def done_manifest(self) -> dict[str, Any]:
        manifest = self.manifest()
        assert manifest is not None and manifest.get("status") == "done"
        return manifest


# ============================================================================ training
class _Snapshots(L.Callback):
    """Weights-only checkpoints ``step<N>.ckpt`` once training reaches each of ``steps``."""

    def __init__(self, folder: Path, steps: Sequence[int]) -> None:
        self.folder = folder
        self.steps = tuple(steps)

    def path(self, step: int) -> Path:
        return self.folder / f"step{step}.ckpt"

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        # A resumed run redoes the steps after its last.ckpt: snapshots an interrupted run wrote there go.
        for step in self.steps:
            if step > trainer.global_step:
                self.path(step).unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        for step in self.steps:
            if trainer.global_step >= step and not self.path(step).exists():
                trainer.save_checkpoint(self.path(step), weights_only=True)


def _train(
    config: STPPConfig,
    stage_dir: Path,
    datamodule: SemiSupervisedDataModule,
    max_steps: int,
    resume: bool,
    snapshots: _Snapshots | None = None,
) -> Path:
    """Train a fresh SupervisedModule in ``stage_dir``; the best checkpoint's path."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = config.make_module()
    folder = stage_dir / "checkpoints"
    trainer, checkpoint = build_trainer(
        config.training(max_steps), stage_dir, callbacks=[snapshots] if snapshots is not None else []
    )
    last = folder / "last.ckpt"
    trainer.fit(module, datamodule, ckpt_path=str(last) if resume and last.is_file() else None)
    best = selected_checkpoint(checkpoint, stage_dir)
    # val_every <= max_steps (checked by STPPConfig): every training validates, so there is a best one.
    assert best is not None and best.is_file(), f"ST++ wrote no best checkpoint in {folder}."
    return best


# ============================================================================ prediction
def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def _output_stride(module: SegmentationModule) -> int:
    encoder = getattr(getattr(module, "net1", None), "encoder", None)
    return int(getattr(encoder, "output_stride", 1) or 1)


def _unlabeled_batches(
    source: SemiSupervisedDataModule, images: Mapping[str, Path], names: Sequence[str], device: torch.device
) -> Iterator[tuple[list[str], Tensor, list[tuple[int, int]]]]:
    """Batches of unlabeled images as the datamodule reads them: resized to its size and normalised."""
    dataset = ImageDataset([images[n] for n in names], image_size=source.image_size, names=list(names))
    loader = DataLoader(
        dataset,
        batch_size=source.batch_size,
        shuffle=False,
        num_workers=source.num_workers,
        collate_fn=collate_prediction,
    )
    for batch in loader:
        x = normalize(batch.image, source.mean, source.std).to(device)
        yield list(batch.names), x, [(int(h), int(w)) for h, w in batch.original_sizes]


def _load(path: Path, device: torch.device) -> SegmentationModule:
    return load_module(path).to(device).eval()


@torch.no_grad()
def _reliability(
    source: SemiSupervisedDataModule,
    images: Mapping[str, Path],
    snapshots: Sequence[Path],
    options: STPPOptions,
    device: torch.device,
) -> dict[str, Any]:
    models = [_load(p, device) for p in snapshots]
    per_image: dict[str, Any] = {}
    for names, x, _ in _unlabeled_batches(source, images, sorted(images), device):
        predictions = [m(x) >= m.threshold for m in models]
        ious = [foreground_iou(p, predictions[-1], options.empty_iou) for p in predictions[:-1]]
        scores = reliability_scores(predictions[:-1], predictions[-1], options.empty_iou)
        for i, name in enumerate(names):
            per_image[name] = {"score": float(scores[i]), "iou": [float(iou[i]) for iou in ious]}
    reliable, unreliable = select_reliable(
        {n: v["score"] for n, v in per_image.items()}, options.reliable_fraction
    )
    return {
        "definition": (
            "score = mean over the early snapshots of the foreground IoU between the snapshot's binary "
            "prediction and the final snapshot's; IoU of two empty predictions = empty_iou; ranked by "
            "score (descending), ties by name"
        ),
        "empty_iou": options.empty_iou,
        "reliable_fraction": options.reliable_fraction,
        "snapshots": [p.name for p in snapshots],
        "images": per_image,
        "reliable": reliable,
        "unreliable": unreliable,
    }


@torch.no_grad()
def _pseudo_label(
    source: SemiSupervisedDataModule,
    images: Mapping[str, Path],
    names: Sequence[str],
    checkpoint: Path,
    options: STPPOptions,
    folder: Path,
    device: torch.device,
) -> list[Path]:
    """Write ``<name>.png`` (0/255, at the image's original size) for each image; the files written."""
    module = _load(checkpoint, device)
    divisor = _output_stride(module)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for batch_names, x, sizes in _unlabeled_batches(source, images, names, device):
        probs = tta_probabilities(module, x, options.tta_scales, options.tta_flip, divisor)
        for name, p in zip(batch_names, resize_to_original(probs, sizes), strict=True):
            mask = (p >= module.threshold).cpu().numpy().astype(np.uint8) * np.uint8(255)
            path = folder / f"{name}.png"
            Image.fromarray(mask).save(path)
            written.append(path)
    return written


# ============================================================================ the training folder
def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(os.path.abspath(source), target)
    except OSError:  # no symlinks here (some Windows setups, some file systems): copy
        shutil.copy2(source, target)


def _unlabeled_images(split: DataSplit) -> dict[str, Path]:
    names = [p.stem for p in split.unlabeled]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"ST++ names each pseudo-label after its unlabeled image, but several unlabeled images share a "
            f"name: {preview_names(repeated)}. Rename them (the names must be unique)."
        )
    return dict(zip(names, split.unlabeled, strict=True))


def _write_training_folder(
    folder: Path,
    split: DataSplit,
    unlabeled: Mapping[str, Path],
    pseudo_masks: Mapping[str, Path],
    oversample: bool,
) -> dict[str, Any]:
    """A folder of links: labeled (repeated), pseudo-labelled, validation and test pairs, and split files.

    Returns:
        The :class:`PseudoLabelDataModule` arguments that read it.
    """
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("images", "masks", "unlabeled", "splits"):
        (folder / sub).mkdir(parents=True)
    repeats = math.ceil(len(pseudo_masks) / len(split.labeled)) if oversample and pseudo_masks else 1
    labeled = [
        ImageMaskPair(pair.name if k == 0 else f"{pair.name}__rep{k}", pair.image, pair.mask)
        for k in range(repeats)
        for pair in split.labeled
    ]
    pseudo = [ImageMaskPair(name, unlabeled[name], pseudo_masks[name]) for name in sorted(pseudo_masks)]
    pairs = labeled + pseudo + list(split.val) + list(split.test)
    names = [p.name for p in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            "ST++ puts the labeled, pseudo-labelled, validation and test pairs in one folder, but some names "
            f"occur in more than one of them: {preview_names(repeated)}. The names must be unique across the "
            "sets."
        )
    for pair in pairs:
        _link(pair.image, folder / "images" / f"{pair.name}{pair.image.suffix}")
        _link(pair.mask, folder / "masks" / f"{pair.name}{pair.mask.suffix}")
    for name, path in unlabeled.items():
        _link(path, folder / "unlabeled" / f"{name}{path.suffix}")
    files = {
        "train_split": [p.name for p in labeled + pseudo],
        "labeled_split": [p.name for p in labeled + pseudo],
        "val_split": [p.name for p in split.val],
        "test_split": [p.name for p in split.test],
        "strong_split": [p.name for p in pseudo],
    }
    kwargs: dict[str, Any] = {"root": str(folder), "unlabeled_dir": str(folder / "unlabeled")}
    for option, listed in files.items():
        if listed:
            path = folder / "splits" / f"{option.removesuffix('_split')}.txt"
            path.write_text("".join(f"{n}\n" for n in listed))
            kwargs[option] = str(path)
    return kwargs


#: SemiSupervisedDataModule arguments a retraining does not take from the source datamodule.
_NOT_INHERITED = ("self", "predict_dir")


def _retraining_datamodule(
    source: SemiSupervisedDataModule, folder_args: Mapping[str, Any], options: STPPOptions
) -> PseudoLabelDataModule:
    """The datamodule of a retraining: the written folder, with every other option of ``source``.

    Every argument of :class:`~gpcps_lightning.data.SemiSupervisedDataModule` but ``predict_dir`` is
    read from ``source`` by its name (the datamodule keeps each as an attribute), so an argument added to
    the base class reaches the retrainings without a change here.
    """
    shared = {}
    for name in inspect.signature(SemiSupervisedDataModule.__init__).parameters:
        if name in _NOT_INHERITED:
            continue
        if not hasattr(source, name):
            raise TypeError(
                f"ST++ retrains with every option of the source datamodule, but {type(source).__name__} "
                f"keeps no `{name}` attribute: keep each SemiSupervisedDataModule argument under its name."
            )
        shared[name] = getattr(source, name)
    datamodule = PseudoLabelDataModule(
        **folder_args, strong_augmentation=dict(options.strong_augmentation), **shared
    )
    # The weak augmentation is the source's own (a subclass may have changed it).
    datamodule.augmentation = source.augmentation
    return datamodule


# ============================================================================ the stages
@dataclass(frozen=True)
class StageOutput:
    """What a stage function made: the files to fingerprint, and what later stages read of it.

    Attributes:
        artefacts: The files the stage wrote (hashed into its manifest; a change makes it stale).
        outputs: JSON values later stages read, paths relative to the stage's folder.
    """

    artefacts: list[Path]
    outputs: dict[str, Any]


def supervised_stage(config: STPPConfig, folder: Path, resume: bool = False) -> StageOutput:
    """Stage 1: train on the labeled images, with weights-only snapshots at 1/3, 2/3 and the end.

    Args:
        config: The run.
        folder: The stage's folder (``checkpoints/`` and ``logs/`` go in it).
        resume: Resume from ``folder/checkpoints/last.ckpt``.

    Returns:
        The best checkpoint and the snapshots; outputs ``best`` and ``snapshots``.
    """
    snapshots = _Snapshots(folder / "checkpoints", config.snapshot_steps)
    best = _train(config, folder, config.datamodule, config.stage_steps[0], resume, snapshots)
    paths = [snapshots.path(s) for s in config.snapshot_steps]
    relative = [p.relative_to(folder).as_posix() for p in paths]
    return StageOutput([best, *paths], {"best": best.relative_to(folder).as_posix(), "snapshots": relative})


def reliability_stage(config: STPPConfig, folder: Path, snapshots: Sequence[Path]) -> StageOutput:
    """Stage 2: each unlabeled image's reliability under ``snapshots``, the final one last.

    Returns:
        ``reliability.json`` (scores, the reliable and the unreliable names); output ``reliability``.
    """
    source = config.datamodule
    scores = _reliability(
        source, _unlabeled_images(source.split), snapshots, config.options, _device(config.accelerator)
    )
    path = folder / "reliability.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(scores, indent=2) + "\n")
    return StageOutput([path], {"reliability": "reliability.json"})


def pseudo_label_stage(
    config: STPPConfig,
    folder: Path,
    checkpoint: Path,
    names: Sequence[str],
    keep: Mapping[str, Path] | None = None,
) -> StageOutput:
    """Stages 3 and 5: pseudo-label the unlabeled images ``names`` with ``checkpoint`` (and TTA).

    Args:
        config: The run.
        folder: The stage's folder; the masks go to ``folder/masks/<name>.png``.
        checkpoint: The model that labels.
        names: The unlabeled images to label.
        keep: Pseudo-labels made earlier, copied in beside the new ones (stage 5 keeps stage 3's).

    Returns:
        The masks; outputs ``masks`` (the folder) and ``relabelled`` (how many were labelled here).
    """
    source = config.datamodule
    masks = folder / "masks"
    unlabeled = _unlabeled_images(source.split)
    device = _device(config.accelerator)
    written = _pseudo_label(source, unlabeled, names, checkpoint, config.options, masks, device)
    for path in (keep or {}).values():
        shutil.copy2(path, masks / path.name)
        written.append(masks / path.name)
    return StageOutput(written, {"masks": "masks", "relabelled": len(names)})


def retrain_stage(
    config: STPPConfig, folder: Path, masks: Mapping[str, Path], max_steps: int, resume: bool = False
) -> StageOutput:
    """Stages 4 and 6: train a fresh network on the labeled and the pseudo-labelled images ``masks``.

    The training folder of links (``folder/data``) holds the labeled pairs (repeated, with
    ``oversample_labeled``), the pseudo-labelled ones, and the validation and test pairs; the
    pseudo-labelled ones train with ST++'s strong augmentation.

    Returns:
        The best checkpoint; outputs ``best`` and ``pseudo_labelled``.
    """
    source = config.datamodule
    folder_args = _write_training_folder(
        folder / "data",
        source.split,
        _unlabeled_images(source.split),
        masks,
        config.options.oversample_labeled,
    )
    datamodule = _retraining_datamodule(source, folder_args, config.options)
    best = _train(config, folder, datamodule, max_steps, resume)
    return StageOutput([best], {"best": best.relative_to(folder).as_posix(), "pseudo_labelled": len(masks)})


class _Stages:
    """The stages of one ``out_dir``: runs a stage function unless a finished result can be reused."""

    def __init__(self, out: Path) -> None:
        self.stages = {name: _Stage(out, name) for name in STAGES}
        _check_order(self.stages)
        self.results: list[StageResult] = []

    def dir(self, name: str) -> Path:
        return self.stages[name].dir

    def fingerprint(self, name: str) -> str:
        return str(self.stages[name].done_manifest()["fingerprint"])

    def output(self, name: str, key: str) -> Any:
        return self.stages[name].done_manifest()["outputs"][key]

    def path(self, name: str, key: str) -> Path:
        """A path output of a finished stage."""
        return self.dir(name) / self.output(name, key)

    def run(
        self,
        name: str,
        settings: dict[str, Any],
        compute: Callable[[Path, bool], StageOutput],
        training: bool = False,
    ) -> None:
        """Reuse ``name``'s finished result with ``settings``, or run ``compute(folder, resume)``."""
        stage = self.stages[name]
        clock = time.perf_counter()
        state = stage.check(settings)
        if state == "done":
            recorded = float(stage.done_manifest().get("seconds", 0.0))
            self.results.append(StageResult(name, stage.dir, True, time.perf_counter() - clock, recorded))
            log.info("ST++ stage %s: finished earlier, reused (%s)", name, stage.dir)
            return
        resume = training and state == "started" and (stage.dir / "checkpoints" / "last.ckpt").is_file()
        stage.start(settings, fresh=not resume)
        log.info("ST++ stage %s: %s (%s)", name, "resuming" if resume else "running", stage.dir)
        started = time.perf_counter()
        made = compute(stage.dir, resume)
        # rounded as the manifest keeps it, so that a later reuse of the stage reports the same
        seconds = round(time.perf_counter() - started, 3)
        stage.finish(settings, made.artefacts, made.outputs, seconds)
        self.results.append(StageResult(name, stage.dir, False, time.perf_counter() - clock, seconds))


# ============================================================================ the pipeline
def run_stpp(config: STPPConfig, out_dir: str | os.PathLike[str]) -> STPPResult:
    """Run ST++'s six stages in ``out_dir``, reusing those already finished with the same settings.

    See the module documentation for the stages and their artefacts; each is a function
    (:func:`supervised_stage`, :func:`reliability_stage`, :func:`pseudo_label_stage`,
    :func:`retrain_stage`), and this one decides which to run and with what.

    Args:
        config: The data, network, training lengths and options.
        out_dir: Folder of the stages (created).

    Returns:
        The final checkpoint, each stage's outcome and timings, and the reliability and pseudo-label paths.

    Raises:
        ValueError: If a stage in ``out_dir`` was made with other settings, or a finished stage's artefacts
            were changed, or a stage is missing while later ones exist (the message says which).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.datamodule.prepare_data()
    unlabeled = _unlabeled_images(config.datamodule.split)
    options = config.options
    stages = _Stages(out)
    s1, s4, s6 = config.stage_steps
    tta = {"stpp.tta_scales": list(options.tta_scales), "stpp.tta_flip": options.tta_flip}
    retrain = {
        "stpp.oversample_labeled": options.oversample_labeled,
        "stpp.strong_augmentation": options.strong_augmentation_args(),
    }

    # 1. supervised training with snapshots
    settings = {**config.run_settings(s1), "stpp.snapshot_steps": list(config.snapshot_steps)}
    stages.run("supervised", settings, lambda folder, resume: supervised_stage(config, folder, resume), True)
    # 2. reliability of each unlabeled image
    snapshots = [stages.dir("supervised") / rel for rel in stages.output("supervised", "snapshots")]
    settings = {
        "after.supervised": stages.fingerprint("supervised"),
        "stpp.empty_iou": options.empty_iou,
        "stpp.reliable_fraction": options.reliable_fraction,
    }
    stages.run("reliability", settings, lambda folder, _: reliability_stage(config, folder, snapshots))
    scores = json.loads(stages.path("reliability", "reliability").read_text())
    reliable, unreliable = list(scores["reliable"]), list(scores["unreliable"])
    # 3. pseudo-labels of the reliable images (stage 1's best model, with TTA)
    first = stages.path("supervised", "best")
    settings = {
        "after.supervised": stages.fingerprint("supervised"),
        "after.reliability": stages.fingerprint("reliability"),
        **tta,
    }
    stages.run(
        "pseudo_reliable", settings, lambda folder, _: pseudo_label_stage(config, folder, first, reliable)
    )
    # 4. retraining on the labeled and the reliable pseudo-labelled images
    reliable_masks = {n: stages.path("pseudo_reliable", "masks") / f"{n}.png" for n in reliable}
    settings = {
        **config.run_settings(s4),
        "after.pseudo_reliable": stages.fingerprint("pseudo_reliable"),
        **retrain,
    }
    stages.run(
        "retrain_reliable",
        settings,
        lambda folder, resume: retrain_stage(config, folder, reliable_masks, s4, resume),
        True,
    )
    # 5. pseudo-labels of the other (or all) unlabeled images by the retrained model
    second = stages.path("retrain_reliable", "best")
    relabel = sorted(unlabeled) if options.relabel == "all" else unreliable
    keep = reliable_masks if options.relabel == "unreliable" else None
    settings = {
        "after.retrain_reliable": stages.fingerprint("retrain_reliable"),
        "after.pseudo_reliable": stages.fingerprint("pseudo_reliable"),
        "after.reliability": stages.fingerprint("reliability"),
        "stpp.relabel": options.relabel,
        **tta,
    }
    stages.run(
        "pseudo_all", settings, lambda folder, _: pseudo_label_stage(config, folder, second, relabel, keep)
    )
    # 6. retraining on the labeled and all pseudo-labelled images
    all_masks = {n: stages.path("pseudo_all", "masks") / f"{n}.png" for n in unlabeled}
    settings = {**config.run_settings(s6), "after.pseudo_all": stages.fingerprint("pseudo_all"), **retrain}
    stages.run(
        "retrain_all",
        settings,
        lambda folder, resume: retrain_stage(config, folder, all_masks, s6, resume),
        True,
    )
    return STPPResult(
        checkpoint=stages.path("retrain_all", "best"),
        stages=tuple(stages.results),
        reliability=stages.path("reliability", "reliability"),
        pseudo_labels=stages.path("pseudo_all", "masks"),
    )


def _check_order(stages: Mapping[str, _Stage]) -> None:
    """Refuse an unfinished stage followed by stages that exist: those were made from another result."""
    for i, name in enumerate(STAGES):
        manifest = stages[name].manifest()
        if manifest is not None and manifest.get("status") == "done":
            continue
        later = [n for n in STAGES[i + 1 :] if stages[n].manifest_path.is_file()]
        if later:
            raise ValueError(
                f"ST++ stage {name!r} has no finished result in {stages[name].dir}, but later stages "
                f"({', '.join(later)}) have one: they were made from another {name!r} result and cannot be "
                "reused. Delete their folders too, or pass another `out_dir`."
            )
