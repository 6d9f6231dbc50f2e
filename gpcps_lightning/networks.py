"""The networks, built reproducibly from a seed: segmentation networks and GCT's flaw detector.

- :func:`build_network`: any segmentation-models-pytorch architecture with one output channel, its
  encoder optionally loaded from smp's pretrained weights (``"imagenet"``) or from a local file
  (:func:`encoder_weights_path`, :func:`load_encoder_state_dict`).
- :class:`FlawDetector` (:func:`build_flaw_detector`): the fully convolutional flaw detector of GCT
  (Ke et al., ECCV 2020), which maps an image and a prediction of it to a map of the prediction's flaws.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Collection, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ENCODER_WEIGHTS_SUFFIXES",
    "FLAW_DETECTOR_MIN_SIZE",
    "FlawDetector",
    "IBNorm",
    "build_flaw_detector",
    "build_network",
    "encoder_weights_path",
    "load_encoder_state_dict",
    "load_encoder_weights",
    "skip_pretrained_weights",
]

#: The smallest image side GCT's flaw detector can reduce to a map; smaller inputs are enlarged to it.
FLAW_DETECTOR_MIN_SIZE = 60

#: File name endings that make an ``encoder_weights`` string a file path rather than an smp weights name.
ENCODER_WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")

#: How many missing / unexpected keys or mismatched shapes an error message lists.
_LISTED = 5

_SKIP_PRETRAINED: ContextVar[bool] = ContextVar("gpcps_skip_pretrained_weights", default=False)


@contextlib.contextmanager
def skip_pretrained_weights() -> Iterator[None]:
    """Build networks without pretrained encoder weights (names and files alike) inside this block.

    For networks that are about to receive trained weights from a checkpoint: the weights
    ``encoder_weights`` names would be overwritten anyway, so neither the file (which may not exist on
    the machine that loads the checkpoint) is read nor anything downloaded.
    :meth:`SegmentationModule.load_from_checkpoint
    <gpcps_lightning.methods.base.SegmentationModule.load_from_checkpoint>` and
    :func:`gpcps_lightning.inference.load_module` build their modules inside it.
    """
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def encoder_weights_path(encoder_weights: str | os.PathLike[str] | None) -> Path | None:
    """The file ``encoder_weights`` designates, or ``None`` if it is an smp weights name or ``None``.

    A string is a path if it contains a path separator (``/``, or the backslash on Windows), starts with
    ``~``, ends with one of :data:`ENCODER_WEIGHTS_SUFFIXES` (``.pth``, ``.pt``, ``.safetensors``,
    ``.bin``, ``.ckpt``; any case) or names an existing file; anything else (``"imagenet"``, ``"ssl"``,
    ...) is left to smp. The path is returned as given (``~`` expanded), whether or not it exists.
    """
    if encoder_weights is None:
        return None
    if not isinstance(encoder_weights, str):
        return Path(encoder_weights).expanduser()
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if (
        any(sep in encoder_weights for sep in separators)
        or encoder_weights.startswith("~")
        or encoder_weights.lower().endswith(ENCODER_WEIGHTS_SUFFIXES)
        or os.path.isfile(encoder_weights)
    ):
        return Path(encoder_weights).expanduser()
    return None


def _read_weights_file(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"Encoder weights file {path} is not a readable .safetensors file: {err}."
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"Encoder weights file {path} cannot be read with torch.load(..., weights_only=True): {err}. "
            "Save a plain state dict of tensors, e.g. torch.save(net.encoder.state_dict(), path), or a "
            ".safetensors file (safetensors.torch.save_file)."
        ) from err


def load_encoder_state_dict(
    path: str | os.PathLike[str], encoder_keys: Collection[str] | None = None
) -> dict[str, Tensor]:
    """The encoder's state dict in a weights file (``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``).

    ``.safetensors`` files are read with the ``safetensors`` package, others with
    ``torch.load(..., weights_only=True)`` (no code runs). The file holds a state dict (a mapping from
    names to tensors), or a dictionary whose ``"state_dict"`` entry is one (a Lightning checkpoint).
    The encoder's part of it is found by this rule:

    - a state dict whose keys are exactly ``encoder_keys`` is the encoder's, as it is;
    - otherwise keys with a component ``encoder`` (``encoder.conv1.weight``,
      ``net1.encoder.conv1.weight``, ...) belong to an encoder, and the prefix up to and including the
      first ``encoder.`` is stripped. If all such keys share one prefix, the stripped keys are the
      encoder's state dict and the other keys (``decoder.*``, ``segmentation_head.*``, ...) are left
      out: a whole network's ``state_dict()`` works as it is;
    - if no key has a component ``encoder``, the whole file is the encoder's state dict (as written by
      ``torch.save(net.encoder.state_dict(), path)``);
    - several prefixes (``net1.encoder.`` and ``net2.encoder.`` in a GP-CPS checkpoint,
      ``student.encoder.`` and ``teacher.encoder.`` in a Mean Teacher one) are ambiguous: an error
      lists them.

    Args:
        path: The weights file.
        encoder_keys: The keys of the encoder's own state dict, if known.

    Returns:
        The encoder's state dict (on the CPU), keys relative to the encoder (``network.encoder``).

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ValueError: If the file cannot be read, holds no state dict, or holds several encoders.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Encoder weights file not found: {path}. Give the path of an existing .pth/.pt/.safetensors "
            "file holding the encoder's state dict, or an smp weights name such as 'imagenet'."
        )
    data = _read_weights_file(path)
    nested = isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping)
    if nested:
        data = data["state_dict"]
    tensors = (
        {str(k): v for k, v in data.items() if isinstance(v, Tensor)} if isinstance(data, Mapping) else {}
    )
    if not tensors:
        raise ValueError(
            f"Encoder weights file {path} holds no state dict (a mapping from parameter names to tensors), "
            f"but {type(data).__name__}. Save one with torch.save(net.encoder.state_dict(), path)."
        )
    if encoder_keys is not None and set(tensors) == set(encoder_keys):
        return tensors
    prefixes: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if "encoder" in parts[:-1]:
            cut = parts.index("encoder") + 1
            prefixes.setdefault(".".join(parts[:cut]) + ".", {})[".".join(parts[cut:])] = value
    if not prefixes:
        return tensors
    if len(prefixes) > 1:
        found = sorted(prefixes)
        read = 'torch.load(path)["state_dict"]' if nested else "torch.load(path)"
        raise ValueError(
            f"Encoder weights file {path} holds several encoders, under the prefixes {found}: which one to "
            f"load is ambiguous. Save the one you want on its own, e.g. sd = {read}; "
            f"torch.save({{k.removeprefix({found[0]!r}): v for k, v in sd.items() "
            f"if k.startswith({found[0]!r})}}, 'encoder.pth'), and give that file."
        )
    return next(iter(prefixes.values()))


