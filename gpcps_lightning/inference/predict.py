"""Segment in-memory images with a trained module: masks come back at each image's original size.

The preprocessing is the datamodules' own code (:mod:`gpcps_lightning.data.io` for reading and resizing,
:func:`gpcps_lightning.data.transforms.normalize`), so an in-memory image gives the same network input as
the same image read from a folder. Its parameters are read from the checkpoint when the datamodule saved
its hyperparameters (the ``gpcps`` command and any datamodule that calls ``save_hyperparameters`` do);
otherwise they are given explicitly.

Example:
    >>> from gpcps_lightning.inference.predict import Segmenter
    >>> segmenter = Segmenter.from_checkpoint("runs/quickstart/checkpoints/best.ckpt")  # doctest: +SKIP
    >>> masks = segmenter([pil_image, numpy_image])  # doctest: +SKIP
    >>> masks[0].shape == (pil_image.height, pil_image.width)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gpcps_lightning._utils import import_object, public_class_path, resize_to_original_sizes, size_pair
from gpcps_lightning.checkpointing import CHECKPOINT_KEY, read_checkpoint
from gpcps_lightning.data.io import list_image_files, resize_image, to_rgb_uint8
from gpcps_lightning.data.transforms import normalize
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.networks import skip_pretrained_weights

__all__ = [
    "ImageLike",
    "Preprocessing",
    "Segmenter",
    "add_checkpoint_arguments",
    "list_images",
    "load_module",
    "parse_checkpoint_arguments",
    "preprocess",
    "resize_to_original",
    "to_rgb_array",
]

#: An image the prediction helpers accept: a PIL image (any mode) or a uint8 array (H, W, 3) or (H, W).
ImageLike = Image.Image | np.ndarray


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of a folder, sorted by name, checked as the datamodules check their folders.

    Hidden files are ignored; anything else without a supported extension (``IMAGE_EXTENSIONS`` of
    :mod:`gpcps_lightning.data.io`) is an error rather than being skipped.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If it holds no image, unsupported entries, or two images with the same stem.
    """
    return list(list_image_files(Path(folder), "images").values())


