"""Argument checks and dtype promotion shared by the loss functions.

The module is private (the package does not export it); its functions are public because the loss
modules share them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(x: Tensor) -> Tensor:
    """At least float32 (half precision is promoted; float64 stays float64 for gradient checks)."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def check_map(name: str, x: Tensor) -> None:
    """``x`` is a tensor of shape (N, 1, H, W), floating point or bool; the messages name it ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"`{name}` must have shape (N, 1, H, W), got {tuple(x.shape)}.")
    if not (x.is_floating_point() or x.dtype == torch.bool):
        raise ValueError(f"`{name}` must be floating point or bool, got {x.dtype}.")


def check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    """``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{a_name}` and `{b_name}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_eps(eps: Tensor, n: int) -> None:
    """``eps`` is a floating-point tensor of shape (n, 1, 1, 1): one fusion weight per image."""
    if not isinstance(eps, Tensor):
        raise TypeError(f"`eps` must be a torch.Tensor, got {type(eps).__name__}.")
    if eps.shape != (n, 1, 1, 1):
        raise ValueError(f"`eps` must have shape ({n}, 1, 1, 1), got {tuple(eps.shape)}.")
    if not eps.is_floating_point():
        raise ValueError(f"`eps` must be floating point, got {eps.dtype}.")


def check_ramp(step: int, rampup_steps: int) -> None:
    """A ramp's step and length: both must be >= 0."""
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if rampup_steps < 0:
        raise ValueError(f"`rampup_steps` must be >= 0, got {rampup_steps}.")
