"""Baseline methods of the paper's Tables 1 and 2, as LightningModules beside :class:`GPCPSModule`.

- :class:`SupervisedModule`: one network, labeled images only (Table 1 "UNet", Table 2 row I).
- :class:`CPSModule`: cross pseudo supervision (Chen et al., CVPR 2021), adapted to binary segmentation.
- :class:`MeanTeacherModule`: Mean Teacher (Tarvainen & Valpola, NeurIPS 2017).

All three derive from :class:`~gpcps_lightning.module.SegmentationModule` and so share its networks,
optimizer (one Adam, lr 1e-4), manual optimization step, metrics, evaluation and prediction; their
supervised term is GP-CPS's ``L_sup`` soft Dice. The loss terms are the pure functions of
:mod:`gpcps_lightning.losses`. ``docs/baselines.md`` gives each method's adaptation and the sources of
its defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses import (
    authors_dice_loss,
    consistency_loss,
    cps_loss,
    sigmoid_rampup,
    soft_dice_loss,
)
from gpcps_lightning.module import SegmentationModule

__all__ = [
    "CPSLosses",
    "CPSModule",
    "MeanTeacherLosses",
    "MeanTeacherModule",
    "SupervisedLosses",
    "SupervisedModule",
    "add_gaussian_noise",
    "ema_decay_at",
    "ema_update",
]

DiceVariant = Literal["soft", "authors"]


def _dice_function(variant: str) -> Callable[[Tensor, Tensor], Tensor]:
    if variant == "soft":
        return soft_dice_loss
    if variant == "authors":
        return authors_dice_loss
    raise ValueError(f"`dice` must be 'soft' or 'authors', got {variant!r}.")


def _check_training_batch(batch: Any, method: str) -> SemiSupervisedBatch:
    if not isinstance(batch, SemiSupervisedBatch):
        raise TypeError(
            f"{method} trains on gpcps_lightning.SemiSupervisedBatch, got {type(batch).__name__}."
        )
    batch.validate()
    return batch


# ---------------------------------------------------------------------------------------------------
# Pure helpers of Mean Teacher (on modules and tensors, no Lightning)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Move the teacher's parameters towards the student's: ``t <- decay * t + (1 - decay) * s``.

    Only parameters are averaged, as in the Mean Teacher reference code; buffers (batch-norm running
    statistics) are left to the teacher's own forward passes.

    Args:
        teacher: The averaged network, updated in place.
        student: The trained network, same architecture.
        decay: The EMA decay ``alpha`` in [0, 1].

    Raises:
        ValueError: If ``decay`` is outside [0, 1] or the two networks' parameters differ in names or shapes.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"`decay` must be in [0, 1], got {decay}.")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("`teacher` and `student` must have the same parameters (same architecture).")
    for name, t in t_params.items():
        if t.shape != s_params[name].shape:
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(t.shape)} in `teacher` but "
                f"{tuple(s_params[name].shape)} in `student`."
            )
    teacher_list: list[Tensor] = list(t_params.values())
    student_list: list[Tensor] = [s_params[name].detach() for name in t_params]
    torch._foreach_mul_(teacher_list, decay)
    torch._foreach_add_(teacher_list, student_list, alpha=1.0 - decay)


def ema_decay_at(
    step: int, decay: float, rampup_steps: int, decay_after_rampup: float | None = None
) -> float:
    """EMA decay at a training step: ``decay`` during the ramp-up, then ``decay_after_rampup``.

    The Mean Teacher reference code (TensorFlow) uses 0.99 while ``step < rampup_steps`` and 0.999
    afterwards; ``decay_after_rampup=None`` keeps ``decay`` throughout.

    Args:
        step: 0-based training step.
        decay: Decay during the ramp-up (and after it when ``decay_after_rampup`` is ``None``).
        rampup_steps: Length of the consistency ramp-up in steps.
        decay_after_rampup: Decay from ``step >= rampup_steps`` on, or ``None``.

    Returns:
        The decay to use for the EMA update that follows step ``step``.

    Raises:
        ValueError: If ``step`` or ``rampup_steps`` is negative.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if rampup_steps < 0:
        raise ValueError(f"`rampup_steps` must be >= 0, got {rampup_steps}.")
    if decay_after_rampup is None or step < rampup_steps:
        return decay
    return decay_after_rampup


