"""Guided Collaborative Training (GCT) as a LightningModule: its forward passes and its objective."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.baselines import sigmoid_rampup
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function
from gpcps_lightning.losses.gct import GCTLosses, GCTMode, gct_objective
from gpcps_lightning.methods.base import TwoNetworkModule, check_seeds
from gpcps_lightning.methods.schedule import ScheduleMixin, check_reference_steps
from gpcps_lightning.networks import FLAW_DETECTOR_MIN_SIZE, FlawDetector, build_flaw_detector

__all__ = ["GCTModule"]


class GCTModule(ScheduleMixin, TwoNetworkModule):
    """Guided Collaborative Training (Ke et al., ECCV 2020; the GP-CPS paper's "CPC"), binary segmentation.

    Two task networks ``net1``, ``net2`` (different seeds) and a flaw detector
    (:class:`~gpcps_lightning.networks.FlawDetector`) that regresses, from an image and a network's
    prediction, where that prediction is wrong. Each step (:func:`~gpcps_lightning.losses.gct.gct_objective`),
    on the labeled images followed by the unlabeled ones in one forward pass per network, as the
    official code:

    - each network: the supervised Dice on the labeled images; ``fc_weight`` times the flaw correction
      ``mean(both_flawed * flaw^2)``, the detector (frozen) judging its prediction; ``w(t)`` times the
      dynamic consistency MSE towards, per pixel, the prediction of the network with the smaller flaw
      (flaws above ``dc_threshold`` count as 1), with ``w(t) = dc_weight * exp(-5 (1 - t/T)^2)``;
    - the flaw detector: ``fd_weight`` times the MSE, on the labeled images, between its output on each
      network's detached prediction and the blurred, dilated ``|y - p|``.

    All three are trained by one Adam, one parameter group each; the flaw detector's group has its own
    ``fd_lr`` and ``fd_betas`` and no weight decay (the official code gives it a separate Adam, which
    updates it identically). So one backward pass and one step carry every term, through the same
    precision handling, gradient scaler and non-finite checks as any method; ``gradient_clip_val``
    clips the norm of all three networks' gradients together.

    Evaluation reports ``net1``, ``net2`` and ``ensemble`` (the selection and prediction head); the flaw
    detector is used in training only. Logged: ``train/loss``, ``train/loss_sup``, ``train/loss_flaw``,
    ``train/loss_dc``, ``train/loss_fd`` (unweighted) and ``train/dc_weight`` (``w(t)``).
    docs/baselines.md gives the sources of the defaults and the differences from the official code.

    Args:
        fc_weight: Weight of the flaw correction term (official ``fc_ssl_scale``, 1.0).
        dc_weight: Maximum weight of the dynamic consistency term (official ``dc_ssl_scale``, 100.0).
        dc_threshold: Flaw above which a pixel counts as flawed (official ``dc_threshold``, 0.6).
        rampup_steps: Ramp-up length ``T`` of the consistency weight in training steps; 0: none. The
            official 3 of 20 epochs (PASCAL VOC, DeepLabv2) scaled to the 5000-step protocol: 750.
        schedule_reference_steps: The run length, in steps, for which ``rampup_steps`` is stated; a run of
            another length scales it (:mod:`gpcps_lightning.methods.schedule`). ``None``: used as given.
            The shipped config sets 5000, so the ramp takes 15% of any run, as officially.
        fd_weight: Weight of the flaw detector's loss (official ``fd_scale``, 10.0).
        fd_lr: The flaw detector's Adam learning rate (official ``fd_lr``, 1e-4).
        fd_betas: The flaw detector's Adam betas (official (0.9, 0.99)).
        fd_target_dilations: Dilate-and-blur repetitions of the flaw detector's target (official
            ``nu``, 1).
        flaw_clip_threshold: A flaw map whose maximum is not above this counts as flawless (official 0.1).
        fd_channels: Channels of the flaw detector's first convolution (official 64; 512 at its deepest):
            narrower for tests and small CPU runs.
        fd_min_size: Enlarge the flaw detector's input to at least this side (default 60: only as much
            as its layers need). Its map has about ``side / 32`` cells a side (7 at 256 px, a single
            value per image at 64 px, where the flaw maps carry no spatial information: a warning says
            so); 256 gives images of any size the paper protocol's 7x7 map, at the detector's cost on
            256 px images.
        ssl_mode: ``"gct"`` (both terms), ``"dc"`` (dynamic consistency only) or ``"fc"`` (flaw
            correction only, on every pixel): the official ``--ssl-mode``.
        seeds: Initialisation seeds of ``net1`` and ``net2``; must differ. The flaw detector is
            initialised from ``seeds[0] + seeds[1]``, so runs with other seeds differ in it too.
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.
    """

    flaw_detector: FlawDetector
    schedule_step_options = ("rampup_steps",)
    schedule_span_options = ("rampup_steps",)

    def __init__(
        self,
        fc_weight: float = 1.0,
        dc_weight: float = 100.0,
        dc_threshold: float = 0.6,
        rampup_steps: int = 750,
        schedule_reference_steps: int | None = None,
        fd_weight: float = 10.0,
        fd_lr: float = 1e-4,
        fd_betas: tuple[float, float] = (0.9, 0.99),
        fd_target_dilations: int = 1,
        flaw_clip_threshold: float = 0.1,
        fd_channels: int = 64,
        fd_min_size: int = FLAW_DETECTOR_MIN_SIZE,
        ssl_mode: GCTMode = "gct",
        seeds: tuple[int, int] = (1, 2),
        dice: DiceVariant = "soft",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("fc_weight", fc_weight), ("dc_weight", dc_weight), ("fd_weight", fd_weight)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if not 0.0 <= dc_threshold <= 1.0:
            raise ValueError(f"`dc_threshold` must be in [0, 1], got {dc_threshold}.")
        if rampup_steps < 0:
            raise ValueError(f"`rampup_steps` must be >= 0, got {rampup_steps}.")
        if fd_lr <= 0:
            raise ValueError(f"`fd_lr` must be positive, got {fd_lr}.")
        if len(fd_betas) != 2 or not all(0.0 <= b < 1.0 for b in fd_betas):
            raise ValueError(f"`fd_betas` must be two numbers in [0, 1), got {fd_betas}.")
        if fd_target_dilations < 0:
            raise ValueError(f"`fd_target_dilations` must be >= 0, got {fd_target_dilations}.")
        if flaw_clip_threshold < 0:
            raise ValueError(f"`flaw_clip_threshold` must be >= 0, got {flaw_clip_threshold}.")
        if fd_channels < 1:
            raise ValueError(f"`fd_channels` must be at least 1, got {fd_channels}.")
        if fd_min_size < FLAW_DETECTOR_MIN_SIZE:
            raise ValueError(f"`fd_min_size` must be at least {FLAW_DETECTOR_MIN_SIZE}, got {fd_min_size}.")
        if ssl_mode not in ("gct", "dc", "fc"):
            raise ValueError(f"`ssl_mode` must be 'gct', 'dc' or 'fc', got {ssl_mode!r}.")
        self.seeds = check_seeds(seeds)
        dice_loss_function(dice)  # checks the variant
        self.save_hyperparameters()
        self.fc_weight = float(fc_weight)
        self.dc_weight = float(dc_weight)
        self.dc_threshold = float(dc_threshold)
        self.rampup_steps = rampup_steps
        self.schedule_reference_steps = check_reference_steps(schedule_reference_steps)
        self.fd_weight = float(fd_weight)
        self.fd_lr = float(fd_lr)
        self.fd_betas = (float(fd_betas[0]), float(fd_betas[1]))
        self.fd_target_dilations = fd_target_dilations
        self.flaw_clip_threshold = float(flaw_clip_threshold)
        self.fd_channels = fd_channels
        self.fd_min_size = fd_min_size
        self._warned_flat_flaw_map = False
        self.ssl_mode: GCTMode = ssl_mode
        self.dice_variant = dice
        self.configure_networks()

    def configure_networks(self) -> None:  # noqa: D102
        super().configure_networks()
        self.flaw_detector = build_flaw_detector(
            self._network_args["in_channels"] + 1,
            seed=self.seeds[0] + self.seeds[1],
            channels=self.fd_channels,
            min_size=self.fd_min_size,
        )

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1, self.net2, self.flaw_detector)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """``net1``, ``net2`` with the module's Adam settings; the flaw detector with its own."""
        groups = super().parameter_groups()
        groups[2].update(lr=self.fd_lr, betas=self.fd_betas, weight_decay=0.0)
        return groups

    def dc_weight_at(self, step: int) -> float:
        """``w(t) = dc_weight * exp(-5 (1 - t/T)^2)`` at the 0-based step ``t``."""
        return self.dc_weight * sigmoid_rampup(step, self.schedule_steps("rampup_steps"))

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> GCTLosses:
        """The forward passes of one step and :func:`~gpcps_lightning.losses.gct.gct_objective`.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        # One forward pass per network over labeled and unlabeled images, as the official code (batch
        # norm then normalises over both).
        images = torch.cat([batch.labeled, batch.unlabeled])
        self._warn_if_flat(*images.shape[-2:])
        p1 = torch.sigmoid(self.net1(images))
        p2 = torch.sigmoid(self.net2(images))
        # The detector learns from detached predictions; these maps also make the consistency targets.
        flaw1 = self.flaw_detector(images, p1.detach())
        flaw2 = self.flaw_detector(images, p2.detach())
        flaw1_frozen = flaw2_frozen = None
        if self.ssl_mode != "dc" and self.fc_weight > 0:
            # The same maps with the detector's parameters detached: the flaw correction's gradient
            # reaches the task networks only.
            frozen = {name: p.detach() for name, p in self.flaw_detector.named_parameters()}
            flaw1_frozen = functional_call(self.flaw_detector, frozen, (images, p1))
            flaw2_frozen = functional_call(self.flaw_detector, frozen, (images, p2))
        return gct_objective(
            p1,
            p2,
            batch.mask,
            flaw1,
            flaw2,
            flaw1_frozen,
            flaw2_frozen,
            fc_weight=self.fc_weight,
            dc_weight=self.dc_weight_at(step),
            fd_weight=self.fd_weight,
            dc_threshold=self.dc_threshold,
            flaw_clip_threshold=self.flaw_clip_threshold,
            fd_target_dilations=self.fd_target_dilations,
            mode=self.ssl_mode,
            dice=self.dice_variant,
        )

    def _warn_if_flat(self, height: int, width: int) -> None:
        if self._warned_flat_flaw_map or self.flaw_detector.map_size(height, width) != (1, 1):
            return
        self._warned_flat_flaw_map = True
        rank_zero_warn(
            f"GCT's flaw detector reduces {height}x{width} images to a single value per image: its "
            "min-max normalised flaw maps are then constant, and the dynamic consistency and flaw "
            "correction terms lose their meaning. Set fd_min_size (e.g. 256, the 7x7 map of the paper "
            "protocol) to enlarge the detector's input, and fd_channels to keep it cheap."
        )

    def loss_terms(self, losses: GCTLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        return {
            "loss": losses.total,
            "loss_sup": losses.sup,
            "loss_flaw": losses.flaw,
            "loss_dc": losses.dc,
            "loss_fd": losses.fd,
        }

    def after_update(self, stepped: bool, losses: GCTLosses, step: int, batch_size: int) -> None:
        """Log the consistency weight of the step."""
        self.log("train/dc_weight", losses.dc_weight, on_step=True, on_epoch=False, batch_size=batch_size)
