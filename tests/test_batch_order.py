"""The resumable batch order, plain and grouped by length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speculative.data.batches import BatchOrder


def padded_slots(order: BatchOrder, lengths: np.ndarray, batches: int) -> int:
    """Token slots of right-padded batches (batch size x the longest sample)."""
    return sum(order.batch_size * int(lengths[order.indices(i)].max()) for i in range(batches))


@pytest.fixture
def lengths() -> np.ndarray:
    """Skewed like chat data: many short answers, a tail cut at the maximum length."""
    rng = np.random.default_rng(0)
    return np.minimum(rng.lognormal(6.0, 0.9, size=1003).astype(int) + 8, 1024)


def test_the_plain_order_is_the_seeded_permutation():
    """The order every run before ``group_by_length`` used: a resumed old run continues on it."""
    order = BatchOrder(10, 3, seed=4)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4 * 100_003)).tolist()
    assert [order.indices(i) for i in range(3)] == [perm[0:3], perm[3:6], perm[6:9]]
    assert BatchOrder(10, 3, seed=4, shuffle=False).indices(2) == [6, 7, 8]


@pytest.mark.parametrize("grouped", [False, True])
def test_each_epoch_is_distinct_samples_and_batch_i_is_a_pure_function(lengths, grouped):
    make = lambda: BatchOrder(len(lengths), 8, seed=1, lengths=lengths if grouped else None, group_window=16)
    order = make()
    per_epoch = order.batches_per_epoch
    assert per_epoch == len(lengths) // 8
    for epoch in range(2):
        seen = [i for b in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in order.indices(b)]
        assert len(seen) == len(set(seen)) == per_epoch * 8
    # Read in any order, by a fresh instance (a resumed run), batch i is the same.
    wanted = [5, 2 * per_epoch - 1, 0, per_epoch + 3]
    assert [make().indices(i) for i in wanted] == [order.indices(i) for i in wanted]
    assert order.indices(0) != order.indices(per_epoch)  # epochs are reshuffled


def test_grouping_cuts_padding_and_keeps_the_batches_random(lengths):
    plain = BatchOrder(len(lengths), 8, seed=0)
    grouped = BatchOrder(len(lengths), 8, seed=0, lengths=lengths, group_window=16)
    n = plain.batches_per_epoch
    real = sum(int(lengths[plain.indices(i)].sum()) for i in range(n))
    assert real == sum(int(lengths[grouped.indices(i)].sum()) for i in range(n))  # the same samples
    assert padded_slots(grouped, lengths, n) < 0.8 * padded_slots(plain, lengths, n)
    # Within a batch the lengths are close; across batches they are not sorted.
    spreads = [np.ptp(lengths[grouped.indices(i)]) for i in range(n)]
    assert np.median(spreads) < 0.25 * np.median([np.ptp(lengths[plain.indices(i)]) for i in range(n)])
    longest = [int(lengths[grouped.indices(i)].max()) for i in range(n)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="3 lengths for 10 samples"):
        BatchOrder(10, 2, seed=0, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="group_window"):
        BatchOrder(10, 2, seed=0, lengths=list(range(10)), group_window=0)
