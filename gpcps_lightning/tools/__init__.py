"""Tools built on the library, not needed to train or use a model: each is imported on its own.

- :mod:`~gpcps_lightning.tools.wandb_reader`: read a W&B run's local log back (history, config, summary).
"""
