"""Private random streams of the training data: augmentation draws and fusion weights.

Every random draw the data side makes for a training batch comes from a stream of its own, seeded by
the datamodule's ``seed``, the kind of draw and the global positions of the batch's samples in the
training stream (see :class:`~gpcps_lightning.data.SemiSupervisedPairSampler`). Nothing is drawn
from, or left behind in, torch's global random state, so the draws do not depend on what a method
draws there (network initialisation, dropout, Mean Teacher's noise): for one data seed every method
gets the same augmentations and fusion weights at every step. Positions are a pure function of
``(seed, epoch, step, rank)``, so the draws are too: a resumed run repeats them without saved state,
and the ranks of a distributed run (disjoint positions) draw differently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from gpcps_lightning.losses.gpcps import sample_eps

__all__ = [
    "AUGMENTATION_STREAM",
    "FUSION_STREAM",
    "STRONG_AUGMENTATION_STREAM",
    "fusion_weights",
    "seeded_rng",
    "stream_seed",
]

# Streams 0 and 1 are the sampler's labeled and unlabeled shuffles.
#: Stream id of the augmentation draws.
AUGMENTATION_STREAM = 2
#: Stream id of the fusion weights.
FUSION_STREAM = 3
#: Stream id of the strong augmentation of pseudo-labelled images (ST++).
STRONG_AUGMENTATION_STREAM = 4


def stream_seed(seed: int, stream: int, positions: Sequence[int]) -> int:
    """Seed of one batch's draws of one kind: a hash of ``(seed, stream, positions)``.

    Args:
        seed: The datamodule's seed (non-negative).
        stream: Kind of draw (:data:`AUGMENTATION_STREAM`, :data:`FUSION_STREAM`).
        positions: Global stream positions of the batch's samples (non-negative).

    Returns:
        A seed in ``[0, 2**63)``.
    """
    words = np.random.SeedSequence([int(seed), int(stream), *map(int, positions)]).generate_state(2)
    return ((int(words[0]) << 32) | int(words[1])) & (2**63 - 1)


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block on torch's global random state seeded with ``seed``, and restore the state after it.

    For code without a ``generator`` argument, such as kornia's augmentations. The CPU generator is
    seeded (kornia draws its parameters there unless the augmentation was moved to a device) and, for
    a CUDA ``device``, that device's generator too (on other accelerators, the CPU generator only).
    Saving and restoring them is a copy of a few kilobytes on the host; it does not synchronise with
    the device.

    Args:
        seed: Seed of the block's draws.
        device: Device of the data the block works on.
    """
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if index is not None else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if index is not None:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def fusion_weights(seed: int, positions: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Per-sample fusion weights ``eps ~ Uniform(0, 1)`` of one batch, from the fusion stream.

    Drawn on the CPU (the same values on every device) and copied to ``device`` without waiting for it.

    Args:
        seed: The datamodule's seed.
        positions: Global stream positions of the batch's samples.
        device: Where the weights go.

    Returns:
        float32 tensor in [0, 1).

    Shape:
        - output: (len(positions), 1, 1, 1)
    """
    generator = torch.Generator().manual_seed(stream_seed(seed, FUSION_STREAM, positions))
    eps = sample_eps(len(positions), "per_sample", generator=generator)
    return eps.to(device, non_blocking=True) if device is not None else eps
