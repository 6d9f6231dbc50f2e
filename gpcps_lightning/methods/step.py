"""The manual optimisation step every method takes: precision, gradient scaler, non-finite policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from gpcps_lightning._lightning_internals import attached_trainer

__all__ = ["ManualStepModule"]


class ManualStepModule(L.LightningModule):
    """One optimizer, stepped by hand on a loss, with gradient clipping and the non-finite checks.

    A subclass sets ``automatic_optimization = False``, ``nonfinite`` and ``gradient_clip_val``, registers
    the ``skipped_steps`` and ``fp16_skipped_steps`` counters (long scalar buffers) and lists its trained
    networks in :meth:`trained_networks`; :class:`~gpcps_lightning.methods.base.SegmentationModule` does.
    """

    nonfinite: Literal["raise", "skip"]
    gradient_clip_val: float | None
    skipped_steps: Tensor
    fp16_skipped_steps: Tensor

    def trained_networks(self) -> Sequence[nn.Module]:
        """The networks the optimizer updates, one parameter group each."""
        raise NotImplementedError

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients; Lightning calls this hook after unscaling fp16 gradients."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    def active_grad_scaler(self) -> torch.amp.GradScaler | None:
        """The Trainer's fp16 gradient scaler, or ``None`` (fp32, bf16, or no Trainer attached)."""
        if attached_trainer(self) is None:
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
        if attached_trainer(self) is not None:
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