def _triple(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),) * 3
    if isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 3:
        return (float(values[0]), float(values[1]), float(values[2]))
    raise ValueError(f"`{name}` must be a number or three numbers (one per RGB channel), got {values!r}.")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--image-size``, ``--mean``, ``--std`` and ``--model-class``, for checkpoints that lack them."""
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        help="Training size H [W], for checkpoints that do not record it.",
    )
    parser.add_argument(
        "--mean", type=float, nargs=3, default=None, help="Normalisation mean, if not recorded."
    )
    parser.add_argument(
        "--std", type=float, nargs=3, default=None, help="Normalisation std, if not recorded."
    )
    parser.add_argument(
        "--model-class",
        default=None,
        help="Module class path if the checkpoint does not record it, e.g. gpcps_lightning.GPCPSModule.",
    )


def parse_checkpoint_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[type | None, int | list[int] | None]:
    """The module class named by ``--model-class`` (``None`` if not given) and ``--image-size`` as a size.

    Exits through ``parser.error`` when the class cannot be imported.
    """
    model_class = None
    if args.model_class:
        try:
            model_class = import_object(args.model_class)
        except ImportError as err:
            parser.error(
                f"--model-class {args.model_class!r} cannot be imported ({err}); give the full class path, "
                "e.g. gpcps_lightning.GPCPSModule."
            )
    size = args.image_size[0] if args.image_size and len(args.image_size) == 1 else args.image_size
    return model_class, size


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into network input: the datamodule's training size and normalisation.

    Args:
        image_size: Training size as ``(height, width)`` (an int means a square).
        mean: Per-channel mean of the normalisation, for images scaled to [0, 1].
        std: Per-channel standard deviation of the normalisation.

    Raises:
        ValueError: On a non-positive size or standard deviation, or a wrong number of values.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self, image_size: int | Sequence[int], mean: float | Sequence[float], std: float | Sequence[float]
    ) -> None:
        object.__setattr__(self, "image_size", size_pair(image_size))
        object.__setattr__(self, "mean", _triple(mean, "mean"))
        std3 = _triple(std, "std")
        if min(std3) <= 0:
            raise ValueError(f"`std` must be positive, got {std!r}.")
        object.__setattr__(self, "std", std3)

    @classmethod
    def from_hparams(
        cls,
        hparams: Mapping[str, Any] | None,
        image_size: int | Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        source: str = "the checkpoint",
    ) -> Preprocessing:
        """Take each parameter from the explicit argument, else from datamodule hyperparameters.

        Args:
            hparams: The datamodule's hyperparameters (``checkpoint["datamodule_hyper_parameters"]`` or
                ``datamodule.hparams``), or ``None``.
            image_size: Explicit training size; overrides ``hparams``.
            mean: Explicit normalisation mean; overrides ``hparams``.
            std: Explicit normalisation standard deviation; overrides ``hparams``.
            source: Where ``hparams`` came from, for the error message.

        Returns:
            The preprocessing.

        Raises:
            ValueError: If a parameter is neither given nor found in ``hparams``.
        """
        found = dict(hparams or {})
        values = {"image_size": image_size, "mean": mean, "std": std}
        missing = []
        for key, value in values.items():
            if value is None:
                values[key] = found.get(key)
            if values[key] is None:
                missing.append(key)
        if missing:
            raise ValueError(
                f"{source} does not record the datamodule's {', '.join(missing)} (the datamodule did not "
                "save "
                "its hyperparameters); pass them explicitly, with the values the model was trained with "
                "(e.g. image_size=256, mean=..., std=...)."
            )
        return cls(values["image_size"], values["mean"], values["std"])  # type: ignore[arg-type]

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> Preprocessing:
        """The preprocessing of a datamodule that has ``image_size``, ``mean`` and ``std`` attributes.

        Raises:
            ValueError: If the datamodule lacks one of them.
        """
        hparams = {k: getattr(datamodule, k, None) for k in ("image_size", "mean", "std")}
        return cls.from_hparams(hparams, source=type(datamodule).__name__)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Convert an image to a uint8 RGB array.

    PIL images of any mode are converted to RGB; arrays must be uint8 of shape (H, W) (grayscale,
    replicated to 3 channels), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped).

    Args:
        image: The image.

    Returns:
        Array of shape (H, W, 3), dtype uint8.

    Raises:
        TypeError: If ``image`` is neither a PIL image nor a numpy array, or the array is not uint8.
        ValueError: If the array has another shape or is empty.
    """
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, for torch.from_numpy
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
    if image.dtype != np.uint8:
        raise TypeError(
            f"Image arrays must be uint8 (0-255), got {image.dtype}; convert with "
            "(array * 255).round().astype(np.uint8) if it holds values in [0, 1]."
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or image.size == 0:
        raise ValueError(
            f"Image arrays must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}."
        )
    return np.array(to_rgb_uint8(image))  # a writable copy, for torch.from_numpy


def preprocess(
    images: Sequence[ImageLike], preprocessing: Preprocessing
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Turn images of any size into one normalised batch at the training size.

    Each image is resized to ``preprocessing.image_size`` and normalised with ``preprocessing.mean`` /
    ``std`` by the same functions the datamodules use.

    Args:
        images: The images (see :func:`to_rgb_array` for what is accepted).
        preprocessing: Training size and normalisation.

    Returns:
        The batch and each image's original ``(height, width)``.

    Raises:
        ValueError: If ``images`` is empty.

    Shape:
        - output: (N, 3, H, W), float32, with (H, W) = ``preprocessing.image_size``.
    """
    if len(images) == 0:
        raise ValueError("`images` is empty: give at least one image.")
    tensors, sizes = [], []
    for image in images:
        array = to_rgb_array(image)
        sizes.append((int(array.shape[0]), int(array.shape[1])))
        resized = np.ascontiguousarray(resize_image(array, preprocessing.image_size))
        tensors.append(torch.from_numpy(resized).permute(2, 0, 1))
    return normalize(torch.stack(tensors), preprocessing.mean, preprocessing.std), sizes


def resize_to_original(probabilities: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Resize probabilities (not binary masks) back to each image's original size.

    Args:
        probabilities: Foreground probabilities at the training size.
        sizes: Each image's original ``(height, width)``.

    Returns:
        One (h_i, w_i) float tensor per image.

    Raises:
        ValueError: If the number of sizes differs from the batch size.

    Shape:
        - probabilities: (N, 1, H, W)
    """
    if probabilities.ndim != 4 or probabilities.shape[1] != 1:
        raise ValueError(f"`probabilities` must have shape (N, 1, H, W), got {tuple(probabilities.shape)}.")
    return [p[0] for p in resize_to_original_sizes(probabilities.float(), sizes)]


def load_module(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    model_class: type[SegmentationModule] | None = None,
) -> SegmentationModule:
    """Build the module a checkpoint was trained with and load its weights (on the CPU, in eval mode).

    The class comes from the checkpoint: every module of the library records it (and so does a
    ``LightningCLI``); ``model_class`` overrides it.

    Args:
        checkpoint: Path of a ``.ckpt`` file or an already loaded checkpoint dictionary.
        model_class: The :class:`SegmentationModule` subclass to build (e.g. ``GPCPSModule``); needed
            only for a checkpoint that does not name its class.

    Returns:
        The module.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a Lightning checkpoint or names no class and ``model_class`` is missing.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        ckpt = read_checkpoint(checkpoint, expected_class=model_class or SegmentationModule)
    else:
        ckpt = dict(checkpoint)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None) or (ckpt.get(CHECKPOINT_KEY) or {}).get("class")
    if model_class is None and class_path is None:
        raise ValueError(
            "The checkpoint does not record which module class wrote it; pass the class, "
            "e.g. model_class=GPCPSModule."
        )
    cls = model_class or _checkpoint_class(public_class_path(str(class_path)))
    # The checkpoint's weights replace the pretrained ones: no weights file to read, nothing to download.
    with skip_pretrained_weights():
        module = cls(**hparams)
    if not isinstance(module, SegmentationModule):
        raise TypeError(
            f"Expected a SegmentationModule subclass, the checkpoint built {type(module).__name__}."
        )
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def _checkpoint_class(path: str) -> type:
    try:
        return import_object(path)
    except ImportError as err:
        raise ValueError(
            f"The checkpoint was written by {path}, which cannot be imported here ({err}); install the "
            "package that defines it or pass model_class=..."
        ) from err


class Segmenter:
    """Segment in-memory images with a trained :class:`SegmentationModule`.

    Args:
        module: The trained module (its predicting head is used: the ensemble for GP-CPS).
        preprocessing: Training size and normalisation of the datamodule it was trained with.
        threshold: Probability threshold of the binary masks; defaults to ``module.threshold``.
        device: Where to run (default: CUDA if available, else CPU).
        batch_size: Images per forward pass.

    Raises:
        ValueError: On a threshold outside (0, 1) or a batch size below 1.
    """

    def __init__(
        self,
        module: SegmentationModule,
        preprocessing: Preprocessing,
        threshold: float | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
    ) -> None:
        self.threshold = float(getattr(module, "threshold", 0.5) if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {self.threshold}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = module.to(self.device).eval()
        self.preprocessing = preprocessing
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        image_size: int | Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        model_class: type[SegmentationModule] | None = None,
        **kwargs: Any,
    ) -> Segmenter:
        """Load a checkpoint and take the preprocessing from it (explicit arguments override it).

        Args:
            path: The ``.ckpt`` file.
            image_size: Training size, needed if the checkpoint holds no datamodule hyperparameters.
            mean: Normalisation mean, likewise.
            std: Normalisation standard deviation, likewise.
            model_class: Module class, needed if the checkpoint does not name it (see :func:`load_module`).
            **kwargs: ``threshold``, ``device``, ``batch_size`` of :class:`Segmenter`.

        Returns:
            The segmenter.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the checkpoint is unreadable or lacks what is not given explicitly.
        """
        ckpt = read_checkpoint(path, expected_class=model_class or SegmentationModule)
        preprocessing = Preprocessing.from_hparams(
            ckpt.get("datamodule_hyper_parameters"),
            image_size,
            mean,
            std,
            source=f"Checkpoint {os.fspath(path)!r}",
        )
        return cls(load_module(ckpt, model_class), preprocessing, **kwargs)

    @torch.no_grad()
    def predict_probabilities(self, images: Sequence[ImageLike] | ImageLike) -> list[np.ndarray]:
        """Foreground probabilities of each image at its original size.

        Args:
            images: One image or a sequence of images of any sizes.

        Returns:
            One float32 array (h_i, w_i) in [0, 1] per image.
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x, sizes = preprocess(chunk, self.preprocessing)
            probs = self.module(x.to(self.device))
            out.extend(p.cpu().numpy() for p in resize_to_original(probs, sizes))
        return out

    def __call__(self, images: Sequence[ImageLike] | ImageLike) -> list[np.ndarray]:
        """Binary masks of each image at its original size.

        Args:
            images: One image or a sequence of images of any sizes.

        Returns:
            One bool array (h_i, w_i) per image: ``probability >= threshold``.
        """
        return [p >= self.threshold for p in self.predict_probabilities(images)]
