"""The batch structures every module and datamodule of the library exchange.

They are plain dataclasses of tensors, so Lightning moves them to the device as they are
(``lightning_utilities.apply_to_collection`` understands dataclasses) and a user's own datamodule
can build them without importing anything else from the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["EvaluationBatch", "PredictionBatch", "SemiSupervisedBatch"]


def _check_image(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(f"`{name}` must have shape (N, C, H, W), got {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {x.dtype}.")


@dataclass
class SemiSupervisedBatch:
    """One training step's data: a labeled batch, an unlabeled batch and, optionally, their fusion.

    ``eps`` alone: the fusion weights the method fuses with (the library's datamodules draw them, so
    that every method sees the same ones). ``fused`` and ``eps``: a datamodule that fuses on its own.
    Neither: the method draws ``eps`` and fuses (see :func:`gpcps_lightning.losses.fuse_images`).

    ``valid`` marks where ``mask`` is a label (1) and where it is to be ignored (0): the cutout regions
    of ST++'s strong augmentation (:class:`~gpcps_lightning.data.PseudoLabelDataModule`). ``None``: every
    pixel is a label. Only modules that declare ``accepts_ignore_regions``
    (:class:`~gpcps_lightning.SupervisedModule`) train on batches with ignore regions; the others refuse
    them rather than train on the ignored pixels.

    Shape:
        - labeled: (N, C, H, W), float, normalised as the networks see it.
        - mask: (N, 1, H, W), float in {0, 1}, the labels of ``labeled``.
        - unlabeled: (N, C, H, W), float; its labels are never part of the batch.
        - fused: (N, C, H, W) or ``None``.
        - eps: (N, 1, 1, 1) or ``None``, the weight of the labeled image in ``fused``.
        - valid: (N, 1, H, W), float in {0, 1}, or ``None``.
    """

    labeled: Tensor
    mask: Tensor
    unlabeled: Tensor
    fused: Tensor | None = None
    eps: Tensor | None = None
    valid: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of labeled (equally, unlabeled) images in the batch."""
        return int(self.labeled.shape[0])

    def validate(self) -> None:
        """Check shapes and dtypes.

        Raises:
            TypeError: If a field is not a tensor.
            ValueError: If shapes or dtypes do not match the documented ones.
        """
        _check_image("labeled", self.labeled)
        _check_image("unlabeled", self.unlabeled)
        _check_image("mask", self.mask)
        n, _, h, w = self.labeled.shape
        if self.unlabeled.shape != self.labeled.shape:
            raise ValueError(
                "`labeled` and `unlabeled` must have the same shape to be fused, got "
                f"{tuple(self.labeled.shape)} and {tuple(self.unlabeled.shape)}."
            )
        if self.mask.shape != (n, 1, h, w):
            raise ValueError(f"`mask` must have shape {(n, 1, h, w)}, got {tuple(self.mask.shape)}.")
        if self.fused is not None and self.eps is None:
            raise ValueError("`fused` needs the `eps` it was fused with (or leave both as None).")
        if self.fused is not None:
            _check_image("fused", self.fused)
            if self.fused.shape != self.labeled.shape:
                raise ValueError(
                    f"`fused` must have the shape of `labeled` {tuple(self.labeled.shape)}, "
                    f"got {tuple(self.fused.shape)}."
                )
        if self.eps is not None:
            if not isinstance(self.eps, Tensor):
                raise TypeError(f"`eps` must be a torch.Tensor, got {type(self.eps).__name__}.")
            if self.eps.shape != (n, 1, 1, 1):
                raise ValueError(f"`eps` must have shape {(n, 1, 1, 1)}, got {tuple(self.eps.shape)}.")
        if self.valid is not None:
            _check_image("valid", self.valid)
            if self.valid.shape != (n, 1, h, w):
                raise ValueError(f"`valid` must have shape {(n, 1, h, w)}, got {tuple(self.valid.shape)}.")


@dataclass
class EvaluationBatch:
    """Images with ground truth for validation and test.

    ``original_masks``, when given, holds each image's mask at its original resolution; metrics are then
    computed there (predictions resized back), as the polyp literature reports them.

    Shape:
        - image: (N, C, H, W), float, at the training size.
        - mask: (N, 1, H, W), float in {0, 1}, at the training size.
        - original_masks: N tensors of shape (1, h_i, w_i) in {0, 1}, or ``None``.
    """

    image: Tensor
    mask: Tensor
    original_masks: list[Tensor] | None = None
    names: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """Number of images in the batch."""
        return int(self.image.shape[0])

    def validate(self) -> None:
        """Check shapes, and that there is one original mask per image when they are given.

        Raises:
            TypeError: If ``image`` or ``mask`` is not a tensor.
            ValueError: If shapes or dtypes do not match the documented ones.
        """
        _check_image("image", self.image)
        _check_image("mask", self.mask)
        n, _, h, w = self.image.shape
        if self.mask.shape != (n, 1, h, w):
            raise ValueError(f"`mask` must have shape {(n, 1, h, w)}, got {tuple(self.mask.shape)}.")
        if self.original_masks is not None and len(self.original_masks) != n:
            raise ValueError(
                f"`original_masks` must hold one mask per image ({n}), got {len(self.original_masks)}; "
                "give every image's mask or set original_masks=None."
            )


@dataclass
class PredictionBatch:
    """Images to segment, with what is needed to write the result back at the original size.

    Shape:
        - image: (N, C, H, W), float, at the training size.
        - original_sizes: N pairs (height, width).
    """

    image: Tensor
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """Number of images in the batch."""
        return int(self.image.shape[0])
