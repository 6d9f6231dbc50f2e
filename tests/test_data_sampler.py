"""The training stream: (labeled, unlabeled) pairs and their positions, cycling, reshuffling, determinism,
ranks, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gpcps_lightning.data import SemiSupervisedPairSampler


def _pairs(sampler: SemiSupervisedPairSampler) -> list[tuple[int, int]]:
    return [(li, ui) for li, ui, _ in sampler]


def _epoch(sampler: SemiSupervisedPairSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return _pairs(sampler)


def test_length_and_index_ranges() -> None:
    s = SemiSupervisedPairSampler(num_labeled=5, num_unlabeled=11, batch_size=4, steps_per_epoch=3)
    items = list(s)
    assert len(s) == 12 == len(items)
    assert all(isinstance(p, tuple) and len(p) == 3 for p in items)
    assert all(0 <= li < 5 and 0 <= ui < 11 for li, ui, _ in items)
    # Each pair comes with its global stream position; epoch 1 continues where epoch 0 ended.
    assert [p for *_, p in items] == list(range(12)) == s.positions(0).tolist()
    s.set_epoch(1)
    assert [p for *_, p in s] == list(range(12, 24))


def test_labeled_set_cycled_with_reshuffling() -> None:
    # 4 labeled images, 12 samples per epoch: each pass of 4 is a permutation, passes differ in order.
    s = SemiSupervisedPairSampler(num_labeled=4, num_unlabeled=50, batch_size=4, steps_per_epoch=3, seed=3)
    labeled = [li for li, _ in _epoch(s, 0)]
    passes = [labeled[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in passes)
    assert len({tuple(p) for p in passes}) > 1
    # The stream continues across epochs: epoch 1 starts pass 3.
    next_labeled = [li for li, _ in _epoch(s, 1)]
    assert sorted(next_labeled[:4]) == [0, 1, 2, 3]
    assert next_labeled[:4] != passes[0] or next_labeled[4:8] != passes[1]


def test_unlabeled_set_shuffled_every_pass() -> None:
    s = SemiSupervisedPairSampler(num_labeled=2, num_unlabeled=6, batch_size=3, steps_per_epoch=2, seed=0)
    e0 = [ui for _, ui in _epoch(s, 0)]
    e1 = [ui for _, ui in _epoch(s, 1)]
    assert sorted(e0) == sorted(e1) == list(range(6))  # each epoch here is exactly one pass
    assert e0 != e1


def test_default_epoch_covers_every_image() -> None:
    # Kvasir 1/8: 100 labeled, 700 unlabeled, batch 16, 50 steps: every unlabeled image at least once.
    s = SemiSupervisedPairSampler(100, 700, 16, 50, seed=0)
    pairs = np.array(_epoch(s, 0))
    assert set(pairs[:, 1]) == set(range(700))
    counts = Counter(pairs[:, 0].tolist())
    assert set(counts) == set(range(100)) and set(counts.values()) == {8}  # 800 samples = 8 passes of 100


def test_deterministic_from_seed_and_epoch() -> None:
    a = SemiSupervisedPairSampler(7, 13, 4, 5, seed=11)
    b = SemiSupervisedPairSampler(7, 13, 4, 5, seed=11)
    c = SemiSupervisedPairSampler(7, 13, 4, 5, seed=12)
    assert _epoch(a, 2) == _epoch(b, 2)
    _epoch(b, 0)  # iterating other epochs first changes nothing
    assert _epoch(a, 3) == _epoch(b, 3)
    assert _epoch(a, 2) != _epoch(c, 2)
    assert _epoch(a, 2) != _epoch(a, 3)


def test_batches_have_distinct_labeled_images_when_possible() -> None:
    s = SemiSupervisedPairSampler(16, 40, 8, 10, seed=1)
    pairs = _epoch(s, 0)
    for k in range(0, len(pairs), 8):
        # 16 labeled, batch 8: no batch straddles two passes, so its labeled indices are distinct.
        batch = [li for li, _ in pairs[k : k + 8]]
        assert len(set(batch)) == 8


def test_ranks_take_disjoint_slices_of_one_stream() -> None:
    single = SemiSupervisedPairSampler(8, 24, 2, 6, seed=5)
    ranks = [SemiSupervisedPairSampler(8, 24, 2, 3, seed=5, num_replicas=2, rank=r) for r in range(2)]
    whole = _epoch(single, 0)
    r0, r1 = _epoch(ranks[0], 0), _epoch(ranks[1], 0)
    # Step s of rank r is global batch s * 2 + r of the single-process stream.
    assert r0 == whole[0:2] + whole[4:6] + whole[8:10]
    assert r1 == whole[2:4] + whole[6:8] + whole[10:12]
    assert sorted(ui for _, ui in r0 + r1) == sorted(ui for _, ui in whole)
    assert not {ui for _, ui in r0} & {ui for _, ui in r1}  # 12 < 24: one pass, so disjoint


def test_resume_mid_epoch_and_state_dict() -> None:
    s = SemiSupervisedPairSampler(5, 9, 3, 4, seed=2)
    full = _epoch(s, 1)
    s.set_epoch(1)
    s.set_start_step(2)
    assert _pairs(s) == full[6:]
    assert _pairs(s) == full  # the start step applies once
    s.set_start_step(3)
    state = s.state_dict()
    t = SemiSupervisedPairSampler(5, 9, 3, 4, seed=2)
    t.load_state_dict(state)
    items = list(t)
    assert [(li, ui) for li, ui, _ in items] == full[9:]
    assert [p for *_, p in items] == [21, 22, 23]  # epoch 1 starts at 12; steps 0-2 done
    with pytest.raises(ValueError, match="seed"):
        SemiSupervisedPairSampler(5, 9, 3, 4, seed=3).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_labeled": 0}, "num_labeled"),
        ({"num_unlabeled": 0}, "num_unlabeled"),
        ({"batch_size": 0}, "batch_size"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"seed": -1}, "seed"),
        ({"num_replicas": 2, "rank": 2}, "rank"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"num_labeled": 2, "num_unlabeled": 2, "batch_size": 1, "steps_per_epoch": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        SemiSupervisedPairSampler(**args)