def add_gaussian_noise(
    images: Tensor, std: float, clip: float | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``images + n`` with ``n ~ N(0, std^2)`` drawn per element (Mean Teacher's input noise).

    Args:
        images: Images as the networks see them (normalised).
        std: Standard deviation of the noise; 0 returns ``images`` unchanged.
        clip: Clip the noise to ``[-clip, clip]`` (SSL4MIS clips at 0.2), or ``None``.
        generator: Optional random generator (for reproducible draws), on the images' device.

    Returns:
        Noisy images, shape and dtype of ``images``.

    Raises:
        ValueError: If ``std`` is negative or ``clip`` is not positive.

    Shape:
        - images: (N, C, H, W)
    """
    if std < 0:
        raise ValueError(f"`std` must be >= 0, got {std}.")
    if clip is not None and clip <= 0:
        raise ValueError(f"`clip` must be positive or None, got {clip}.")
    if std == 0:
        return images
    noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator) * std
    if clip is not None:
        noise = noise.clamp(-clip, clip)
    return images + noise


# ---------------------------------------------------------------------------------------------------
# Supervised baseline
# ---------------------------------------------------------------------------------------------------


class SupervisedLosses(NamedTuple):
    """The loss terms of one supervised step (float32 scalars)."""

    total: Tensor
    sup: Tensor


class SupervisedModule(SegmentationModule):
    """One network trained on the labeled images only (Table 1 "UNet", Table 2 row I).

    The loss is GP-CPS's supervised soft Dice for one network, ``Dice(p(l), y)``. Training batches are
    :class:`~gpcps_lightning.SemiSupervisedBatch` so that every method runs on the same datamodule;
    ``unlabeled`` (and ``fused``) are ignored. The one head is ``net1``, which is also the selection
    head. Logged: ``train/loss``, ``train/loss_sup``.

    Args:
        network_seed: Initialisation seed of ``net1`` (GP-CPS's ``net1`` uses 1 by default, so the two start
            from the same weights).
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice, as
            in :class:`GPCPSModule`.
        **kwargs: Network, optimizer and evaluation arguments of :class:`SegmentationModule`.
    """

    head_names = ("net1",)
    selection_head = "net1"

    def __init__(self, network_seed: int = 1, dice: DiceVariant = "soft", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._dice = _dice_function(dice)
        self.save_hyperparameters()
        self.net1 = self.make_network(network_seed)

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1,)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        return {"net1": torch.sigmoid(self.net1(images)).float()}

    def compute_losses(self, batch: SemiSupervisedBatch) -> SupervisedLosses:
        """The supervised loss of one step (forward pass included); no optimizer involved.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = _check_training_batch(batch, "SupervisedModule")
        sup = self._dice(torch.sigmoid(self.net1(batch.labeled)), batch.mask)
        return SupervisedLosses(total=sup, sup=sup)

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> Tensor:  # noqa: D102
        losses = self.compute_losses(batch)
        logged = {"loss": losses.total, "loss_sup": losses.sup}
        self.optimization_step(logged)
        self.log_losses(logged, batch.batch_size)
        return losses.total.detach()


# ---------------------------------------------------------------------------------------------------
# Cross pseudo supervision
# ---------------------------------------------------------------------------------------------------


class CPSLosses(NamedTuple):
    """The loss terms of one CPS step (float32 scalars; ``cps`` is 0 when ``lambda_cps`` is 0)."""

    total: Tensor
    sup: Tensor
    cps: Tensor


class CPSModule(SegmentationModule):
    """Cross pseudo supervision (Chen et al., CVPR 2021), adapted to binary segmentation.

    Two networks of the same architecture from different seeds. Each step computes
    ``L_sup + lambda_cps * L_cps``: ``L_sup`` is GP-CPS's supervised soft Dice of both networks on the
    labeled images; ``L_cps`` (:func:`~gpcps_lightning.losses.cps_loss`) supervises each network by
    the other's hard, detached pseudo labels with a binary cross entropy, on the unlabeled images and,
    as in the paper, on the labeled ones (pixel mean over their concatenation, as the authors' code).
    Evaluation reports ``net1``, ``net2`` and their probability average ``ensemble`` (the selection
    head); prediction returns the ensemble. Logged: ``train/loss``, ``train/loss_sup``,
    ``train/loss_cps`` (unweighted).

    Args:
        lambda_cps: Weight of ``L_cps``. Default 1.5, the CPS paper's (and code's) value for PASCAL
            VOC 2012; it used 6 for Cityscapes.
        seeds: Initialisation seeds of ``net1`` and ``net2``; must differ.
        cps_on_labeled: Also apply ``L_cps`` to the labeled images (the paper's ``L_cps^l``).
        pseudo_threshold: Probability threshold of the hard pseudo labels (0.5 is the two-class arg-max).
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of :class:`SegmentationModule`.
    """

    head_names = ("net1", "net2", "ensemble")
    selection_head = "ensemble"

    def __init__(
        self,
        lambda_cps: float = 1.5,
        seeds: tuple[int, int] = (1, 2),
        cps_on_labeled: bool = True,
        pseudo_threshold: float = 0.5,
        dice: DiceVariant = "soft",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if lambda_cps < 0:
            raise ValueError(f"`lambda_cps` must be >= 0, got {lambda_cps}.")
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise ValueError(f"`seeds` must be two different integers, got {seeds}.")
        if not 0.0 < pseudo_threshold < 1.0:
            raise ValueError(f"`pseudo_threshold` must be in (0, 1), got {pseudo_threshold}.")
        self._dice = _dice_function(dice)
        self.save_hyperparameters()
        self.lambda_cps = float(lambda_cps)
        self.cps_on_labeled = cps_on_labeled
        self.pseudo_threshold = pseudo_threshold
        self.net1 = self.make_network(seeds[0])
        self.net2 = self.make_network(seeds[1])

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1, self.net2)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        p1 = torch.sigmoid(self.net1(images)).float()
        p2 = torch.sigmoid(self.net2(images)).float()
        return {"net1": p1, "net2": p2, "ensemble": (p1 + p2) / 2.0}

    def compute_losses(self, batch: SemiSupervisedBatch) -> CPSLosses:
        """All loss terms of one step (forward passes included); no optimizer involved.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = _check_training_batch(batch, "CPSModule")
        # Separate forward passes of the labeled and unlabeled batches, as the authors' code does
        # (batch-norm statistics are then per batch, not over their union).
        logits1_l = self.net1(batch.labeled)
        logits2_l = self.net2(batch.labeled)
        y = batch.mask
        sup = self._dice(torch.sigmoid(logits1_l), y) + self._dice(torch.sigmoid(logits2_l), y)
        cps = sup.new_zeros(())
        if self.lambda_cps > 0:
            logits1 = self.net1(batch.unlabeled)
            logits2 = self.net2(batch.unlabeled)
            if self.cps_on_labeled:
                logits1 = torch.cat([logits1_l, logits1])
                logits2 = torch.cat([logits2_l, logits2])
            cps = cps_loss(logits1, logits2, self.pseudo_threshold)
        return CPSLosses(total=sup + self.lambda_cps * cps, sup=sup, cps=cps)

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> Tensor:  # noqa: D102
        losses = self.compute_losses(batch)
        logged = {"loss": losses.total, "loss_sup": losses.sup, "loss_cps": losses.cps}
        self.optimization_step(logged)
        self.log_losses(logged, batch.batch_size)
        return losses.total.detach()


# ---------------------------------------------------------------------------------------------------
# Mean Teacher
# ---------------------------------------------------------------------------------------------------


class MeanTeacherLosses(NamedTuple):
    """The loss terms of one Mean Teacher step (float32 scalars) and the consistency weight used."""

    total: Tensor
    sup: Tensor
    cons: Tensor
    cons_weight: float


class MeanTeacherModule(SegmentationModule):
    """Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) for binary segmentation.

    A student network is trained on ``L_sup + w(t) * L_cons``: ``L_sup`` is GP-CPS's supervised soft
    Dice on the labeled images; ``L_cons`` (:func:`~gpcps_lightning.losses.consistency_loss`) is the
    mean squared difference between the student's and the teacher's probabilities on the unlabeled
    images, each network seeing its own draw of Gaussian input noise (the data pipeline augments
    once, so the noise is what makes the two views differ). ``w(t) = consistency_weight *
    exp(-5 (1 - t/T)^2)`` ramps up over ``T = rampup_steps`` steps. After each optimizer step the
    teacher's parameters become the exponential moving average of the student's
    (:func:`ema_update`); the teacher starts as a copy of the student, has ``requires_grad=False``,
    is not in the optimizer and is saved in checkpoints. It runs in training mode during training
    steps, so its batch-norm statistics follow its own inputs (as in the reference code).

    Heads: ``teacher`` (the selection and prediction head, as the paper reports the EMA model) and
    ``student``. Logged: ``train/loss``, ``train/loss_sup``, ``train/loss_cons`` (unweighted),
    ``train/cons_weight``, ``train/ema_decay``.

    Args:
        consistency_weight: Maximum consistency weight ``w_max``. Default 0.1, SSL4MIS's Mean Teacher
            for medical image segmentation (MSE of probabilities, as here).
        rampup_steps: Ramp-up length ``T`` in training steps; 0 disables the ramp-up. Default 1250,
            the first quarter of the paper protocol's 5000 steps, close to the Mean Teacher reference
            code's 40000 of 150000 steps.
        ema_decay: EMA decay ``alpha`` (paper: 0.99 during the ramp-up).
        ema_decay_after_rampup: Decay from step ``T`` on (paper's code: 0.999), or ``None`` to keep
            ``ema_decay`` throughout (default).
        noise_std: Standard deviation of the Gaussian noise added to the unlabeled images, drawn
            independently for student and teacher (Mean Teacher's reference code: 0.15 on normalised
            images). 0 disables it.
        noise_clip: Clip the noise to ``[-noise_clip, noise_clip]``, or ``None`` (default).
        network_seed: Initialisation seed of the student (and so of the teacher).
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of :class:`SegmentationModule`.
    """

    head_names = ("teacher", "student")
    selection_head = "teacher"

    def __init__(
        self,
        consistency_weight: float = 0.1,
        rampup_steps: int = 1250,
        ema_decay: float = 0.99,
        ema_decay_after_rampup: float | None = None,
        noise_std: float = 0.15,
        noise_clip: float | None = None,
        network_seed: int = 1,
        dice: DiceVariant = "soft",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if consistency_weight < 0:
            raise ValueError(f"`consistency_weight` must be >= 0, got {consistency_weight}.")
        if rampup_steps < 0:
            raise ValueError(f"`rampup_steps` must be >= 0, got {rampup_steps}.")
        for name, value in (("ema_decay", ema_decay), ("ema_decay_after_rampup", ema_decay_after_rampup)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        if noise_std < 0:
            raise ValueError(f"`noise_std` must be >= 0, got {noise_std}.")
        if noise_clip is not None and noise_clip <= 0:
            raise ValueError(f"`noise_clip` must be positive or None, got {noise_clip}.")
        self._dice = _dice_function(dice)
        self.save_hyperparameters()
        self.consistency_weight = float(consistency_weight)
        self.rampup_steps = rampup_steps
        self.ema_decay = float(ema_decay)
        self.ema_decay_after_rampup = (
            None if ema_decay_after_rampup is None else float(ema_decay_after_rampup)
        )
        self.noise_std = float(noise_std)
        self.noise_clip = noise_clip
        self.student = self.make_network(network_seed)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.student,)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        return {
            "teacher": torch.sigmoid(self.teacher(images)).float(),
            "student": torch.sigmoid(self.student(images)).float(),
        }

    def forward(self, images: Tensor) -> Tensor:
        """The teacher's foreground probabilities (the student is not evaluated for prediction).

        Shape:
            - images: (N, C, H, W)
            - output: (N, 1, H, W), float32 in [0, 1]
        """
        return torch.sigmoid(self.teacher(images)).float()

    def consistency_weight_at(self, step: int) -> float:
        """``w(t) = consistency_weight * exp(-5 (1 - t/T)^2)`` at the 0-based step ``t``."""
        return self.consistency_weight * sigmoid_rampup(step, self.rampup_steps)

    def ema_decay_at(self, step: int) -> float:
        """EMA decay of the update that follows the 0-based step ``step``."""
        return ema_decay_at(step, self.ema_decay, self.rampup_steps, self.ema_decay_after_rampup)

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> MeanTeacherLosses:
        """All loss terms of one step (forward passes included); no optimizer or EMA update involved.

        Args:
            batch: Labeled images and masks, and unlabeled images (``fused`` is ignored).
            step: 0-based training step, which sets the consistency weight.

        Returns:
            The loss terms, their weighted total and the weight used.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = _check_training_batch(batch, "MeanTeacherModule")
        sup = self._dice(torch.sigmoid(self.student(batch.labeled)), batch.mask)
        weight = self.consistency_weight_at(step)
        cons = sup.new_zeros(())
        if self.consistency_weight > 0:
            student_in = add_gaussian_noise(batch.unlabeled, self.noise_std, self.noise_clip)
            teacher_in = add_gaussian_noise(batch.unlabeled, self.noise_std, self.noise_clip)
            with torch.no_grad():
                p_teacher = torch.sigmoid(self.teacher(teacher_in))
            cons = consistency_loss(torch.sigmoid(self.student(student_in)), p_teacher)
        return MeanTeacherLosses(total=sup + weight * cons, sup=sup, cons=cons, cons_weight=weight)

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> Tensor:  # noqa: D102
        step = self.global_step
        losses = self.compute_losses(batch, step)
        logged = {"loss": losses.total, "loss_sup": losses.sup, "loss_cons": losses.cons}
        decay = self.ema_decay_at(step)
        if self.optimization_step(logged):  # a skipped step leaves the student, so the teacher, as it was
            ema_update(self.teacher, self.student, decay)
        self.log_losses(logged, batch.batch_size)
        self.log(
            "train/cons_weight", losses.cons_weight, on_step=True, on_epoch=False, batch_size=batch.batch_size
        )
        self.log("train/ema_decay", decay, on_step=True, on_epoch=False, batch_size=batch.batch_size)
        return losses.total.detach()
