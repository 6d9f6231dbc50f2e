"""A TQDM progress bar with short names for the loss terms and the validation Dice."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from gpcps_lightning.callbacks.checkpoint import selection_head

__all__ = ["LossProgressBar"]


class LossProgressBar(TQDMProgressBar):
    """TQDM progress bar showing the loss terms and the validation Dice under short names.

    ``train/loss_sup`` shows as ``loss_sup`` (likewise every ``train/`` key the module puts on the bar),
    the selection head's ``val/dice_<head>`` as ``val_dice`` once validation has run, and the logger's
    version number is left out.

    Args:
        refresh_rate: Update the bar every this many batches.
        leave: Leave the finished bar of each epoch on screen.
        show_val_dice: Show the last validation Dice of the selection head.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, show_val_dice: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.show_val_dice = show_val_dice

    def get_metrics(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        out: dict[str, int | str | float | dict[str, float]] = {}
        for key, value in items.items():
            out[key.removeprefix("train/")] = value
        if self.show_val_dice:
            dice = trainer.callback_metrics.get(f"val/dice_{selection_head(pl_module)}")
            if dice is not None:
                out["val_dice"] = float(dice)
        return out
