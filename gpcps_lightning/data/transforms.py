"""Device-side transforms: uint8 to float, augmentation (kornia) and normalisation.

They run in :meth:`SemiSupervisedDataModule.on_after_batch_transfer
<gpcps_lightning.data.SemiSupervisedDataModule.on_after_batch_transfer>`, on the accelerator, on whole
batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmentationAugmentation", "denormalize", "normalize"]

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