def load_encoder_weights(network: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the encoder's weights in ``path`` into ``network.encoder``, strictly.

    The encoder's part of the file is found as :func:`load_encoder_state_dict` describes; every key of
    the encoder must be there with its shape, and nothing else.

    Args:
        network: A segmentation-models-pytorch network (with an ``encoder`` submodule).
        path: The weights file.

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ValueError: If the file cannot be read, holds several encoders, or its keys or shapes do not
            match the encoder's (the first few are listed).
    """
    encoder = getattr(network, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"Cannot load encoder weights from {path}: {type(network).__name__} has no `encoder` submodule."
        )
    expected = encoder.state_dict()
    state = load_encoder_state_dict(path, encoder_keys=expected.keys())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)}, encoder {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{len(items)} {what} (first: {items[:_LISTED]})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mismatched shapes", mismatched),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"Encoder weights file {Path(path)} does not fit the encoder ({type(encoder).__name__}): "
            f"{'; '.join(problems)}. Give a file saved from the same encoder_name, in_channels and "
            "encoder_depth, e.g. torch.save(smp.create_model(arch, encoder_name=..., encoder_weights="
            "'imagenet', in_channels=..., encoder_depth=...).encoder.state_dict(), path), or set "
            "encoder_weights to null."
        )
    encoder.load_state_dict(state, strict=True)


def build_network(
    arch: str = "Unet",
    encoder_name: str = "resnet34",
    encoder_weights: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
    seed: int = 0,
    network_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a one-class segmentation network that outputs logits.

    The global random state is left untouched: the weights are initialised inside a forked RNG seeded
    with ``seed``, so two calls with different seeds give differently initialised networks and the
    same seed gives the same network.

    Encoder weights from a file: the network is built without pretrained weights (so the decoder and
    head are those of ``encoder_weights=None`` with the same seed), then the encoder's part of the file
    (:func:`load_encoder_state_dict`) is loaded into ``network.encoder`` strictly
    (:func:`load_encoder_weights`). Inside :func:`skip_pretrained_weights` ``encoder_weights`` is
    ignored.

    Args:
        arch: Any segmentation-models-pytorch architecture name (``"Unet"``, ``"UnetPlusPlus"``,
            ``"FPN"``, ``"DeepLabV3Plus"``, ...), case-insensitive.
        encoder_name: Encoder name as smp knows it (``"resnet34"``, ``"tu-<timm name>"``, ...).
        encoder_weights: Pretrained encoder weights: an smp weights name (``"imagenet"``, downloaded by
            smp), the path of a ``.pth``/``.pt``/``.safetensors`` file holding the encoder's or a whole
            network's state dict (:func:`encoder_weights_path` tells the two apart), or ``None`` for
            random init.
        in_channels: Number of input channels.
        seed: Seed of the random initialisation.
        network_kwargs: Further keyword arguments for ``smp.create_model`` (``encoder_depth``,
            ``decoder_channels``, ...).

    Returns:
        The network; ``net(x)`` maps (N, in_channels, H, W) to logits (N, 1, H, W).

    Raises:
        FileNotFoundError: If ``encoder_weights`` is a path and the file does not exist.
        ValueError: On an unknown architecture, encoder or weights name, bad sizes, or a weights file
            that does not fit the encoder.
    """
    if in_channels < 1:
        raise ValueError(f"`in_channels` must be at least 1, got {in_channels}.")
    kwargs = dict(network_kwargs or {})
    for reserved in ("arch", "encoder_name", "encoder_weights", "in_channels", "classes"):
        if reserved in kwargs:
            raise ValueError(
                f"`network_kwargs` must not contain {reserved!r}: it has an argument of its own."
            )
    if _SKIP_PRETRAINED.get():
        encoder_weights = None
    weights_file = encoder_weights_path(encoder_weights)
    if weights_file is not None and not weights_file.is_file():
        raise FileNotFoundError(
            f"Encoder weights file not found: {weights_file} (encoder_weights={str(encoder_weights)!r}). "
            "Give the path of an existing .pth/.pt/.safetensors file holding the encoder's state dict, "
            "an smp weights name such as 'imagenet', or null for random init."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            network = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=None if weights_file is not None else encoder_weights,
                in_channels=in_channels,
                classes=1,
                **kwargs,
            )
        except KeyError as err:
            if "pretrained weights" in str(err):
                raise ValueError(
                    f"segmentation-models-pytorch has no encoder_weights={encoder_weights!r} for "
                    f"encoder_name={encoder_name!r}: {err}. For weights in a local file, give its path "
                    f"(ending in {', '.join(ENCODER_WEIGHTS_SUFFIXES)} or containing a '/')."
                ) from err
            raise ValueError(
                "segmentation-models-pytorch does not know "
                f"arch={arch!r} with encoder_name={encoder_name!r}: {err}. "
                "See https://smp.readthedocs.io for the architectures and encoders it provides."
            ) from err
    if weights_file is not None:
        load_encoder_weights(network, weights_file)
    return network


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
