"""UniMatch as a LightningModule: its views, its forward passes and its objective."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function
from gpcps_lightning.losses.unimatch import (
    UniMatchLosses,
    UniMatchSupervised,
    apply_cutmix,
    cutmix_box,
    unimatch_objective,
)
from gpcps_lightning.methods.base import SegmentationModule

__all__ = ["UniMatchModule"]

# The datamodules' default normalisation (ImageNet's); `image_mean` / `image_std` must match the data's.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")


def _check_range(name: str, value: Sequence[float], bounds: str) -> tuple[float, float]:
    """``value`` as two increasing floats within ``bounds``: ``"[0, 1]"`` or ``"(0, inf)"``."""
    ok = len(value) == 2 and value[0] <= value[1]
    if ok and bounds == "[0, 1]":
        ok = 0.0 <= value[0] and value[1] <= 1.0
    elif ok:
        ok = value[0] > 0.0 and math.isfinite(value[1])
    if not ok:
        raise ValueError(f"`{name}` must be two increasing numbers in {bounds}, got {value}.")
    return (float(value[0]), float(value[1]))


def _stats(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


class UniMatchModule(SegmentationModule):
    """UniMatch (Yang, Qi, Feng, Zhang, Shi, CVPR 2023), its medical code, for binary segmentation.

    One network ``net1``. For each unlabeled image: the weak view (the batch's unlabeled image, as the
    datamodule augmented it), two strong views (colour jitter and Gaussian blur drawn here, then CutMix
    with the batch's previous unlabeled image, ``i - 1`` mod N), and a feature-perturbed decoding of the
    weak view (``Dropout2d(fp_dropout)`` on every encoder feature). The loss is
    :func:`~gpcps_lightning.losses.unimatch.unimatch_objective`:
    ``(L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2``, the unlabeled terms two-class Dice losses against
    the weak view's hard labels where their confidence ``max(p, 1 - p)`` is at least ``conf_thresh``.
    Inside a CutMix box the target is the partner's label and confidence from a no-grad, eval-mode
    forward pass of its weak view, as in the code. The labeled and weak images go through one forward
    pass, both strong views through another, as in the code. Optimizer: the library's Adam
    (the code: SGD 0.01, poly decay). Randomness (views, boxes, dropout) comes from torch's global random
    state, never from the data streams. docs/baselines.md lists the deviations from the code.

    Head: ``net1`` (selection and prediction). Logged: ``train/loss``, ``train/loss_sup``,
    ``train/loss_s1``, ``train/loss_s2``, ``train/loss_fp`` (unweighted), ``train/mask_ratio``.

    Args:
        conf_thresh: Confidence a pseudo label needs to count (code: 0.95).
        weight_s1: Weight of the first strong view's loss (code: 0.25).
        weight_s2: Weight of the second strong view's loss (code: 0.25).
        weight_fp: Weight of the feature-perturbation loss (code: 0.5).
        fp_dropout: Channel dropout probability of the feature perturbation (code: 0.5).
        cutmix_p: Probability that a strong view gets a CutMix box (code: 0.5).
        cutmix_size: Range of the box area as a fraction of the image (code: 0.02 to 0.4).
        cutmix_ratio: Range of the box aspect ratio (code: 0.3 to 1/0.3).
        jitter_p: Probability of the strong colour jitter (code: 0.8).
        brightness: Colour jitter brightness strength (code: 0.5).
        contrast: Colour jitter contrast strength (code: 0.5).
        saturation: Colour jitter saturation strength (code: 0.5; needs 3 channels).
        hue: Colour jitter hue strength (code: 0.25; needs 3 channels).
        blur_p: Probability of the Gaussian blur (code: 0.5).
        blur_sigma: Range of the blur's standard deviation in pixels (code: 0.1 to 2.0).
        image_mean: Per-channel normalisation mean of the images (the datamodule's ``mean``): the strong
            colour jitter works on [0, 1] images.
        image_std: Per-channel normalisation standard deviation (the datamodule's ``std``).
        supervised: ``"dice"``: the library's ``L_sup`` with ``dice``, as every baseline (default);
            ``"ce_dice"``: the code's ``(CE + two-class Dice) / 2``.
        network_seed: Initialisation seed of ``net1``.
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.
    """

    head_names = ("net1",)
    selection_head = "net1"

    def __init__(
        self,
        conf_thresh: float = 0.95,
        weight_s1: float = 0.25,
        weight_s2: float = 0.25,
        weight_fp: float = 0.5,
        fp_dropout: float = 0.5,
        cutmix_p: float = 0.5,
        cutmix_size: tuple[float, float] = (0.02, 0.4),
        cutmix_ratio: tuple[float, float] = (0.3, 1.0 / 0.3),
        jitter_p: float = 0.8,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.25,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        image_mean: tuple[float, ...] = _IMAGENET_MEAN,
        image_std: tuple[float, ...] = _IMAGENET_STD,
        supervised: UniMatchSupervised = "dice",
        network_seed: int = 1,
        dice: DiceVariant = "soft",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_probability("conf_thresh", conf_thresh)
        for name, weight in (("weight_s1", weight_s1), ("weight_s2", weight_s2), ("weight_fp", weight_fp)):
            if weight < 0:
                raise ValueError(f"`{name}` must be >= 0, got {weight}.")
        if not 0.0 <= fp_dropout < 1.0:
            raise ValueError(f"`fp_dropout` must be in [0, 1), got {fp_dropout}.")
        for name, p in (("cutmix_p", cutmix_p), ("jitter_p", jitter_p), ("blur_p", blur_p)):
            _check_probability(name, p)
        size = _check_range("cutmix_size", cutmix_size, "[0, 1]")
        ratio = _check_range("cutmix_ratio", cutmix_ratio, "(0, inf)")
        sigma = _check_range("blur_sigma", blur_sigma, "(0, inf)")
        for name, strength in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if strength < 0:
                raise ValueError(f"`{name}` must be >= 0, got {strength}.")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"`hue` must be in [0, 0.5], got {hue}.")
        channels = self._network_args["in_channels"]
        if len(image_mean) != channels or len(image_std) != channels or any(s <= 0 for s in image_std):
            raise ValueError(
                f"`image_mean` and `image_std` must hold one value per input channel ({channels}), the "
                f"standard deviations positive, got {image_mean!r} and {image_std!r}."
            )
        if supervised not in ("dice", "ce_dice"):
            raise ValueError(f"`supervised` must be 'dice' or 'ce_dice', got {supervised!r}.")
        dice_loss_function(dice)  # checks the variant
        self.save_hyperparameters()
        self.conf_thresh = float(conf_thresh)
        self.weight_s1 = float(weight_s1)
        self.weight_s2 = float(weight_s2)
        self.weight_fp = float(weight_fp)
        self.fp_dropout = float(fp_dropout)
        self.cutmix_p = float(cutmix_p)
        self.cutmix_size = size
        self.cutmix_ratio = ratio
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.supervised = supervised
        self.dice_variant = dice
        self.network_seed = network_seed
        # Saturation and hue need RGB; on other images they are left out, as PIL's ColorJitter does
        # nothing for them on the code's grayscale images.
        rgb = channels == 3
        kernel = 2 * math.ceil(3.0 * sigma[1]) + 1  # +-3 sigma of the widest blur
        self.strong_augmentation = K.AugmentationSequential(
            K.ColorJitter(brightness, contrast, saturation if rgb else 0.0, hue if rgb else 0.0, p=jitter_p),
            K.RandomGaussianBlur((kernel, kernel), sigma, p=blur_p),
            data_keys=None,
        )
        self.configure_networks()

    # ----------------------------------------------------------------- networks
    def configure_networks(self) -> None:
        """Build ``net1``; it must be an encoder-decoder (smp) network, for the feature perturbation.

        Raises:
            TypeError: If the network lacks ``encoder``, ``decoder`` or ``segmentation_head``.
        """
        self.net1 = self.make_network(self.network_seed)
        net: Any = self.net1
        missing = [a for a in ("encoder", "decoder", "segmentation_head") if not hasattr(net, a)]
        if missing:
            raise TypeError(
                f"{type(self).__name__} perturbs the encoder's features, so its network needs `encoder`, "
                f"`decoder` and `segmentation_head` (a segmentation-models-pytorch model); "
                f"{type(net).__name__} lacks {', '.join(missing)}."
            )
        # smp < 0.5 decoders take the features as separate arguments, later ones as one list.
        parameters = inspect.signature(net.decoder.forward).parameters.values()
        self._decoder_star_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1,)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        return {"net1": torch.sigmoid(self.net1(images)).float()}

    def forward_with_feature_perturbation(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of ``images`` and of their decoding from channel-dropped encoder features.

        As the code's ``UNet.forward(x, need_fp=True)``: the encoder runs once, and the decoder once on
        the clean and the dropped-out features together (so its batch-norm statistics span both).

        Shape:
            - images: (N, C, H, W)
            - outputs: (N, 1, H, W) each
        """
        net: Any = self.net1
        check_input_shape = getattr(net, "check_input_shape", None)
        if check_input_shape is not None:
            check_input_shape(images)
        features = net.encoder(images)
        both = [torch.cat((f, F.dropout2d(f, self.fp_dropout, training=True))) for f in features]
        decoded = net.decoder(*both) if self._decoder_star_args else net.decoder(both)
        logits, logits_fp = net.segmentation_head(decoded).chunk(2)
        return logits, logits_fp

    # ----------------------------------------------------------------- views
    def strong_view(self, images: Tensor) -> Tensor:
        """A strong photometric view of normalised images: colour jitter, then blur, on [0, 1] images.

        The images are mapped back to [0, 1] with ``image_mean`` / ``image_std`` (and clamped there, as an
        8-bit image is), augmented per image with fresh draws from torch's global random state, and
        normalised again. Autocast is off: the augmentation runs in float32.

        Shape:
            - images: (N, C, H, W)
            - output: (N, C, H, W), dtype of ``images``
        """
        with torch.autocast(images.device.type, enabled=False):
            x = images.float()
            x = (x * _stats(self.image_std, x) + _stats(self.image_mean, x)).clamp(0.0, 1.0)
            x = self.strong_augmentation(x, data_keys=["input"]).clamp(0.0, 1.0)
            x = (x - _stats(self.image_mean, x)) / _stats(self.image_std, x)
        return x.to(images.dtype)

    def on_fit_start(self) -> None:
        """Check ``image_mean`` / ``image_std`` against the datamodule's ``mean`` / ``std`` where it has them.

        Raises:
            ValueError: If they differ.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None:
            data = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
            if data != (self.image_mean, self.image_std):
                raise ValueError(
                    f"{type(self).__name__}'s `image_mean`/`image_std` {self.image_mean}/{self.image_std} "
                    f"differ from the datamodule's `mean`/`std` {data[0]}/{data[1]}: the strong views "
                    "would be jittered in the wrong range. Set model.image_mean and model.image_std to the "
                    "data's."
                )

    # ----------------------------------------------------------------- training
    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> UniMatchLosses:
        """The views and forward passes of one step, and :func:`unimatch_objective` on them.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        weak = batch.unlabeled
        n_labeled = batch.labeled.shape[0]
        # Image i is mixed with image i - 1: a different image of the (shuffled) batch where N > 1.
        box1 = cutmix_box(weak.shape, p=self.cutmix_p, size=self.cutmix_size, ratio=self.cutmix_ratio)
        box2 = cutmix_box(weak.shape, p=self.cutmix_p, size=self.cutmix_size, ratio=self.cutmix_ratio)
        box1, box2 = box1.to(weak.device), box2.to(weak.device)
        strong1 = self.strong_view(weak)
        strong2 = self.strong_view(weak)
        strong1 = apply_cutmix(strong1, strong1.roll(1, 0), box1)
        strong2 = apply_cutmix(strong2, strong2.roll(1, 0), box2)
        # The partners' pseudo labels: eval mode, no gradient, as the code does for its mixing batch.
        was_training = self.net1.training
        self.net1.eval()
        with torch.no_grad():
            logits_partner = self.net1(weak).roll(1, 0)
        self.net1.train(was_training)
        logits, logits_fp = self.forward_with_feature_perturbation(torch.cat((batch.labeled, weak)))
        logits_strong1, logits_strong2 = self.net1(torch.cat((strong1, strong2))).chunk(2)
        return unimatch_objective(
            logits[:n_labeled],
            batch.mask,
            logits[n_labeled:].detach(),
            logits_partner,
            logits_strong1,
            logits_strong2,
            logits_fp[n_labeled:],
            box1,
            box2,
            conf_thresh=self.conf_thresh,
            weight_s1=self.weight_s1,
            weight_s2=self.weight_s2,
            weight_fp=self.weight_fp,
            supervised=self.supervised,
            dice=self.dice_variant,
        )

    def loss_terms(self, losses: UniMatchLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        return {
            "loss": losses.total,
            "loss_sup": losses.sup,
            "loss_s1": losses.s1,
            "loss_s2": losses.s2,
            "loss_fp": losses.fp,
        }

    def after_update(self, stepped: bool, losses: UniMatchLosses, step: int, batch_size: int) -> None:
        """Log the share of confident weak-view pixels (``train/mask_ratio``)."""
        self.log("train/mask_ratio", losses.mask_ratio, on_step=True, on_epoch=False, batch_size=batch_size)
