"""Cross pseudo supervision (CPS) as a LightningModule: its forward passes and its objective."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.losses.baselines import CPSLosses, cps_objective
from gpcps_lightning.losses.dice import DiceVariant, dice_loss_function
from gpcps_lightning.methods.base import TwoNetworkModule, check_seeds

__all__ = ["CPSModule"]


class CPSModule(TwoNetworkModule):
    """Cross pseudo supervision (Chen et al., CVPR 2021), adapted to binary segmentation.

    Two networks of the same architecture from different seeds, trained on ``L_sup + lambda_cps * L_cps``
    (:func:`~gpcps_lightning.losses.baselines.cps_objective`): GP-CPS's supervised Dice of both networks,
    and each network supervised by the other's hard, detached pseudo labels on the unlabeled images and,
    as in the paper, on the labeled ones. Evaluation reports ``net1``, ``net2`` and ``ensemble`` (the
    selection head); prediction returns the ensemble. Logged: ``train/loss``, ``train/loss_sup``,
    ``train/loss_cps`` (unweighted).

    Args:
        lambda_cps: Weight of ``L_cps``. Default 1.5, the CPS paper's (and code's) value for PASCAL
            VOC 2012; it used 6 for Cityscapes.
        seeds: Initialisation seeds of ``net1`` and ``net2``; must differ.
        cps_on_labeled: Also apply ``L_cps`` to the labeled images (the paper's ``L_cps^l``).
        pseudo_threshold: Probability threshold of the hard pseudo labels (0.5 is the two-class arg-max).
        dice: ``"soft"`` per-sample soft Dice (specification) or ``"authors"`` batch-global Dice.
        **kwargs: Network, optimizer and evaluation arguments of
            :class:`~gpcps_lightning.methods.base.SegmentationModule`.
    """

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
        self.seeds = check_seeds(seeds)
        if not 0.0 < pseudo_threshold < 1.0:
            raise ValueError(f"`pseudo_threshold` must be in (0, 1), got {pseudo_threshold}.")
        dice_loss_function(dice)  # checks the variant
        self.save_hyperparameters()
        self.dice_variant = dice
        self.lambda_cps = float(lambda_cps)
        self.cps_on_labeled = cps_on_labeled
        self.pseudo_threshold = pseudo_threshold
        self.configure_networks()

    def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> CPSLosses:
        """The forward passes of one step and :func:`~gpcps_lightning.losses.baselines.cps_objective`.

        Raises:
            TypeError: If ``batch`` is not a :class:`SemiSupervisedBatch`.
            ValueError: On malformed batches.
        """
        batch = self.check_training_batch(batch)
        # Separate forward passes of the labeled and unlabeled batches, as the authors' code does
        # (batch-norm statistics are then per batch, not over their union).
        logits1_l = self.net1(batch.labeled)
        logits2_l = self.net2(batch.labeled)
        logits1_u = logits2_u = None
        if self.lambda_cps > 0:
            logits1_u = self.net1(batch.unlabeled)
            logits2_u = self.net2(batch.unlabeled)
        return cps_objective(
            logits1_l,
            logits2_l,
            batch.mask,
            logits1_u,
            logits2_u,
            lambda_cps=self.lambda_cps,
            cps_on_labeled=self.cps_on_labeled,
            pseudo_threshold=self.pseudo_threshold,
            dice=self.dice_variant,
        )

    def loss_terms(self, losses: CPSLosses, step: int) -> dict[str, Tensor]:  # noqa: D102
        return {"loss": losses.total, "loss_sup": losses.sup, "loss_cps": losses.cps}
