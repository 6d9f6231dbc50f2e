"""The networks, built reproducibly from a seed: segmentation networks and GCT's flaw detector.

- :func:`build_network`: any segmentation-models-pytorch architecture with one output channel.
- :class:`FlawDetector` (:func:`build_flaw_detector`): the fully convolutional flaw detector of GCT
  (Ke et al., ECCV 2020), which maps an image and a prediction of it to a map of the prediction's flaws.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FLAW_DETECTOR_MIN_SIZE", "FlawDetector", "IBNorm", "build_flaw_detector", "build_network"]

#: The smallest image side GCT's flaw detector can reduce to a map; smaller inputs are enlarged to it.
FLAW_DETECTOR_MIN_SIZE = 60


def build_network(
    arch: str = "Unet",
    encoder_name: str = "resnet34",
    encoder_weights: str | None = None,
    in_channels: int = 3,
    seed: int = 0,
    network_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a one-class segmentation network that outputs logits.

    The global random state is left untouched: the weights are initialised inside a forked RNG seeded
    with ``seed``, so two calls with different seeds give differently initialised networks and the
    same seed gives the same network.

    Args:
        arch: Any segmentation-models-pytorch architecture name (``"Unet"``, ``"UnetPlusPlus"``,
            ``"FPN"``, ``"DeepLabV3Plus"``, ...), case-insensitive.
        encoder_name: Encoder name as smp knows it (``"resnet34"``, ``"tu-<timm name>"``, ...).
        encoder_weights: Pretrained weights to load (``"imagenet"``) or ``None`` for random init.
        in_channels: Number of input channels.
        seed: Seed of the random initialisation.
        network_kwargs: Further keyword arguments for ``smp.create_model`` (``encoder_depth``,
            ``decoder_channels``, ...).

    Returns:
        The network; ``net(x)`` maps (N, in_channels, H, W) to logits (N, 1, H, W).

    Raises:
        ValueError: On an unknown architecture or encoder, or bad sizes.
    """
    if in_channels < 1:
        raise ValueError(f"`in_channels` must be at least 1, got {in_channels}.")
    kwargs = dict(network_kwargs or {})
    for reserved in ("arch", "encoder_name", "encoder_weights", "in_channels", "classes"):
        if reserved in kwargs:
            raise ValueError(
                f"`network_kwargs` must not contain {reserved!r}: it has an argument of its own."
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                in_channels=in_channels,
                classes=1,
                **kwargs,
            )
        except KeyError as err:
            raise ValueError(
                "segmentation-models-pytorch does not know "
                f"arch={arch!r} with encoder_name={encoder_name!r}: {err}. "
                "See https://smp.readthedocs.io for the architectures and encoders it provides."
            ) from err


