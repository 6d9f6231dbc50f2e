"""Mean Teacher as a LightningModule: its forward passes, its objective and the teacher's moving average."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.baselines import (
    MeanTeacherLosses,
    add_gaussian_noise,
    ema_decay_at,
    ema_update,
    mean_teacher_objective,
    sigmoid_rampup,
)
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.methods.schedule import ScheduleMixin, check_reference_steps

__all__ = ["MeanTeacherModule"]


class MeanTeacherModule(ScheduleMixin, SegmentationModule):
    """Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) for binary segmentation.

    The student is trained on ``L_sup + w(t) * L_cons``
    (:func:`~gpcps_lightning.losses.baselines.mean_teacher_objective`): the supervised Dice on the labeled
    images, and the mean squared difference of the student's and the teacher's probabilities on the
    unlabeled images, each seeing its own Gaussian input noise. ``w(t)`` ramps up over ``rampup_steps``.
    After each optimizer step the teacher becomes the moving average of the student (:func:`ema_update`).
    The teacher starts as a copy of the student, is not trained by the optimizer, runs in training mode
    during training steps and is saved in checkpoints.

    Heads: ``teacher`` (selection and prediction) and ``student``. Logged: ``train/loss``,
    ``train/loss_sup``, ``train/loss_cons`` (unweighted), ``train/cons_weight``, ``train/ema_decay``.
    ``docs/baselines.md`` gives the sources of the defaults.

    Args:
        consistency_weight: Maximum consistency weight ``w_max`` (default 0.1, SSL4MIS's).
        rampup_steps: Ramp-up length ``T`` in training steps; 0 disables the ramp-up.
        ema_decay: EMA decay ``alpha`` (paper: 0.99 during the ramp-up).
        ema_decay_after_rampup: Decay from step ``T`` on (paper's code: 0.999), or ``None`` to keep
            ``ema_decay`` throughout (default).
        schedule_reference_steps: The run length, in steps, for which ``rampup_steps`` and the decays
            are stated; a run of another length scales them (:mod:`gpcps_lightning.methods.schedule`).
            ``None``: used as given. The shipped config sets 5000, the paper's protocol.
        noise_std: Standard deviation of the Gaussian noise added to the unlabeled images, drawn
            independently for student and teacher; 0 disables it.
        noise_clip: Clip the noise to ``[-noise_clip, noise_clip]``, or ``None`` (default).
        network_seed: Initialisation seed of the student (and so of the teacher).
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.
    """

    head_names = ("teacher", "student")
    selection_head = "teacher"
    schedule_step_options = ("rampup_steps",)
    schedule_decay_options = ("ema_decay", "ema_decay_after_rampup")
    schedule_span_options = ("rampup_steps",)

    def __init__(
        self,
        consistency_weight: float = 0.1,
        rampup_steps: int = 1250,
        ema_decay: float = 0.99,
        ema_decay_after_rampup: float | None = None,
        schedule_reference_steps: int | None = None,
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
        dice_loss_function(dice)  # checks the variant
        self.save_hyperparameters()
        self.dice_variant = dice
        self.consistency_weight = float(consistency_weight)
        self.rampup_steps = rampup_steps
        self.schedule_reference_steps = check_reference_steps(schedule_reference_steps)
        self.ema_decay = float(ema_decay)
        self.ema_decay_after_rampup = (
            None if ema_decay_after_rampup is None else float(ema_decay_after_rampup)
        )
        self.noise_std = float(noise_std)
        self.noise_clip = noise_clip
        self.network_seed = network_seed
        self.configure_networks()

    def configure_networks(self) -> None:  # noqa: D102
        self.student = self.make_network(self.network_seed)
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
        return self.consistency_weight * sigmoid_rampup(step, self.schedule_steps("rampup_steps"))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay of the update that follows the 0-based step ``step``."""
        decay = self.schedule_decay("ema_decay")
        assert decay is not None
        return ema_decay_at(
            step, decay, self.schedule_steps("rampup_steps"), self.schedule_decay("ema_decay_after_rampup")
        )

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> MeanTeacherLosses:
        """The forward passes of one step and its objective; no optimizer or EMA update involved.

        Args:
            batch: Labeled images and masks, and unlabeled images (``fused`` is ignored).
            step: 0-based training step, which sets the consistency weight.

        Returns:
            The loss terms, their weighted total and the weight used.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        p_labeled = torch.sigmoid(self.student(batch.labeled))
        consistency = self.consistency_weight > 0
        if consistency:
            student_in = add_gaussian_noise(batch.unlabeled, self.noise_std, self.noise_clip)
        teacher_in = add_gaussian_noise(batch.unlabeled, self.noise_std, self.noise_clip)
        # The teacher runs whatever the weight: only parameters are averaged, so its batch-norm statistics
        # come from these passes, and a teacher without them would keep its initial statistics.
        with torch.no_grad():
            p_teacher = torch.sigmoid(self.teacher(teacher_in))
        p_student = torch.sigmoid(self.student(student_in)) if consistency else None
        return mean_teacher_objective(
            p_labeled,
            batch.mask,
            p_student,
            p_teacher if consistency else None,
            cons_weight=self.consistency_weight_at(step),
            dice=self.dice_variant,
        )

    def loss_terms(self, losses: MeanTeacherLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        return {"loss": losses.total, "loss_sup": losses.sup, "loss_cons": losses.cons}

    def after_update(self, stepped: bool, losses: MeanTeacherLosses, step: int, batch_size: int) -> None:
        """Move the teacher towards the student (unless the step was skipped) and log the schedule."""
        decay = self.ema_decay_at(step)
        if stepped:  # a skipped step leaves the student, so the teacher, as it was
            ema_update(self.teacher, self.student, decay)
        self.log("train/cons_weight", losses.cons_weight, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/ema_decay", decay, on_step=True, on_epoch=False, batch_size=batch_size)
