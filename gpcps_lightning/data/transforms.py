"""Device-side transforms: uint8 to float, augmentation (kornia) and normalisation.

They run in :meth:`SemiSupervisedDataModule.on_after_batch_transfer
<gpcps_lightning.data.SemiSupervisedDataModule.on_after_batch_transfer>`, on the accelerator, on whole
batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegmentationAugmentation",
    "StrongAugmentation",
    "cutout",
    "denormalize",
    "normalize",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _stats(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Map images to float and normalise them per channel.

    Args:
        images: uint8 images (values 0-255) or float images in [0, 1].
        mean: Per-channel mean, in [0, 1] units.
        std: Per-channel standard deviation, in [0, 1] units.

    Returns:
        float32 ``(images / 255 - mean) / std`` (without the division for float input).

    Shape:
        - images: (N, C, H, W)
        - output: (N, C, H, W)
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (x - _stats(mean, x)) / _stats(std, x)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Invert :func:`normalize`: ``images * std + mean`` (in [0, 1] for images that came from it).

    Shape:
        - images: (N, C, H, W) or (C, H, W)
        - output: same as ``images``
    """
    x = images.float()
    if x.ndim == 3:
        return (x[None] * _stats(std, x) + _stats(mean, x))[0]
    return x * _stats(std, x) + _stats(mean, x)


class SegmentationAugmentation(nn.Module):
    """Random augmentation of images (and masks) on the device, with kornia.

    Geometric transforms (flips, rotation, scaling, translation, shear) move an image and its mask
    together: both go through the same ``AugmentationSequential`` call with the same random parameters,
    masks with nearest-neighbour resampling, so they stay {0, 1} and aligned. Photometric transforms
    (brightness, contrast, saturation, hue, blur) change images only. Areas moved in from outside the
    image are black in images and background in masks.

    Args:
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip.
        affine: Probability of a random affine transform.
        degrees: Rotation range, ``[-degrees, degrees]``.
        translate: Largest translation as a fraction of the size.
        scale: Scale range.
        shear: Shear range in degrees, ``[-shear, shear]``.
        color: Probability of colour jitter.
        brightness: Colour jitter brightness strength.
        contrast: Colour jitter contrast strength.
        saturation: Colour jitter saturation strength.
        hue: Colour jitter hue strength (at most 0.5).
        blur: Probability of a light Gaussian blur.
    """

    def __init__(
        self,
        hflip: float = 0.5,
        vflip: float = 0.5,
        affine: float = 0.5,
        degrees: float = 45.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.8, 1.25),
        shear: float = 5.0,
        color: float = 0.8,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.03,
        blur: float = 0.1,
    ) -> None:
        super().__init__()
        for name, p in (
            ("hflip", hflip),
            ("vflip", vflip),
            ("affine", affine),
            ("color", color),
            ("blur", blur),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Probability `{name}` must be in [0, 1], got {p}.")
        self.geometric = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=hflip),
            K.RandomVerticalFlip(p=vflip),
            K.RandomAffine(
                degrees=degrees, translate=(translate, translate), scale=scale, shear=shear, p=affine
            ),
            data_keys=None,
        )
        self.photometric = K.AugmentationSequential(
            K.ColorJitter(brightness, contrast, saturation, hue, p=color),
            K.RandomGaussianBlur((3, 3), (0.1, 1.0), p=blur),
            data_keys=None,
        )

    def forward(self, images: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Augment a batch; masks, when given, get the images' geometric transform.

        Args:
            images: float images in [0, 1].
            masks: float masks in {0, 1}, or ``None``.

        Returns:
            ``(images, masks)`` augmented; images float in [0, 1], masks float in {0, 1} (or ``None``).

        Shape:
            - images: (N, 3, H, W)
            - masks: (N, 1, H, W)
        """
        if masks is None:
            images = self.geometric(images, data_keys=["input"])
        else:
            images, masks = self.geometric(images, masks, data_keys=["input", "mask"])
            masks = (masks > 0.5).to(images.dtype)
        images = self.photometric(images, data_keys=["input"]).clamp_(0.0, 1.0)
        return images, masks


def _check_range(
    name: str, value: Sequence[float], low: float, high: float | None = None
) -> tuple[float, float]:
    if len(value) != 2 or not low < value[0] <= value[1] or (high is not None and value[1] > high):
        bound = f"({low}, {high}]" if high is not None else f"({low}, inf)"
        raise ValueError(
            f"`{name}` must be a (min, max) pair with min <= max in {bound}, got {tuple(value)}."
        )
    return float(value[0]), float(value[1])


def cutout(
    images: Tensor,
    p: float = 0.5,
    area: Sequence[float] = (0.02, 0.4),
    ratio: Sequence[float] = (0.3, 1 / 0.3),
) -> tuple[Tensor, Tensor]:
    """ST++'s cutout: per image with probability ``p``, one box filled with uniform noise and ignored.

    As the official ``cutout``: the box's area is ``U(area) * H * W``, its aspect ratio ``h / w`` is
    ``U(ratio)``, its width ``int(sqrt(area / ratio))`` and height ``int(sqrt(area * ratio))``; its corner
    is uniform over the image, and the draw is repeated until the box fits. The box is filled with
    per-pixel, per-channel uniform noise, and ``valid`` is 0 there (the official code sets the mask to
    its ignore index 255). Draws come from torch's global CPU generator (the datamodule seeds it per
    batch, see :func:`gpcps_lightning.data.streams.seeded_rng`).

    Args:
        images: float images in [0, 1].
        p: Probability of a box per image.
        area: Range of the box's area as a fraction of the image.
        ratio: Range of the box's aspect ratio (height / width).

    Returns:
        ``(images, valid)``: the images with their boxes, and 1 outside the boxes, 0 inside.

    Raises:
        ValueError: On ``p`` outside [0, 1] or invalid ranges.

    Shape:
        - images: (N, C, H, W)
        - valid: (N, 1, H, W), the dtype of ``images``
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Probability `cutout` must be in [0, 1], got {p}.")
    a_min, a_max = _check_range("cutout_area", area, 0.0, 1.0)
    r_min, r_max = _check_range("cutout_ratio", ratio, 0.0)
    n, c, h, w = images.shape
    out = images.clone()
    valid = torch.ones(n, 1, h, w, dtype=images.dtype, device=images.device)
    chosen = torch.rand(n) < p
    for i in torch.nonzero(chosen).flatten().tolist():
        while True:
            size = (a_min + (a_max - a_min) * float(torch.rand(()))) * h * w
            aspect = r_min + (r_max - r_min) * float(torch.rand(()))
            box_w, box_h = int(math.sqrt(size / aspect)), int(math.sqrt(size * aspect))
            x, y = int(torch.randint(0, w, ())), int(torch.randint(0, h, ()))
            if x + box_w <= w and y + box_h <= h:
                break
        noise = torch.rand(c, box_h, box_w).to(device=images.device, dtype=images.dtype)
        out[i, :, y : y + box_h, x : x + box_w] = noise
        valid[i, :, y : y + box_h, x : x + box_w] = 0.0
    return out, valid


