"""Segmentation networks from segmentation-models-pytorch, built reproducibly from a seed."""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

__all__ = ["build_network"]


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
