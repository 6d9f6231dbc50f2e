"""The base of every method: networks, optimizer, one training-step template, evaluation, checkpoints.

A method (:mod:`gpcps_lightning.methods.gpcps`, ``supervised``, ``cps``, ``mean_teacher``) fills in hooks,
in the ``configure_*`` style of torchgeo's trainers:

- :meth:`SegmentationModule.configure_networks` builds the networks (``make_network(seed)``);
  :meth:`~SegmentationModule.trained_networks` lists those the optimizer trains and
  :meth:`~SegmentationModule.head_probabilities` what evaluation reports;
- :meth:`~SegmentationModule.compute_losses` runs the forward passes and calls the method's objective
  (a pure function of :mod:`gpcps_lightning.losses`); :meth:`~SegmentationModule.loss_terms` names the
  terms to check and log.

:meth:`SegmentationModule.training_step` is written once, here; the manual optimisation step itself
(precision, gradient scaler, non-finite policy) is :class:`~gpcps_lightning.methods.step.ManualStepModule`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import IO, Any, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.segmentation import DiceScore, MeanIoU

from gpcps_lightning._lightning_internals import attached_trainer
from gpcps_lightning._utils import public_class_path, resize_to_original_sizes
from gpcps_lightning._version import __version__
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.checkpointing import (
    CHECKPOINT_KEY,
    capture_rng_state,
    read_checkpoint,
    restart_after_finished_epoch,
    restore_rng_state,
)
from gpcps_lightning.methods.step import ManualStepModule
from gpcps_lightning.networks import build_network, skip_pretrained_weights

__all__ = ["SegmentationModule", "TwoNetworkModule", "check_seeds", "segmentation_metrics"]

Stage = Literal["val", "test"]


def segmentation_metrics() -> MetricCollection:
    """The evaluation metrics, ``dice`` and ``iou``, that validation, test and ``gpcps evaluate`` report.

    Per-image ("samplewise") Dice and IoU at threshold 0.5, averaged over images: the polyp literature's
    mDice / mIoU. Images whose prediction and mask are both empty are left out.
    """
    return MetricCollection(
        {
            "dice": DiceScore(
                num_classes=1,
                include_background=True,
                average="macro",
                aggregation_level="samplewise",
                input_format="one-hot",
            ),
            "iou": MeanIoU(num_classes=1, include_background=True, per_class=False, input_format="one-hot"),
        }
    )


def _batch_images(batch: Any) -> Tensor:
    if isinstance(batch, (EvaluationBatch, PredictionBatch)):
        return batch.image
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(
        "Expected an EvaluationBatch, a PredictionBatch or an image tensor (N, C, H, W), "
        f"got {type(batch).__name__}."
    )


def check_seeds(seeds: Sequence[int]) -> tuple[int, int]:
    """The initialisation seeds of two networks, checked.

    Raises:
        ValueError: Unless ``seeds`` holds two different integers.
    """
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f"`seeds` must be two different integers, got {seeds}.")
    return (seeds[0], seeds[1])


class SegmentationModule(ManualStepModule):
    """Base of every method: networks, optimizer, training-step template, evaluation and prediction.

    A subclass checks its own arguments, calls ``save_hyperparameters()`` and then
    :meth:`configure_networks`, and implements :meth:`trained_networks`, :meth:`head_probabilities`,
    :meth:`compute_losses` and :meth:`loss_terms`. The first head is the one :meth:`predict_step` returns
    unless there is an ``"ensemble"``. One Adam trains all trained networks, one parameter group each
    (:meth:`parameter_groups`; the same update as one Adam per network, and ``global_step`` counts
    training steps).

    Logged keys: ``train/<name>`` for losses, ``val/dice_<head>``, ``val/iou_<head>`` (and ``test/...``).

    Args:
        arch: segmentation-models-pytorch architecture (``"Unet"`` is the paper's).
        encoder_name: smp encoder. Its activations need a second derivative for the gradient penalty
            (ReLU-family encoders such as the ResNets do; hard-sigmoid ones such as MobileNetV3 do not).
        encoder_weights: Pretrained encoder weights: an smp weights name (``"imagenet"``, downloaded by
            smp), the path of a local ``.pth``/``.pt``/``.safetensors`` file holding the encoder's state
            dict or a whole network's (its ``encoder.*`` part is taken; see
            :func:`~gpcps_lightning.networks.load_encoder_state_dict` for the rule), or ``None`` for
            random init. Every network of the method starts from these encoder weights; decoders and
            heads are initialised from the method's seeds as without them. The path is recorded as a
            hyperparameter, but :meth:`load_from_checkpoint` does not read the file (the checkpoint
            holds the trained weights), so a checkpoint loads on a machine without it.
        in_channels: Input channels of the images.
        network_kwargs: Further ``smp.create_model`` arguments (``encoder_depth``, ``decoder_channels``).
        lr: Adam learning rate.
        betas: Adam betas.
        adam_eps: Adam epsilon.
        weight_decay: Adam (L2) weight decay.
        gradient_clip_val: Clip the gradient norm of each step to this value (``None``: no clipping).
            Applied after fp16 unscaling. Set it here, not on the Trainer: Lightning does not clip
            under manual optimization.
        threshold: Probability threshold of the evaluation metrics and of binary predictions.
        nonfinite: What a NaN or infinite loss term (or penalty input gradient) does in fp32 and bf16:
            ``"raise"`` stops training with an error naming the step and the term; ``"skip"`` drops the
            step (no update) and counts it in ``train/skipped_steps``. Under fp16 the gradient scaler
            already skips overflowing steps; they are counted in ``train/fp16_skipped_steps``.
    """

    head_names: tuple[str, ...] = ("net1",)
    #: The head whose validation metrics select the checkpoint (``val/dice_<selection_head>``).
    selection_head: str = "net1"
    #: Whether the objective honours ``SemiSupervisedBatch.valid`` (ignore regions); batches with one are
    #: refused otherwise, so that no method trains on pixels meant to be ignored.
    accepts_ignore_regions: bool = False

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        in_channels: int = 3,
        network_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        gradient_clip_val: float | None = None,
        threshold: float = 0.5,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if self.selection_head not in self.head_names:
            raise ValueError(
                f"{type(self).__name__}.selection_head={self.selection_head!r} must be one of its "
                f"head_names {self.head_names}."
            )
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas}.")
        if adam_eps <= 0:
            raise ValueError(f"`adam_eps` must be positive, got {adam_eps}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"`gradient_clip_val` must be positive or None, got {gradient_clip_val}.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold}.")
        if encoder_weights is not None and not isinstance(encoder_weights, str):
            # A pathlib.Path would be recorded in the hyperparameters, which weights-only loading refuses.
            raise TypeError(
                "`encoder_weights` must be a string (an smp weights name or a file path) or None, got "
                f"{type(encoder_weights).__name__}; pass str(path)."
            )
        self.automatic_optimization = False
        self._network_args: dict[str, Any] = dict(
            arch=arch,
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            network_kwargs=network_kwargs,
        )
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = adam_eps
        self.weight_decay = weight_decay
        self.gradient_clip_val = gradient_clip_val
        self.threshold = threshold
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"`nonfinite` must be 'raise' or 'skip', got {nonfinite!r}.")
        self.nonfinite = nonfinite
        # Counters of dropped steps, saved in checkpoints with the weights.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("fp16_skipped_steps", torch.zeros((), dtype=torch.long))
        metrics = segmentation_metrics()
        self.val_metrics = nn.ModuleDict(
            {h: metrics.clone(prefix="val/", postfix=f"_{h}") for h in self.head_names}
        )
        self.test_metrics = nn.ModuleDict(
            {h: metrics.clone(prefix="test/", postfix=f"_{h}") for h in self.head_names}
        )

    # ----------------------------------------------------------------- networks (hooks)
    def make_network(self, seed: int) -> nn.Module:
        """Build one network with this module's architecture, initialised from ``seed``."""
        return build_network(seed=seed, **self._network_args)

    def configure_networks(self) -> None:
        """Build the method's networks (with :meth:`make_network`) and assign them as attributes."""
        raise NotImplementedError

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:
        """Foreground probabilities of each evaluated head, keyed as :attr:`head_names`.

        Shape:
            - images: (N, C, H, W)
            - each output: (N, 1, H, W), float32
        """
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Foreground probabilities of the predicting head (the ensemble where there is one).

        Shape:
            - images: (N, C, H, W)
            - output: (N, 1, H, W), float32 in [0, 1]
        """
        heads = self.head_probabilities(images)
        return heads.get("ensemble", heads[self.head_names[0]])

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one per trained network, in :meth:`trained_networks` order.

        A group may override the module's ``lr``, ``betas``, ``eps`` or ``weight_decay`` for its network
        (GCT's flaw detector has its own learning rate and betas): one Adam with per-group settings
        updates each parameter exactly as a separate Adam per network would.
        """
        return [{"params": list(net.parameters())} for net in self.trained_networks()]

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        groups = self.parameter_groups()
        # The fused implementation (same algorithm) takes a fraction of the time of the default one. It
        # unscales fp16 gradients inside its step, after on_before_optimizer_step: with clipping, which
        # must see unscaled gradients, the multi-tensor implementation is used instead.
        fused = self.gradient_clip_val is None
        return torch.optim.Adam(
            groups,
            lr=self.lr,
            betas=self.betas,
            eps=self.adam_eps,
            weight_decay=self.weight_decay,
            fused=fused,
            foreach=None if fused else True,
        )

    # ----------------------------------------------------------------- training (hooks and template)
    def check_training_batch(self, batch: Any) -> SemiSupervisedBatch:
        """``batch``, checked.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        if not isinstance(batch, SemiSupervisedBatch):
            raise TypeError(
                f"{type(self).__name__} trains on gpcps_lightning.SemiSupervisedBatch, "
                f"got {type(batch).__name__}."
            )
        batch.validate()
        if batch.valid is not None and not self.accepts_ignore_regions:
            raise ValueError(
                f"{type(self).__name__} cannot train on batches with ignore regions (`valid` is set): its "
                "objective would use the ignored pixels. Train on such batches (ST++'s pseudo-labelled "
                "images) with SupervisedModule, or give batches with valid=None."
            )
        return batch

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> Any:
        """The forward passes of one step and the method's objective on them; no optimizer involved.

        Args:
            batch: The step's batch.
            step: 0-based training step (for terms that follow a schedule).

        Returns:
            The objective's loss terms (a NamedTuple with ``total``; ``nonfinite_flag`` where there is one).
        """
        raise NotImplementedError

    def loss_terms(self, losses: Any, step: int) -> dict[str, Tensor]:
        """The values to check and log: ``"loss"`` (the total trained on) first, then the named terms."""
        raise NotImplementedError

    def before_update(self, losses: Any, step: int, batch_size: int) -> None:
        """Called with the step's losses (and their graph) before the optimizer step; does nothing here."""

    def after_update(self, stepped: bool, losses: Any, step: int, batch_size: int) -> None:
        """Called after the optimizer step (``stepped``: whether it updated anything); does nothing here."""

    def on_step_error(self, err: RuntimeError, step: int) -> None:
        """Called when the optimization step raises; may raise a clearer error instead (default: nothing)."""

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> Tensor:
        """Losses (:meth:`compute_losses`), one optimization step on them, then logging.

        Returns:
            The detached total loss.
        """
        step = self.global_step
        losses = self.compute_losses(batch, step)
        logged = self.loss_terms(losses, step)
        self.before_update(losses, step, batch.batch_size)
        try:
            stepped = self.optimization_step(logged, getattr(losses, "nonfinite_flag", None))
        except RuntimeError as err:
            self.on_step_error(err, step)
            raise
        self.log_losses(logged, batch.batch_size)
        self.after_update(stepped, losses, step, batch.batch_size)
        return logged["loss"].detach()

    def log_losses(self, losses: dict[str, Tensor], batch_size: int) -> None:
        """Log training losses as ``train/<name>``; the named terms also go to the progress bar."""
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value.detach(),
                on_step=True,
                on_epoch=False,
                prog_bar=name != "loss",
                batch_size=batch_size,
            )

    # ----------------------------------------------------------------- evaluation
    def _evaluation_step(self, batch: EvaluationBatch, stage: Stage) -> None:
        if not isinstance(batch, EvaluationBatch):
            raise TypeError(
                f"{stage} batches must be gpcps_lightning.EvaluationBatch, got {type(batch).__name__}."
            )
        batch.validate()
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        probs = self.head_probabilities(batch.image)
        for head, p in probs.items():
            collection = metrics[head]
            assert isinstance(collection, MetricCollection)  # built so in __init__
            if batch.original_masks is None:
                collection.update((p >= self.threshold).long(), (batch.mask >= 0.5).long())
            else:
                masks = batch.original_masks
                resized = resize_to_original_sizes(p, [m.shape[-2:] for m in masks])
                for mask, p_one in zip(masks, resized, strict=True):
                    p_i = p_one[None]
                    target = (mask.reshape(p_i.shape) >= 0.5).long()
                    collection.update((p_i >= self.threshold).long(), target)
            self.log_dict(collection, on_step=False, on_epoch=True, batch_size=batch.batch_size)

    def validation_step(self, batch: EvaluationBatch, batch_idx: int) -> None:  # noqa: D102
        self._evaluation_step(batch, "val")

    def test_step(self, batch: EvaluationBatch, batch_idx: int) -> None:  # noqa: D102
        self._evaluation_step(batch, "test")

    def predict_step(self, batch: PredictionBatch | EvaluationBatch | Tensor, batch_idx: int) -> Tensor:
        """Foreground probabilities (N, 1, H, W) at the training size; the ensemble's where there is one."""
        return self(_batch_images(batch))

    # ----------------------------------------------------------------- checkpoints
    def on_train_start(self) -> None:
        """Make a run with ``max_steps`` resumed from a finished epoch run the next epoch in full.

        See :func:`gpcps_lightning.checkpointing.restart_after_finished_epoch` (a Lightning resume bug).
        """
        restart_after_finished_epoch(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stamp the checkpoint with the library version, the module class and the random-number states.

        The random states (torch, CUDA, NumPy, Python) make a resumed run draw the same fusion weights,
        augmentations and noise as an uninterrupted one; they are restored only when training resumes
        (``Trainer.fit(ckpt_path=...)``), never by ``load_from_checkpoint``.
        """
        cls = type(self)
        checkpoint[CHECKPOINT_KEY] = {
            "version": __version__,
            "class": public_class_path(f"{cls.__module__}.{cls.__qualname__}"),
            "rng": capture_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random-number states when a Trainer resumes fitting from ``checkpoint``."""
        rng = (checkpoint.get(CHECKPOINT_KEY) or {}).get("rng")
        if rng and self.resuming_fit():
            restore_rng_state(rng)

    def resuming_fit(self) -> bool:
        """Whether a Trainer is fitting this module (in ``on_load_checkpoint``: resuming, not loading)."""
        return attached_trainer(self) is not None and self.trainer.state.fn == TrainerFn.FITTING

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | IO[bytes] | Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, after checking the file.

        The checkpoint is read once, checked with :func:`gpcps_lightning.checkpointing.read_checkpoint`
        (complete, written by this library, by this class or a subclass) and loaded weights-only by default.
        The networks are built without their pretrained encoder weights
        (:func:`~gpcps_lightning.networks.skip_pretrained_weights`): the checkpoint's weights replace
        them, so a weights file named by ``encoder_weights`` need not exist here and nothing is downloaded.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If the file is truncated, foreign, or written by another module class.
        """
        if isinstance(checkpoint_path, (str, bytes)) or hasattr(checkpoint_path, "__fspath__"):
            from lightning.fabric.utilities.cloud_io import get_filesystem

            path = str(checkpoint_path)
            if not get_filesystem(path).exists(path):
                raise FileNotFoundError(f"Checkpoint file not found: {path}.")
            with get_filesystem(path).open(path, "rb") as f:
                data = f.read()
        else:
            data = checkpoint_path.read()
            path = getattr(checkpoint_path, "name", "<in-memory checkpoint>")
        try:
            read_checkpoint(io.BytesIO(data), expected_class=cls, weights_only=bool(weights_only))
        except ValueError as err:
            raise ValueError(str(err).replace("<in-memory checkpoint>", str(path))) from err
        with skip_pretrained_weights():
            return super().load_from_checkpoint(
                io.BytesIO(data),
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=weights_only,
                **kwargs,
            )


class TwoNetworkModule(SegmentationModule):
    """Two networks of one architecture, ``net1`` and ``net2``, from the seeds in ``self.seeds``.

    Both are trained; evaluation reports each and the average of their probabilities, ``ensemble``, which
    selects the checkpoint and is what prediction returns. A subclass sets ``self.seeds`` (checked with
    :func:`check_seeds`) before calling :meth:`configure_networks`.
    """

    head_names = ("net1", "net2", "ensemble")
    selection_head = "ensemble"
    seeds: tuple[int, int]
    net1: nn.Module
    net2: nn.Module

    def configure_networks(self) -> None:  # noqa: D102
        self.net1 = self.make_network(self.seeds[0])
        self.net2 = self.make_network(self.seeds[1])

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1, self.net2)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        p1 = torch.sigmoid(self.net1(images)).float()
        p2 = torch.sigmoid(self.net2(images)).float()
        return {"net1": p1, "net2": p2, "ensemble": (p1 + p2) / 2.0}
