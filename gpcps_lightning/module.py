"""LightningModules: the shared segmentation base and :class:`GPCPSModule`.

The losses live in :mod:`gpcps_lightning.losses`; this module only wires them together, owns the
networks and the optimizer, and logs. Baselines (:mod:`gpcps_lightning.baselines`) derive from
:class:`SegmentationModule` and so share networks, metrics, evaluation and prediction.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import IO, Any, Literal, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.segmentation import DiceScore, MeanIoU

from gpcps_lightning._version import __version__
from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.checkpointing import (
    CHECKPOINT_KEY,
    capture_rng_state,
    read_checkpoint,
    restart_after_finished_epoch,
    restore_rng_state,
)
from gpcps_lightning.losses import (
    authors_background_mask,
    authors_dice_loss,
    background_mask,
    fuse_images,
    fused_pseudo_labels,
    gradient_penalty,
    input_gradient,
    penalty_precision_context,
    sample_eps,
    soft_dice_loss,
)
from gpcps_lightning.networks import build_network

__all__ = ["GPCPSLosses", "GPCPSModule", "SegmentationModule"]

Stage = Literal["val", "test"]


def _segmentation_metrics() -> MetricCollection:
    # Per-image ("samplewise") Dice and IoU at threshold 0.5, averaged over images: the polyp
    # literature's mDice / mIoU. Images whose prediction and mask are both empty are left out.
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


def _nonfinite_flag(values: Tensor) -> Tensor:
    """NaN where ``values`` holds a non-finite element, else 0, as a device scalar (no host sync)."""
    bad = ~torch.isfinite(values).all()
    return torch.where(bad, float("nan"), 0.0)


class SegmentationModule(L.LightningModule):
    """Base of every method in the library: networks, optimizer, evaluation and prediction.

    A subclass builds its networks with :meth:`make_network`, lists the networks that the optimizer
    trains in :meth:`trained_networks`, returns per-head probabilities from :meth:`head_probabilities`
    (the first head is the one :meth:`predict_step` returns unless it defines ``"ensemble"``) and
    implements ``training_step``. Optimization is manual, with one Adam over all trained networks (one
    parameter group each): Adam is element-wise, so this is the same update as one Adam per network,
    and ``global_step`` / ``max_steps`` count training steps, not optimizer calls.

    Logged keys: ``train/<name>`` for losses, ``val/dice_<head>``, ``val/iou_<head>`` (and ``test/...``).

    Args:
        arch: segmentation-models-pytorch architecture (``"Unet"`` is the paper's).
        encoder_name: smp encoder. Its activations need a second derivative for the gradient penalty
            (ReLU-family encoders such as the ResNets do; hard-sigmoid ones such as MobileNetV3 do not).
        encoder_weights: Pretrained encoder weights (``"imagenet"``) or ``None`` for random init.
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
    skipped_steps: Tensor
    fp16_skipped_steps: Tensor
    #: The head whose validation metrics select the checkpoint (``val/dice_<selection_head>``).
    selection_head: str = "net1"

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
        metrics = _segmentation_metrics()
        self.val_metrics = nn.ModuleDict(
            {h: metrics.clone(prefix="val/", postfix=f"_{h}") for h in self.head_names}
        )
        self.test_metrics = nn.ModuleDict(
            {h: metrics.clone(prefix="test/", postfix=f"_{h}") for h in self.head_names}
        )

    # ----------------------------------------------------------------- networks
    def make_network(self, seed: int) -> nn.Module:
        """Build one network with this module's architecture, initialised from ``seed``."""
        return build_network(seed=seed, **self._network_args)

    def trained_networks(self) -> Sequence[nn.Module]:
        """The networks the optimizer updates, one parameter group each."""
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

    # ----------------------------------------------------------------- optimization
    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        groups = [{"params": list(net.parameters())} for net in self.trained_networks()]
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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients; Lightning calls this hook after unscaling fp16 gradients."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    def active_grad_scaler(self) -> torch.amp.GradScaler | None:
        """The Trainer's fp16 gradient scaler, or ``None`` (fp32, bf16, or no Trainer attached)."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if isinstance(scaler, torch.amp.GradScaler) else None

    def optimization_step(self, losses: dict[str, Tensor], nonfinite_flag: Tensor | None = None) -> bool:
        """One manual optimization step on ``losses["loss"]``, with the non-finite checks.

        In fp32 and bf16 every value of ``losses`` (the total and its terms) and ``nonfinite_flag`` are
        checked for NaN and infinity once per step (one host synchronisation, decided jointly by all
        ranks): see ``nonfinite``. Under fp16 the gradient scaler skips overflowing steps, and
        ``nonfinite_flag`` is added to every gradient so that a non-finite value the loss does not show
        (the penalty's input gradient) makes the scaler skip the step too; whether it skipped is read back
        once (one host synchronisation).

        Args:
            losses: ``"loss"``, the total to minimise, and the named terms it is made of.
            nonfinite_flag: Optional device scalar, NaN when the step must be skipped (an input gradient
                of the penalty overflowed), else 0.

        Returns:
            Whether the optimizer stepped (``False`` for a step skipped in ``"skip"`` mode or by the scaler).

        Raises:
            FloatingPointError: In ``"raise"`` mode, on a non-finite value; the message names the step and
                the terms.
        """
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # one optimizer by construction
        scaler = self.active_grad_scaler()
        if scaler is None and not self._finite_or_handled(losses, nonfinite_flag):
            return False
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if scaler is None:
            optimizer.step()
            return True
        if nonfinite_flag is not None:
            params = [p for net in self.trained_networks() for p in net.parameters()]
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                # One fused call instead of one kernel launch per parameter (hundreds on a UNet pair).
                torch._foreach_add_(grads, nonfinite_flag)
        # The scale as device tensors (no host synchronisation): it only drops when the scaler skips.
        one = torch.ones((), device=self.skipped_steps.device)
        before = scaler.scale(one)
        optimizer.step()
        skipped = scaler.scale(one) < before
        self.fp16_skipped_steps += skipped.to(torch.long)
        self.log("train/fp16_skipped_steps", self.fp16_skipped_steps.float(), on_step=True, batch_size=1)
        # One host synchronisation, as the fp32/bf16 check makes: callers (Mean Teacher's EMA) must know.
        return not bool(skipped)

    def _finite_or_handled(self, losses: dict[str, Tensor], nonfinite_flag: Tensor | None) -> bool:
        values = {name: value.detach().float().reshape(()) for name, value in losses.items()}
        if nonfinite_flag is not None:
            values["penalty input gradient"] = nonfinite_flag.detach().float().reshape(())
        finite = bool(torch.isfinite(torch.stack(list(values.values()))).all())
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        bad = ", ".join(f"{name}={value.item():g}" for name, value in values.items() if not value.isfinite())
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite value at training step {self.global_step}: {bad or 'on another rank'}. "
                "Lower the learning rate or the loss weights, check the data, or pass nonfinite='skip' "
                "to drop such steps (counted in train/skipped_steps)."
            )
        self.optimizers().zero_grad(set_to_none=True)  # type: ignore[union-attr]
        self.skipped_steps += 1
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, batch_size=1)
        return False

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
                for i, mask in enumerate(batch.original_masks):
                    # Resize the probabilities, not the binary prediction, back to the mask's size.
                    p_i = F.interpolate(
                        p[i : i + 1], size=mask.shape[-2:], mode="bilinear", align_corners=False
                    )
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
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "rng": capture_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random-number states when a Trainer resumes fitting from ``checkpoint``."""
        rng = (checkpoint.get(CHECKPOINT_KEY) or {}).get("rng")
        if rng and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            restore_rng_state(rng)

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
        return super().load_from_checkpoint(
            io.BytesIO(data),
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=weights_only,
            **kwargs,
        )

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


class GPCPSLosses(NamedTuple):
    """The loss terms of one GP-CPS step (float32 scalars; ``grad``/``semi`` are 0 when switched off)."""

    total: Tensor
    sup: Tensor
    grad: Tensor
    semi: Tensor
    #: NaN when the penalty's input gradient holds a non-finite value, else 0 (``None`` without penalty).
    nonfinite_flag: Tensor | None = None


class GPCPSModule(SegmentationModule):
    """GP-CPS: two networks trained on labeled, unlabeled and fused images (see ``docs/method.md``).

    Each step computes ``L_sup + lambda_grad * L_grad + lambda_semi * L_semi`` and updates both
    networks from it. ``lambda_semi=0`` and/or ``lambda_grad=0`` give the paper's ablation rows;
    with ``lambda_grad=0`` no second-order graph is built, and with both at 0 no fused forward pass is
    run. Evaluation reports ``net1``, ``net2`` and their probability average ``ensemble``;
    prediction returns the ensemble.

    Args:
        lambda_grad: Weight of the gradient penalty ``L_grad`` (paper: 1e-3).
        lambda_semi: Weight of the fused cross pseudo supervision ``L_semi`` (paper: 1.0).
        seeds: Initialisation seeds of ``net1`` and ``net2``; must differ.
        eps_mode: ``"per_sample"`` fusion weights (specification) or ``"per_batch"`` (authors' code):
            the batch's ``eps`` (the datamodule's draws), or its first sample's weight for the whole
            batch; drawn here for a batch without ``eps``. Unused for a batch with its own ``fused``.
        dice: ``"soft"`` per-sample soft Dice with smoothing 1 (specification) or ``"authors"``
            batch-global squared Dice with smoothing 1e-5 (authors' code).
        background: ``"paper"`` background set ``(y < 0.5) | (mean prob < threshold)`` (specification) or
            ``"authors"``: ``y == 0`` minus a one-pixel band around the mask (authors' code).
        background_threshold: Threshold on the networks' mean probability in the paper's background set.
        gp_every_n_steps: Compute ``L_grad`` every k steps with weight ``k * lambda_grad`` (lazy
            regularisation, as StyleGAN2's R1); 1 is the paper's method.
        penalty_share_every_n_steps: Every n penalty steps, log the weighted penalty's share of the total
            loss (``train/penalty_share_loss``) and of the parameter-gradient norm
            (``train/penalty_share_grad_norm``: ``||d(w L_grad)/dtheta|| / ||d(total)/dtheta||``). It costs
            two extra backward passes on those steps and changes nothing else; 0 (default) turns it off.
        **kwargs: Network, optimizer and evaluation arguments of :class:`SegmentationModule`.
    """

    head_names = ("net1", "net2", "ensemble")
    selection_head = "ensemble"

    def __init__(
        self,
        lambda_grad: float = 1e-3,
        lambda_semi: float = 1.0,
        seeds: tuple[int, int] = (1, 2),
        eps_mode: Literal["per_sample", "per_batch"] = "per_sample",
        dice: Literal["soft", "authors"] = "soft",
        background: Literal["paper", "authors"] = "paper",
        background_threshold: float = 0.5,
        gp_every_n_steps: int = 1,
        penalty_share_every_n_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if lambda_grad < 0:
            raise ValueError(f"`lambda_grad` must be >= 0, got {lambda_grad}.")
        if lambda_semi < 0:
            raise ValueError(f"`lambda_semi` must be >= 0, got {lambda_semi}.")
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise ValueError(f"`seeds` must be two different integers, got {seeds}.")
        if eps_mode not in ("per_sample", "per_batch"):
            raise ValueError(f"`eps_mode` must be 'per_sample' or 'per_batch', got {eps_mode!r}.")
        if dice not in ("soft", "authors"):
            raise ValueError(f"`dice` must be 'soft' or 'authors', got {dice!r}.")
        if background not in ("paper", "authors"):
            raise ValueError(f"`background` must be 'paper' or 'authors', got {background!r}.")
        if not 0.0 < background_threshold < 1.0:
            raise ValueError(f"`background_threshold` must be in (0, 1), got {background_threshold}.")
        if gp_every_n_steps < 1:
            raise ValueError(f"`gp_every_n_steps` must be >= 1, got {gp_every_n_steps}.")
        if penalty_share_every_n_steps < 0:
            raise ValueError(
                f"`penalty_share_every_n_steps` must be >= 0 (0: off), got {penalty_share_every_n_steps}."
            )
        self.save_hyperparameters()
        self.lambda_grad = float(lambda_grad)
        self.lambda_semi = float(lambda_semi)
        self.eps_mode = eps_mode
        self.dice_variant = dice
        self.background_variant = background
        self.background_threshold = background_threshold
        self.gp_every_n_steps = gp_every_n_steps
        self.penalty_share_every_n_steps = penalty_share_every_n_steps
        #: ``(step, loss share, gradient-norm share)`` of every measured step of this process (not saved in
        #: checkpoints), for summaries such as the reproduction runner's.
        self.penalty_share_history: list[tuple[int, float, float]] = []
        self.net1 = self.make_network(seeds[0])
        self.net2 = self.make_network(seeds[1])

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1, self.net2)

    def on_fit_start(self) -> None:
        """Refuse PyTorch's SyncBatchNorm with the penalty: its backward cannot be differentiated again.

        Raises:
            ValueError: If ``lambda_grad > 0`` and the networks hold ``torch.nn.SyncBatchNorm`` layers.
        """
        if self.lambda_grad > 0 and any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):
            raise ValueError(
                "Trainer(sync_batchnorm=True) installs torch.nn.SyncBatchNorm, whose backward pass cannot be "
                "differentiated again, which the gradient penalty needs. Use the plugin "
                "gpcps_lightning.distributed.GradientSyncBatchNorm instead (Trainer(plugins=[...]), or "
                "--trainer.plugins+=gpcps_lightning.distributed.GradientSyncBatchNorm), or set lambda_grad=0."
            )

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        p1 = torch.sigmoid(self.net1(images)).float()
        p2 = torch.sigmoid(self.net2(images)).float()
        return {"net1": p1, "net2": p2, "ensemble": (p1 + p2) / 2.0}

    def _dice(self, probs: Tensor, target: Tensor) -> Tensor:
        if self.dice_variant == "authors":
            return authors_dice_loss(probs, target)
        return soft_dice_loss(probs, target)

    def penalty_due(self, step: int) -> bool:
        """Whether step ``step`` (0-based) computes the gradient penalty."""
        return self.lambda_grad > 0 and step % self.gp_every_n_steps == 0

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> GPCPSLosses:
        """All loss terms of one step (forward passes included); no optimizer involved.

        Args:
            batch: Labeled images and masks, unlabeled images and optionally their fusion.
            step: 0-based training step, which decides whether a lazy penalty is due.

        Returns:
            The loss terms and their weighted total.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        if not isinstance(batch, SemiSupervisedBatch):
            raise TypeError(
                f"GPCPSModule trains on gpcps_lightning.SemiSupervisedBatch, got {type(batch).__name__}."
            )
        batch.validate()
        labeled, y = batch.labeled, batch.mask
        zero = labeled.new_zeros((), dtype=torch.float32)
        p1_labeled, p2_labeled = torch.sigmoid(self.net1(labeled)), torch.sigmoid(self.net2(labeled))
        sup = self._dice(p1_labeled, y) + self._dice(p2_labeled, y)
        grad_term, semi_term, flag = zero, zero, None
        with_penalty = self.penalty_due(step)
        if self.lambda_semi > 0 or with_penalty:
            if batch.fused is not None and batch.eps is not None:
                fused, eps = batch.fused, batch.eps
            else:
                if batch.eps is None:  # a batch from elsewhere than the library's datamodules
                    eps = sample_eps(batch.batch_size, self.eps_mode, device=labeled.device)
                elif self.eps_mode == "per_batch":
                    eps = batch.eps[:1].expand_as(batch.eps)  # the first sample's weight for all
                else:
                    eps = batch.eps
                fused = fuse_images(labeled, batch.unlabeled, eps)
            if with_penalty:
                fused = fused.detach().requires_grad_(True)
            # One forward pass of each network on the fused batch serves both L_semi and L_grad. Under
            # fp16 autocast the penalty's part of the graph runs in fp32 (see `penalty_precision_context`).
            with penalty_precision_context(fused.device.type, with_penalty):
                p1 = torch.sigmoid(self.net1(fused))
                p2 = torch.sigmoid(self.net2(fused))
            if self.lambda_semi > 0:
                y1 = fused_pseudo_labels(y, p2, eps)
                y2 = fused_pseudo_labels(y, p1, eps)
                semi_term = self._dice(p1, y1) + self._dice(p2, y2)
            if with_penalty:
                total_prob = p1.float().sum() + p2.float().sum()
                grad = input_gradient(total_prob, fused)
                flag = _nonfinite_flag(grad)
                if self.background_variant == "authors":
                    bg = authors_background_mask(y)
                else:
                    bg = background_mask(y, p1, p2, self.background_threshold)
                grad_term = gradient_penalty(grad, bg)
        total = sup + self.lambda_semi * semi_term
        if with_penalty:
            total = total + (self.lambda_grad * self.gp_every_n_steps) * grad_term
        return GPCPSLosses(total=total, sup=sup, grad=grad_term, semi=semi_term, nonfinite_flag=flag)

    def _penalty_share_due(self, step: int) -> bool:
        n = self.penalty_share_every_n_steps
        return n > 0 and (step // self.gp_every_n_steps) % n == 0

    def _log_penalty_share(self, losses: GPCPSLosses, batch_size: int) -> None:
        """Log the weighted penalty's share of the total loss and of the parameter-gradient norm."""
        weighted = (self.lambda_grad * self.gp_every_n_steps) * losses.grad
        params = [p for net in self.trained_networks() for p in net.parameters() if p.requires_grad]

        scaler = self.active_grad_scaler()
        # Under fp16 both backward passes are scaled alike (no underflow in the labeled path); the ratio
        # does not depend on the scale.
        scale = scaler.get_scale() if scaler is not None else 1.0

        def norm(value: Tensor) -> Tensor:
            grads = torch.autograd.grad(value * scale, params, retain_graph=True, allow_unused=True)
            return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads if g is not None]))

        with torch.no_grad():
            loss_share = weighted.detach() / losses.total.detach()
        grad_share = norm(weighted) / norm(losses.total)
        for name, value in (("penalty_share_loss", loss_share), ("penalty_share_grad_norm", grad_share)):
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        self.penalty_share_history.append((self.global_step, float(loss_share), float(grad_share)))

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> Tensor:  # noqa: D102
        step = self.global_step
        losses = self.compute_losses(batch, step)
        logged = {"loss": losses.total, "loss_sup": losses.sup, "loss_semi": losses.semi}
        if self.penalty_due(step):
            logged["loss_grad"] = losses.grad
            if self._penalty_share_due(step):
                self._log_penalty_share(losses, batch.batch_size)
        try:
            self.optimization_step(logged, losses.nonfinite_flag)
        except RuntimeError as err:
            # Autograd only finds a missing second derivative in the final backward pass.
            if "derivative for" in str(err) and "not implemented" in str(err) and self.penalty_due(step):
                raise RuntimeError(
                    f"The encoder {self._network_args['encoder_name']!r} uses an operation without a second "
                    f"derivative ({err}). The gradient penalty needs one: choose an encoder with ReLU-family "
                    "activations (e.g. 'resnet34') or set lambda_grad=0."
                ) from err
            raise
        self.log_losses(logged, batch.batch_size)
        return losses.total.detach()