class IBNorm(nn.Module):
    """Batch norm on the first half of the channels, instance norm on the rest (GCT's flaw detector).

    As in the official code (``IBNorm`` of PixelSSL's ``ssl_gct.py``): the batch-norm part has
    ``int(num_features * split + 0.5)`` channels and an affine transform, the instance-norm part none.

    Args:
        num_features: Channels of the input.
        split: Share of the channels that batch norm normalises.

    Shape:
        - input, output: (N, num_features, H, W)
    """

    def __init__(self, num_features: int, split: float = 0.5) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_bn = int(num_features * split + 0.5)
        self.bnorm = nn.BatchNorm2d(self.num_bn, affine=True)
        self.inorm = nn.InstanceNorm2d(num_features - self.num_bn, affine=False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if self.num_bn == self.num_features:
            return self.bnorm(x)
        return torch.cat([self.bnorm(x[:, : self.num_bn]), self.inorm(x[:, self.num_bn :])], dim=1)


class FlawDetector(nn.Module):
    """GCT's flaw detector: the flaws of a prediction, from the image and the prediction.

    The official architecture (``FlawDetector`` of PixelSSL's ``ssl_gct.py``): over the concatenation
    ``[image, probabilities]``, five 4x4 stride-2 convolutions (the last one, to one channel, is the
    classifier) with three 4x4 stride-1 convolutions after the second, third and fourth; each but the
    classifier is followed by :class:`IBNorm` and a LeakyReLU of slope 0.2. The one-channel output, not
    activated, is resized bilinearly (``align_corners=True``) to the image size.

    The layers reduce a side of ``n`` pixels to :meth:`map_size` cells, about ``n / 32``: 7 at 256 px,
    9 at the official 321 px, 1 at 64 px, where the map is one value per image. An input with a side
    below ``min_size`` is enlarged bilinearly to it first (the output still has the image's size), so
    ``min_size`` sets the map's coarsest grid. Its smallest value, :data:`FLAW_DETECTOR_MIN_SIZE` (60),
    is what the layers need at all (instance norm needs 2 cells before the classifier).

    Args:
        in_channels: Channels of ``[image, probabilities]``: the image's channels plus one.
        base_channels: Channels of the first convolution (doubled at each stride-2 step up to 8x).
        min_size: Enlarge inputs with a smaller side to this side.

    Raises:
        ValueError: If ``min_size`` is below :data:`FLAW_DETECTOR_MIN_SIZE`.

    Shape:
        - images: (N, C, H, W)
        - probs: (N, 1, H, W), the prediction's foreground probabilities
        - output: (N, 1, H, W), the flaw map (regressed towards values in [0, 1])
    """

    def __init__(
        self, in_channels: int, base_channels: int = 64, min_size: int = FLAW_DETECTOR_MIN_SIZE
    ) -> None:
        super().__init__()
        if min_size < FLAW_DETECTOR_MIN_SIZE:
            raise ValueError(
                f"`min_size` of the flaw detector must be at least {FLAW_DETECTOR_MIN_SIZE}, got {min_size}."
            )
        self.min_size = min_size
        ndf = base_channels
        self.conv1 = nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1)
        self.ibn1 = IBNorm(ndf)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
        self.ibn2 = IBNorm(ndf * 2)
        self.conv2_1 = nn.Conv2d(ndf * 2, ndf * 2, kernel_size=4, stride=1, padding=1)
        self.ibn2_1 = IBNorm(ndf * 2)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
        self.ibn3 = IBNorm(ndf * 4)
        self.conv3_1 = nn.Conv2d(ndf * 4, ndf * 4, kernel_size=4, stride=1, padding=1)
        self.ibn3_1 = IBNorm(ndf * 4)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
        self.ibn4 = IBNorm(ndf * 8)
        self.conv4_1 = nn.Conv2d(ndf * 8, ndf * 8, kernel_size=4, stride=1, padding=1)
        self.ibn4_1 = IBNorm(ndf * 8)
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """Cells of the map the classifier outputs for an image of ``height`` x ``width`` pixels."""

        def cells(n: int) -> int:
            n = max(n, self.min_size)
            for stride in (2, 2, 1, 2, 1, 2, 1, 2):  # 4x4 kernels, padding 1
                n = (n - 2) // stride + 1
            return n

        return cells(height), cells(width)

    def forward(self, images: Tensor, probs: Tensor) -> Tensor:  # noqa: D102
        height, width = images.shape[-2:]
        x = torch.cat([images, probs], dim=1)
        if height < self.min_size or width < self.min_size:
            size = (max(height, self.min_size), max(width, self.min_size))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for conv, norm in (
            (self.conv1, self.ibn1),
            (self.conv2, self.ibn2),
            (self.conv2_1, self.ibn2_1),
            (self.conv3, self.ibn3),
            (self.conv3_1, self.ibn3_1),
            (self.conv4, self.ibn4),
            (self.conv4_1, self.ibn4_1),
        ):
            x = self.leaky_relu(norm(conv(x)))
        x = self.classifier(x)
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)


def build_flaw_detector(
    in_channels: int = 4, seed: int = 0, channels: int = 64, min_size: int = FLAW_DETECTOR_MIN_SIZE
) -> FlawDetector:
    """Build GCT's :class:`FlawDetector`, initialised from ``seed`` (the global random state is untouched).

    Args:
        in_channels: The image's channels plus one (the probability map).
        seed: Seed of the (PyTorch default) random initialisation.
        channels: Channels of the first convolution (the official 64).
        min_size: Enlarge inputs with a smaller side to this side (see :class:`FlawDetector`).

    Returns:
        The flaw detector; ``fd(images, probs)`` maps (N, in_channels - 1, H, W) and (N, 1, H, W) to the
        flaw map (N, 1, H, W).

    Raises:
        ValueError: If ``in_channels`` is below 2 or ``min_size`` below :data:`FLAW_DETECTOR_MIN_SIZE`.
    """
    if in_channels < 2:
        raise ValueError(
            f"`in_channels` of the flaw detector must be at least 2 (image channels + 1), got {in_channels}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FlawDetector(in_channels, base_channels=channels, min_size=min_size)
