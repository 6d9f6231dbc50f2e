"""The training stream: which labeled and which unlabeled image each training sample pairs.

The labeled and the unlabeled set are each an endless stream of permutations (a fresh shuffle per
pass, so the small labeled set is cycled with reshuffling). Permutation ``k`` of a stream depends only
on ``(seed, stream, k)``, so the pair at any position is a pure function of ``(seed, position)``: an
epoch is a window of the streams, which makes the sampler exactly resumable (epoch, step) and lets
ranks of a distributed run take disjoint slices without communicating.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = ["SemiSupervisedPairSampler", "labeled_stream_indices"]

_LABELED, _UNLABELED = 0, 1


def _stream(n: int, seed: int, stream: int, positions: np.ndarray) -> np.ndarray:
    """Element of the endless shuffled stream over ``range(n)`` at each global position."""
    cycles = positions // n
    out = np.empty_like(positions)
    for cycle in np.unique(cycles):
        perm = np.random.default_rng([seed, stream, int(cycle)]).permutation(n)
        where = cycles == cycle
        out[where] = perm[positions[where] % n]
    return out


def labeled_stream_indices(num_labeled: int, seed: int, positions: Sequence[int]) -> np.ndarray:
    """The labeled index that :class:`SemiSupervisedPairSampler` pairs with each global stream position.

    A pure function of ``(num_labeled, seed, positions)``, so a batch that carries its positions tells
    which labeled images it holds without the dataset passing their indices along.

    Args:
        num_labeled: Size of the labeled set.
        seed: The sampler's seed.
        positions: Global stream positions (a batch's ``positions``).

    Returns:
        int64 array of labeled indices, one per position.
    """
    return _stream(int(num_labeled), int(seed), _LABELED, np.asarray(positions, dtype=np.int64))


class SemiSupervisedPairSampler(DistributedSampler):
    """Yields ``(labeled, unlabeled, position)`` triples, ``steps_per_epoch * batch_size`` per epoch and rank.

    Global sample position ``p`` of the run (over all epochs and ranks) pairs element ``p`` of the
    labeled stream with element ``p`` of the unlabeled stream; ``p`` itself comes with the pair, so
    that the batch's random draws (augmentation, fusion weights) can be keyed by it
    (:mod:`gpcps_lightning.data.streams`). Epoch ``e`` covers positions
    ``[e * G, (e + 1) * G)`` with ``G = steps_per_epoch * batch_size * num_replicas``; within it, step
    ``s`` of rank ``r`` takes the ``batch_size`` positions starting at ``e * G + (s * num_replicas + r)
    * batch_size``. Ranks therefore see disjoint samples within a pass over a set; a batch repeats an
    image only where it straddles two passes.

    Lightning calls :meth:`set_epoch` at the start of every epoch. The class derives from
    ``DistributedSampler`` (it shards by itself), so that Lightning's distributed strategies use it as it
    is instead of wrapping it in a second sampler that would shard it again.

    Args:
        num_labeled: Size of the labeled set.
        num_unlabeled: Size of the unlabeled set.
        batch_size: Samples per step (per rank).
        steps_per_epoch: Steps per epoch (per rank).
        seed: Seed of the shuffles (non-negative).
        num_replicas: Number of ranks sharing the stream.
        rank: This rank, in ``[0, num_replicas)``.

    Raises:
        ValueError: On non-positive sizes, a negative seed or a rank out of range.
    """

    def __init__(
        self,
        num_labeled: int,
        num_unlabeled: int,
        batch_size: int,
        steps_per_epoch: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        for name, value in (
            ("num_labeled", num_labeled),
            ("num_unlabeled", num_unlabeled),
            ("batch_size", batch_size),
            ("steps_per_epoch", steps_per_epoch),
            ("num_replicas", num_replicas),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, {num_replicas}), got {rank}.")
        # DistributedSampler's own bookkeeping; its dataset-based iteration is replaced below.
        super().__init__(
            cast(Any, range(0)), num_replicas=int(num_replicas), rank=int(rank), shuffle=False, seed=int(seed)
        )
        self.num_labeled = int(num_labeled)
        self.num_unlabeled = int(num_unlabeled)
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start_step = 0
        self._start_epoch: int | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0, got {epoch}.")
        self.epoch = int(epoch)

    def set_start_step(self, step: int, epoch: int | None = None) -> None:
        """Make the next iteration start at this step of the epoch (for resuming mid-epoch); once only.

        Args:
            step: Steps of the epoch already done.
            epoch: Apply the offset only if the next iteration is of this epoch (a run resumed from a
                checkpoint written at the end of an epoch starts the next epoch from its first step).
        """
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"`step` must be in [0, {self.steps_per_epoch}], got {step}.")
        self.start_step = int(step)
        self._start_epoch = None if epoch is None else int(epoch)

    def positions(self, epoch: int) -> np.ndarray:
        """Global stream positions of this rank's samples in ``epoch``, shape (steps * batch_size,)."""
        b, r = self.batch_size, self.num_replicas
        steps = np.arange(self.steps_per_epoch, dtype=np.int64)
        starts = epoch * self.steps_per_epoch * b * r + (steps * r + self.rank) * b
        return (starts[:, None] + np.arange(b, dtype=np.int64)[None, :]).reshape(-1)

    def pairs(self, epoch: int) -> np.ndarray:
        """This rank's ``(labeled, unlabeled)`` index pairs of ``epoch``, shape (steps * batch_size, 2)."""
        p = self.positions(epoch)
        labeled = _stream(self.num_labeled, self.seed, _LABELED, p)
        unlabeled = _stream(self.num_unlabeled, self.seed, _UNLABELED, p)
        return np.stack([labeled, unlabeled], axis=1)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        start = self.start_step if self._start_epoch in (None, self.epoch) else 0
        self.start_step, self._start_epoch = 0, None
        begin = start * self.batch_size
        pairs = self.pairs(self.epoch)[begin:].tolist()
        positions = self.positions(self.epoch)[begin:].tolist()
        for (labeled, unlabeled), position in zip(pairs, positions, strict=True):
            yield labeled, unlabeled, position

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: epoch and the step the next iteration starts at."""
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: If the state was saved with another seed.
        """
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"The sampler state was saved with seed {state['seed']}, this sampler has {self.seed}."
            )
        self.set_epoch(int(state["epoch"]))
        self.set_start_step(int(state["start_step"]))
