"""The supervised baseline (one network, labeled images only): its forward pass and its objective."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.baselines import SupervisedLosses, supervised_objective
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function
from gpcps_lightning.methods.base import SegmentationModule

__all__ = ["SupervisedModule"]


class SupervisedModule(SegmentationModule):
    """One network trained on the labeled images only (Table 1 "UNet", Table 2 row I).

    The loss is GP-CPS's supervised soft Dice for one network, ``Dice(p(l), y)``. Training batches are
    :class:`~gpcps_lightning.SemiSupervisedBatch` so that every method runs on the same datamodule;
    ``unlabeled`` (and ``fused``) are ignored. The one head is ``net1``, which is also the selection
    head. Logged: ``train/loss``, ``train/loss_sup``. Batches with ignore regions
    (``SemiSupervisedBatch.valid``, ST++'s cutout) are trained on their valid pixels only
    (:func:`~gpcps_lightning.losses.dice.dice_loss_with_ignore`).

    Args:
        network_seed: Initialisation seed of ``net1`` (GP-CPS's ``net1`` uses 1 by default, so the two start
            from the same weights).
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice, as
            in :class:`~gpcps_lightning.GPCPSModule`.
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.
    """

    head_names = ("net1",)
    selection_head = "net1"
    accepts_ignore_regions = True

    def __init__(self, network_seed: int = 1, dice: DiceVariant = "soft", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dice_loss_function(dice)  # checks the variant
        self.save_hyperparameters()
        self.dice_variant = dice
        self.network_seed = network_seed
        self.configure_networks()

    def configure_networks(self) -> None:  # noqa: D102
        self.net1 = self.make_network(self.network_seed)

    def trained_networks(self) -> Sequence[nn.Module]:  # noqa: D102
        return (self.net1,)

    def head_probabilities(self, images: Tensor) -> dict[str, Tensor]:  # noqa: D102
        return {"net1": torch.sigmoid(self.net1(images)).float()}

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> SupervisedLosses:
        """The forward pass of one step and its supervised loss; no optimizer involved.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        return supervised_objective(
            torch.sigmoid(self.net1(batch.labeled)), batch.mask, self.dice_variant, valid=batch.valid
        )

    def loss_terms(self, losses: SupervisedLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        return {"loss": losses.total, "loss_sup": losses.sup}
