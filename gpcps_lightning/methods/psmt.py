"""PS-MT as a LightningModule: its forward passes, its objective and the teachers' moving averages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.baselines import ema_update, warmed_decay
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function
from gpcps_lightning.losses.psmt import (
    PSMTLosses,
    active_teacher,
    apply_cutmix,
    cosine_rampup,
    draw_cutmix,
    psmt_objective,
    teacher_target,
    vat_perturbation,
)
from gpcps_lightning.methods.base import SegmentationModule
from gpcps_lightning.methods.schedule import ScheduleMixin, check_reference_steps

__all__ = ["PSMTModule", "teacher_seeds_for"]

VatFeatures = Literal["all", "deepest"]

#: The parts of a segmentation-models-pytorch model that T-VAT runs one after the other.
_PARTS = ("encoder", "decoder", "segmentation_head")


def teacher_seeds_for(network_seed: int) -> tuple[int, int]:
    """The teachers' default seeds: ``2**32 + 2 * network_seed`` and ``2**32 + 2 * network_seed + 1``.

    Above every seed the library's runner gives networks (``2 * seed + 1`` and ``2 * seed + 2``), so a
    teacher never starts from another method's, or another run's, initial weights, and distinct students
    get distinct teachers.
    """
    return (2**32 + 2 * network_seed, 2**32 + 2 * network_seed + 1)


def _part(net: nn.Module, name: str) -> nn.Module:
    part = getattr(net, name)
    assert isinstance(part, nn.Module)  # checked when the networks are built
    return part


def _decode(net: nn.Module, features: list[Tensor]) -> Tensor:
    """``segmentation_head(decoder(features))`` of an smp model: its forward pass after the encoder."""
    out = _part(net, "segmentation_head")(_part(net, "decoder")(features))
    assert isinstance(out, Tensor)
    return out


@contextlib.contextmanager
def _evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    # T-VAT reads the teachers with their running batch-norm statistics and must not update them
    # (the official code calls .eval() and then .train() around it).
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


class PSMTModule(ScheduleMixin, SegmentationModule):
    """PS-MT, Perturbed and Strict Mean Teachers (Liu et al., CVPR 2022), for binary segmentation.

    One student and two teachers, each its own network (``network_seed``, ``teacher_seeds``). For the
    first ``warmup_steps`` steps the optimizer trains all three on the supervised Dice. Afterwards the
    teachers receive no gradient and, after each optimizer step, one of them moves towards the student
    (``ema_decay``), the other one every ``teacher_switch_every`` steps. A teacher's first update copies
    the student and later ones average with a decay that rises to ``ema_decay`` (``ema_warmup``), so both
    teachers are moving averages of the student, never blends of unrelated networks. The student
    trains on ``L_sup + unsup_weight * ramp(t) * L_unsup``
    (:func:`~gpcps_lightning.losses.psmt.psmt_objective`): the teachers' averaged probabilities on the
    unlabeled batch (``gamma``) are the target of the student's prediction on a CutMix of that batch
    (the same boxes mix the target), through the confidence-weighted cross entropy above
    ``confidence_threshold``; the student decodes features perturbed by T-VAT
    (:func:`~gpcps_lightning.losses.psmt.vat_perturbation`): the direction of its encoder features that
    most changes the teachers' decoders' prediction, with norm ``vat_eps``. ``ramp(t)`` is the cosine
    ramp over ``rampup_steps`` steps from the end of the warm-up. With ``schedule_reference_steps`` the
    schedule's lengths and decay scale to the run's length (:mod:`gpcps_lightning.methods.schedule`).

    Heads: ``teacher`` (the average of the two teachers' probabilities; selection and prediction) and
    ``student``. Logged: ``train/loss``, ``train/loss_sup`` (the student's Dice), ``train/loss_teachers``
    (the teachers' Dice during the warm-up, then 0), ``train/loss_unsup`` (unweighted), ``train/ramp`` and
    ``train/ema_teacher`` (1 or 2, the teacher averaged after the step; 0 during the warm-up). The buffer
    ``ema_updates`` counts each teacher's moving-average updates. docs/baselines.md gives the
    sources of the defaults and every departure from the official code.

    Distributed training needs ``strategy="ddp_find_unused_parameters_true"``: the teachers are trained
    parameters during the warm-up only.

    Args:
        unsup_weight: Weight of the unlabeled loss at the end of the ramp (official: 1.5).
        warmup_steps: Supervised warm-up of all three networks, in steps (official: 5 epochs; 250 = 5
            epochs of the full protocol's 50 steps).
        rampup_steps: Length of the cosine ramp after the warm-up (official: 12 epochs; 600 steps).
        teacher_switch_every: Steps between switches of the averaged teacher (official: every epoch; 50).
        ema_decay: Moving-average decay, the official ``keep_rate`` (0.996).
        ema_warmup: Each teacher's update ``n`` (0-based, counted per teacher) uses the decay
            ``min(1 - 1 / (n + 1), ema_decay)``, as Mean Teacher's reference code does: its first update
            copies the student. ``False`` uses ``ema_decay`` from the first update, the official code's
            arithmetic, which leaves a teacher a blend of its own warmed-up weights and the student's for
            ``~1 / (1 - ema_decay)`` updates; harmless where all three networks start from one pretrained
            encoder and an epoch holds hundreds of updates, as officially (docs/baselines.md).
        schedule_reference_steps: The run length, in steps, for which ``warmup_steps``, ``rampup_steps``,
            ``teacher_switch_every`` and ``ema_decay`` are stated; a run of another length scales them
            (:mod:`gpcps_lightning.methods.schedule`). ``None``: used as given. The shipped config sets
            5000, the paper's protocol.
        gamma: Weight of teacher 1 in the target ``gamma * p1 + (1 - gamma) * p2`` (official: 0.5).
        confidence_threshold: Pixels whose target confidence ``max(p, 1 - p)`` is below it do not count
            (official ``semi_p_th``: 0.6).
        cutmix_beta: Shape of the ``Beta(b, b)`` draw of the CutMix box size (official: 4).
        vat_xi: T-VAT's finite-difference step (official: 1e-6).
        vat_eps: Norm of the T-VAT perturbation per sample (official: 2.0); 0 switches T-VAT off.
        vat_norm_eps: Added to the norm when T-VAT normalises its direction; 0 normalises exactly (the
            paper's ``eps * g / |g|``); the official code adds 1e-8, which shrinks the perturbation to
            about 1e-4 of ``vat_eps`` on these networks (docs/baselines.md).
        vat_features: Which encoder features T-VAT perturbs: ``"all"`` that the decoder reads (one
            direction across them, the official decoder input being one tensor) or ``"deepest"`` only.
        vat_on_labeled: Perturb the student's features on the labeled images too (the official code does).
        network_seed: Initialisation seed of the student (the runner sets it per run, as for Mean Teacher).
        teacher_seeds: Initialisation seeds of teacher 1 and teacher 2, or ``None`` (default) for
            :func:`teacher_seeds_for` of ``network_seed``; the three must differ.
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.

    Raises:
        ValueError: On an option outside its range, or a network that is not an smp model with an
            ``encoder``, a ``decoder`` and a ``segmentation_head``.
    """

    head_names = ("teacher", "student")
    selection_head = "teacher"
    ema_updates: Tensor
    schedule_step_options = ("warmup_steps", "rampup_steps", "teacher_switch_every")
    schedule_decay_options = ("ema_decay",)
    schedule_span_options = ("warmup_steps", "rampup_steps")
    student: nn.Module
    teacher1: nn.Module
    teacher2: nn.Module

    def __init__(
        self,
        unsup_weight: float = 1.5,
        warmup_steps: int = 250,
        rampup_steps: int = 600,
        teacher_switch_every: int = 50,
        ema_decay: float = 0.996,
        ema_warmup: bool = True,
        schedule_reference_steps: int | None = None,
        gamma: float = 0.5,
        confidence_threshold: float = 0.6,
        cutmix_beta: float = 4.0,
        vat_xi: float = 1e-6,
        vat_eps: float = 2.0,
        vat_norm_eps: float = 0.0,
        vat_features: VatFeatures = "all",
        vat_on_labeled: bool = True,
        network_seed: int = 1,
        teacher_seeds: tuple[int, int] | None = None,
        dice: DiceVariant = "soft",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if unsup_weight < 0:
            raise ValueError(f"`unsup_weight` must be >= 0, got {unsup_weight}.")
        for name, value in (("warmup_steps", warmup_steps), ("rampup_steps", rampup_steps)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if teacher_switch_every < 1:
            raise ValueError(f"`teacher_switch_every` must be >= 1, got {teacher_switch_every}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay}.")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"`gamma` must be in [0, 1], got {gamma}.")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"`confidence_threshold` must be in [0, 1), got {confidence_threshold}.")
        if cutmix_beta <= 0:
            raise ValueError(f"`cutmix_beta` must be positive, got {cutmix_beta}.")
        if vat_xi <= 0:
            raise ValueError(f"`vat_xi` must be positive, got {vat_xi}.")
        for name, size in (("vat_eps", vat_eps), ("vat_norm_eps", vat_norm_eps)):
            if size < 0:
                raise ValueError(f"`{name}` must be >= 0, got {size}.")
        if vat_features not in ("all", "deepest"):
            raise ValueError(f"`vat_features` must be 'all' or 'deepest', got {vat_features!r}.")
        # (a new name: save_hyperparameters records the arguments as given, None included)
        seeds = teacher_seeds_for(network_seed) if teacher_seeds is None else tuple(teacher_seeds)
        if len(seeds) != 2 or len({network_seed, *seeds}) != 3:
            raise ValueError(
                "`teacher_seeds` must be two different integers, both other than `network_seed` "
                f"({network_seed}), or None; got {teacher_seeds}."
            )
        dice_loss_function(dice)  # checks the variant
        self.save_hyperparameters()
        self.unsup_weight = float(unsup_weight)
        self.warmup_steps = warmup_steps
        self.rampup_steps = rampup_steps
        self.teacher_switch_every = teacher_switch_every
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)
        self.schedule_reference_steps = check_reference_steps(schedule_reference_steps)
        self.gamma = float(gamma)
        self.confidence_threshold = float(confidence_threshold)
        self.cutmix_beta = float(cutmix_beta)
        self.vat_xi = float(vat_xi)
        self.vat_eps = float(vat_eps)
        self.vat_norm_eps = float(vat_norm_eps)
        self.vat_features = vat_features
        self.vat_on_labeled = vat_on_labeled
        self.network_seed = network_seed
        self.teacher_seeds = (seeds[0], seeds[1])
        self.dice_variant = dice
        # Moving-average updates of teacher 1 and teacher 2, saved in checkpoints with the weights.
        self.register_buffer("ema_updates", torch.zeros(2, dtype=torch.long))
        self.configure_networks()

    # ----------------------------------------------------------------- networks
    def configure_networks(self) -> None:  # noqa: D102
        self.student = self.make_network(self.network_seed)
        self.teacher1 = self.make_network(self.teacher_seeds[0])
        self.teacher2 = self.make_network(self.teacher_seeds[1])
        missing = [part for part in _PARTS if not isinstance(getattr(self.student, part, None), nn.Module)]
        if missing or getattr(self.student, "classification_head", None) is not None:
            raise ValueError(
                "PSMTModule runs its networks as encoder -> decoder -> segmentation_head "
                f"(segmentation-models-pytorch models without aux_params); {type(self.student).__name__} "
                f"lacks {', '.join(missing) or 'nothing but has a classification_head'}."
            )

    def trained_networks(self) -> Sequence[nn.Module]:
        """Student, teacher 1, teacher 2: the teachers receive gradients during the warm-up only."""
        return (self.student, self.teacher1, self.teacher2)

    @property
    def teachers(self) -> tuple[nn.Module, nn.Module]:
        """Teacher 1 and teacher 2."""
        return (self.teacher1, self.teacher2)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        return {"teacher": self(images), "student": torch.sigmoid(self.student(images)).float()}

    def forward(self, images: Tensor) -> Tensor:
        """The teachers' average foreground probability (the student is not evaluated for prediction).

        Shape:
            - images: (N, C, H, W)
            - output: (N, 1, H, W), float32 in [0, 1]
        """
        p1 = torch.sigmoid(self.teacher1(images)).float()
        p2 = torch.sigmoid(self.teacher2(images)).float()
        return (p1 + p2) / 2.0

    # ----------------------------------------------------------------- schedule
    def ramp_at(self, step: int) -> float:
        """The unlabeled loss's ramp factor at the 0-based step: 0 in the warm-up, then the cosine ramp."""
        warmup = self.schedule_steps("warmup_steps")
        if step < warmup:
            return 0.0
        return cosine_rampup(step - warmup, self.schedule_steps("rampup_steps"))

    def active_teacher_at(self, step: int) -> int | None:
        """Index (0, 1) of the teacher averaged after the 0-based step, ``None`` during the warm-up."""
        return active_teacher(
            step, self.schedule_steps("warmup_steps"), self.schedule_steps("teacher_switch_every")
        )

    def teacher_decay(self, index: int) -> float:
        """The decay of teacher ``index``'s next moving-average update (see ``ema_warmup``)."""
        decay = self.schedule_decay("ema_decay")
        assert decay is not None
        return warmed_decay(int(self.ema_updates[index]), decay) if self.ema_warmup else decay

    # ----------------------------------------------------------------- forward passes
    def _teachers_decode(self, features: list[Tensor]) -> Tensor:
        # The official T-VAT averages the two teachers' decoder logits.
        return (_decode(self.teacher1, features) + _decode(self.teacher2, features)) / 2.0

    def _vat_levels(self, n_features: int) -> list[int]:
        # smp encoders return the input image first; decoders read it for its size only.
        return list(range(1, n_features)) if self.vat_features == "all" else [n_features - 1]

    def student_logits(self, images: Tensor, perturb: bool) -> Tensor:
        """The student's logits, its encoder features perturbed by T-VAT when ``perturb``.

        Shape:
            - images: (N, C, H, W)
            - output: (N, 1, H, W)
        """
        net = self.student
        check = getattr(net, "check_input_shape", None)
        if callable(check):
            check(images)
        features = list(_part(net, "encoder")(images))
        if perturb and self.vat_eps > 0:
            with _evaluation_mode(*self.teachers):
                shifts = vat_perturbation(
                    features,
                    self._teachers_decode,
                    self._vat_levels(len(features)),
                    xi=self.vat_xi,
                    eps=self.vat_eps,
                    norm_eps=self.vat_norm_eps,
                )
            features = [f if r is None else f + r for f, r in zip(features, shifts, strict=True)]
        return _decode(net, features)

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> PSMTLosses:
        """The forward passes of one step and its objective; no optimizer or moving-average update involved.

        During the warm-up: the supervised Dice of the student and of both teachers. Afterwards: the
        teachers' target on the unlabeled images, one CutMix draw for images and target, and the student's
        T-VAT-perturbed predictions.

        Args:
            batch: Labeled images and masks, and unlabeled images (``fused`` is ignored).
            step: 0-based training step, which sets the phase and the ramp.

        Returns:
            The loss terms, their weighted total and the ramp factor.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        if step < self.schedule_steps("warmup_steps"):
            return psmt_objective(
                torch.sigmoid(self.student(batch.labeled)),
                batch.mask,
                p_teachers_labeled=[torch.sigmoid(t(batch.labeled)) for t in self.teachers],
                unsup_weight=self.unsup_weight,
                ramp=0.0,
                confidence_threshold=self.confidence_threshold,
                dice=self.dice_variant,
            )
        # The official order: the teachers' target, the CutMix, the student on labeled then unlabeled images.
        strong = logits_unlabeled = None
        # The teachers run whatever the weight: only parameters are averaged, so their batch-norm
        # statistics come from these passes, and a teacher without them would keep its warm-up statistics.
        with torch.no_grad():
            target = teacher_target(
                torch.sigmoid(self.teacher1(batch.unlabeled)),
                torch.sigmoid(self.teacher2(batch.unlabeled)),
                self.gamma,
            )
        if self.unsup_weight > 0:
            n, _, height, width = batch.unlabeled.shape
            # Drawn from the global random state (saved in checkpoints), never from the data streams.
            mix = draw_cutmix(n, height, width, beta=self.cutmix_beta)
            strong, target = apply_cutmix(batch.unlabeled, mix), apply_cutmix(target, mix)
        logits_labeled = self.student_logits(batch.labeled, perturb=self.vat_on_labeled)
        if strong is not None:
            logits_unlabeled = self.student_logits(strong, perturb=True)
        return psmt_objective(
            torch.sigmoid(logits_labeled),
            batch.mask,
            logits_unlabeled,
            None if logits_unlabeled is None else target,
            unsup_weight=self.unsup_weight,
            ramp=self.ramp_at(step),
            confidence_threshold=self.confidence_threshold,
            dice=self.dice_variant,
        )

    def loss_terms(self, losses: PSMTLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        return {
            "loss": losses.total,
            "loss_sup": losses.sup,
            "loss_teachers": losses.teachers_sup,
            "loss_unsup": losses.unsup,
        }

    def after_update(self, stepped: bool, losses: PSMTLosses, step: int, batch_size: int) -> None:
        """Average the student into the active teacher (unless the step was skipped); log the schedule."""
        index = self.active_teacher_at(step)
        if stepped and index is not None:  # a skipped step leaves the student, so the teachers, as they were
            ema_update(self.teachers[index], self.student, self.teacher_decay(index))
            self.ema_updates[index] += 1
        self.log("train/ramp", losses.ramp, on_step=True, on_epoch=False, batch_size=batch_size)
        active = 0 if index is None else index + 1
        self.log("train/ema_teacher", float(active), on_step=True, on_epoch=False, batch_size=batch_size)
