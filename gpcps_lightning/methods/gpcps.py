"""GP-CPS as a LightningModule: the forward passes of a step and one call of its objective."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.checkpointing import CHECKPOINT_KEY
from gpcps_lightning.losses.gpcps import (
    GPCPSLosses,
    fuse_images,
    gpcps_objective,
    penalty_precision_context,
    sample_eps,
)
from gpcps_lightning.methods.base import TwoNetworkModule, check_seeds

__all__ = ["GPCPSModule"]


class GPCPSModule(TwoNetworkModule):
    """GP-CPS: two networks trained on labeled, unlabeled and fused images (see ``docs/method.md``).

    Each step minimises ``L_sup + lambda_grad * L_grad + lambda_semi * L_semi``
    (:func:`~gpcps_lightning.losses.gpcps.gpcps_objective`). ``lambda_semi=0`` and/or ``lambda_grad=0``
    give the paper's ablation rows; with ``lambda_grad=0`` no second-order graph is built, and with both at
    0 no fused forward pass is run. Evaluation reports ``net1``, ``net2`` and ``ensemble``; prediction
    returns the ensemble.

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
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.
    """

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
        self.seeds = check_seeds(seeds)
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
        #: ``(step, loss share, gradient-norm share)`` of every measured step, for summaries such as the
        #: reproduction runner's. Saved in checkpoints: a resumed fit continues the history it restored.
        self.penalty_share_history: list[tuple[int, float, float]] = []
        #: Whether the history covers the whole training: false after resuming from a checkpoint written
        #: before checkpoints kept it (the steps before the interruption are missing).
        self.penalty_share_history_complete = True
        self.configure_networks()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base stamp, plus the penalty-share history measured so far."""
        super().on_save_checkpoint(checkpoint)
        history = [list(entry) for entry in self.penalty_share_history]
        checkpoint[CHECKPOINT_KEY]["penalty_share_history"] = history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base restore, plus the penalty-share history when a Trainer resumes fitting."""
        super().on_load_checkpoint(checkpoint)
        if not self.resuming_fit():
            return
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("penalty_share_history")
        self.penalty_share_history = [(int(s), float(a), float(b)) for s, a, b in saved or []]
        self.penalty_share_history_complete = saved is not None

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

    def penalty_due(self, step: int) -> bool:
        """Whether step ``step`` (0-based) computes the gradient penalty."""
        return self.lambda_grad > 0 and step % self.gp_every_n_steps == 0

    def fusion(self, batch: SemiSupervisedBatch) -> tuple[Tensor, Tensor]:
        """The fused images (Eq. 1) and their weights: the batch's own, or fused here with ``eps_mode``."""
        if batch.fused is not None and batch.eps is not None:
            return batch.fused, batch.eps
        if batch.eps is None:  # a batch from elsewhere than the library's datamodules
            eps = sample_eps(batch.batch_size, self.eps_mode, device=batch.labeled.device)
        elif self.eps_mode == "per_batch":
            eps = batch.eps[:1].expand_as(batch.eps)  # the first sample's weight for all
        else:
            eps = batch.eps
        return fuse_images(batch.labeled, batch.unlabeled, eps), eps

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> GPCPSLosses:
        """The forward passes of one step and :func:`~gpcps_lightning.losses.gpcps.gpcps_objective`.

        Args:
            batch: Labeled images and masks, unlabeled images and optionally their fusion.
            step: 0-based training step, which decides whether a lazy penalty is due.

        Returns:
            The loss terms and their weighted total.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        p1_labeled = torch.sigmoid(self.net1(batch.labeled))
        p2_labeled = torch.sigmoid(self.net2(batch.labeled))
        with_penalty = self.penalty_due(step)
        fused = eps = p1 = p2 = None
        if self.lambda_semi > 0 or with_penalty:
            fused, eps = self.fusion(batch)
            if with_penalty:
                fused = fused.detach().requires_grad_(True)
            # One forward pass of each network on the fused batch serves both L_semi and L_grad. Under
            # fp16 autocast the penalty's part of the graph runs in fp32 (see `penalty_precision_context`).
            with penalty_precision_context(fused.device.type, with_penalty):
                p1 = torch.sigmoid(self.net1(fused))
                p2 = torch.sigmoid(self.net2(fused))
        return gpcps_objective(
            p1_labeled,
            p2_labeled,
            batch.mask,
            p1,
            p2,
            eps,
            fused=fused if with_penalty else None,
            lambda_semi=self.lambda_semi,
            lambda_grad=self.lambda_grad * self.gp_every_n_steps if with_penalty else 0.0,
            dice=self.dice_variant,
            background=self.background_variant,
            background_threshold=self.background_threshold,
        )

    def loss_terms(self, losses: GPCPSLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        logged = {"loss": losses.total, "loss_sup": losses.sup, "loss_semi": losses.semi}
        if self.penalty_due(step):
            logged["loss_grad"] = losses.penalty
        return logged

    def before_update(self, losses: GPCPSLosses, step: int, batch_size: int) -> None:  # noqa: D102
        if self.penalty_due(step) and self._penalty_share_due(step):
            self._log_penalty_share(losses, batch_size)

    def on_step_error(self, err: RuntimeError, step: int) -> None:
        """Name the encoder when autograd finds no second derivative (only in the final backward pass).

        Raises:
            RuntimeError: If the penalty was due and an operation has no second derivative.
        """
        if "derivative for" in str(err) and "not implemented" in str(err) and self.penalty_due(step):
            raise RuntimeError(
                f"The encoder {self._network_args['encoder_name']!r} uses an operation without a second "
                f"derivative ({err}). The gradient penalty needs one: choose an encoder with ReLU-family "
                "activations (e.g. 'resnet34') or set lambda_grad=0."
            ) from err

    def _penalty_share_due(self, step: int) -> bool:
        n = self.penalty_share_every_n_steps
        return n > 0 and (step // self.gp_every_n_steps) % n == 0

    def _log_penalty_share(self, losses: GPCPSLosses, batch_size: int) -> None:
        """Log the weighted penalty's share of the total loss and of the parameter-gradient norm."""
        weighted = (self.lambda_grad * self.gp_every_n_steps) * losses.penalty
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