class StrongAugmentation(nn.Module):
    """ST++'s strong augmentation of pseudo-labelled images (photometric, then cutout), with kornia.

    Colour jitter (torchvision's formulas, random order) with probability ``color``, grayscale with
    probability ``grayscale``, Gaussian blur with sigma ``U(blur_sigma)`` with probability ``blur``, and
    :func:`cutout` with probability ``cutout``: the official ``semi.py`` sequence and defaults. Nothing
    here moves pixels, so the (pseudo) mask is unchanged; the cutout box is returned as an ignore region.

    Args:
        color: Probability of colour jitter.
        brightness: Colour jitter brightness strength.
        contrast: Colour jitter contrast strength.
        saturation: Colour jitter saturation strength.
        hue: Colour jitter hue strength (at most 0.5).
        grayscale: Probability of turning an image gray.
        blur: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's sigma in pixels (the kernel spans 3 sigma either side).
        cutout: Probability of a cutout box.
        cutout_area: Range of the box's area as a fraction of the image.
        cutout_ratio: Range of the box's aspect ratio.

    Raises:
        ValueError: On a probability outside [0, 1] or an invalid range.
    """

    def __init__(
        self,
        color: float = 0.8,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.25,
        grayscale: float = 0.2,
        blur: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        cutout: float = 0.5,
        cutout_area: Sequence[float] = (0.02, 0.4),
        cutout_ratio: Sequence[float] = (0.3, 1 / 0.3),
    ) -> None:
        super().__init__()
        for name, p in (("color", color), ("grayscale", grayscale), ("blur", blur), ("cutout", cutout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Probability `{name}` must be in [0, 1], got {p}.")
        sigma = _check_range("blur_sigma", blur_sigma, 0.0)
        self.cutout_p = float(cutout)
        self.cutout_area = _check_range("cutout_area", cutout_area, 0.0, 1.0)
        self.cutout_ratio = _check_range("cutout_ratio", cutout_ratio, 0.0)
        kernel = 2 * math.ceil(3 * sigma[1]) + 1
        self.photometric = K.AugmentationSequential(
            K.ColorJitter(brightness, contrast, saturation, hue, p=color),
            K.RandomGrayscale(p=grayscale),
            K.RandomGaussianBlur((kernel, kernel), sigma, p=blur),
            data_keys=None,
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Strongly augment a batch of images.

        Args:
            images: float images in [0, 1].

        Returns:
            ``(images, valid)``: augmented images in [0, 1], and 0 in the cutout boxes, 1 elsewhere.

        Shape:
            - images: (N, 3, H, W)
            - valid: (N, 1, H, W)
        """
        images = self.photometric(images, data_keys=["input"]).clamp(0.0, 1.0)
        return cutout(images, self.cutout_p, self.cutout_area, self.cutout_ratio)
