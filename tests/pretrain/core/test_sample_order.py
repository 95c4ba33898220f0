"""The interleave of sources: O(1) lookups equal to replaying the rule, and shares as close as whole samples allow
(at least as close as Megatron-LM's BlendedDataset, whose rule is re-implemented here as its C++ writes it)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pretrain.core.sample_order import MAX_PERIOD, Interleave, discrepancy, weight_units


def megatron_blending_indices(weights: list[float] | list[Fraction], size: int) -> np.ndarray:
    """megatron/core/datasets/helpers.cpp::build_blending_indices, line for line (strict >): with float weights
    as Megatron runs it, with Fraction weights in exact arithmetic (no floating-point tie-breaking)."""
    current = [0] * len(weights)
    index = np.zeros(size, dtype=np.int64)
    for sample in range(size):
        sample_double = max(float(sample), 1.0)
        best, best_error = 0, weights[0] * sample_double - current[0]
        for dataset in range(1, len(weights)):
            error = weights[dataset] * sample_double - current[dataset]
            if error > best_error:
                best, best_error = dataset, error
        index[sample] = best
        current[best] += 1
    return index


def errors(picks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n + 1, k): count of each source among the first n positions minus its weight times n."""
    counts = np.zeros((len(picks) + 1, len(weights)))
    counts[np.arange(1, len(picks) + 1), picks] = 1
    return np.cumsum(counts, axis=0) - np.arange(len(picks) + 1)[:, None] * weights[None, :]


def window_error(picks: np.ndarray, weights: np.ndarray) -> float:
    """max over sources and windows [a, b) of |count - weight * (b - a)|."""
    e = errors(picks, weights)
    return float((e.max(axis=0) - e.min(axis=0)).max())


def test_weights_become_the_shortest_exact_period() -> None:
    assert weight_units([0.7, 0.3]) == [7, 3]
    assert weight_units([1, 1, 1]) == [1, 1, 1]
    assert weight_units([0.5, 0.25, 0.25]) == [2, 1, 1]
    assert weight_units([3, 1]) == [3, 1]
    assert weight_units([0.45, 0.35, 0.2]) == [9, 7, 4]
    # A period longer than MAX_PERIOD is rounded: shares move by less than one unit, every source keeps one.
    odd = [0.123456789, 0.876543211, 1e-9]
    units = weight_units(odd)
    assert sum(units) == MAX_PERIOD and min(units) >= 1
    for weight, unit in zip(odd, units, strict=True):
        assert abs(unit / MAX_PERIOD - weight / sum(odd)) <= 1 / MAX_PERIOD


@pytest.mark.parametrize("units", [[7, 3], [1, 1, 1], [5, 2, 9, 1], [1, 40], [13, 11, 7, 5, 3, 2, 1]])
def test_lookup_anywhere_equals_replaying_the_table(units: list[int]) -> None:
    interleave = Interleave(units)
    period = interleave.period
    counts = [0] * len(units)
    for position in range(3 * period):  # a position's source and its count among that source's positions
        source = int(interleave.picks[position % period])
        assert interleave.locate(position) == (source, counts[source])
        assert interleave.counts(position) == counts
        counts[source] += 1
    # Far positions cost the same as near ones, and agree with the periodic arithmetic.
    far = 10**12 + 5
    source, count = interleave.locate(far)
    cycles, offset = divmod(far, period)
    assert source == interleave.picks[offset]
    assert count == cycles * units[source] + int((interleave.picks[:offset] == source).sum())
    assert sum(interleave.counts(far)) == far


def test_two_sources_get_floor_or_ceil_of_their_share_in_every_window() -> None:
    for units in ([7, 3], [1, 2], [13, 87], [999, 1]):
        weights = np.array(units) / sum(units)
        picks = np.tile(Interleave(units).picks, 3)
        prefix = np.concatenate([[0], np.cumsum(picks == 0)])
        for length in range(1, 2 * sum(units)):
            in_window = prefix[length:] - prefix[:-length]  # source 0's count in every window of this length
            share = weights[0] * length
            assert set(in_window.tolist()) <= {math.floor(share), math.ceil(share)}, (units, length)


def test_shares_are_at_least_as_close_as_megatrons_and_within_tijdemans_bound() -> None:
    rng = np.random.default_rng(0)
    worst = {"ours": 0.0, "megatron": 0.0}
    for _ in range(150):
        k = int(rng.integers(2, 9))
        units = [int(u) for u in rng.integers(1, 120, size=k)]
        if rng.random() < 0.3:
            units[0] = 1  # a rare source
        period = sum(units)
        weights = np.array(units) / period
        ours = Interleave(units).picks
        cumulative, window = discrepancy(ours, units)
        assert window == pytest.approx(window_error(np.tile(ours, 2), weights))  # one period tells all windows
        # Megatron's rule in exact arithmetic, over three periods (its first differs a little: every window of
        # what then repeats is in there): never closer than ours, for any weights.
        exact = megatron_blending_indices([Fraction(u, period) for u in units], 3 * period)
        assert window <= window_error(exact, weights) + 1e-12, units
        # Tijdeman's rule is the other candidate: no window strays further than twice its proven cumulative
        # bound 1 - 1/(2k-2), i.e. less than 2 samples.
        assert window <= 2 * (1 - 1 / (2 * k - 2)) + 1e-12, units
        assert cumulative < 1.5
        # Megatron as it runs (float weights: its ties break by rounding): compared in the worst case.
        floats = megatron_blending_indices([float(Fraction(u, period)) for u in units], 3 * period)
        worst["ours"] = max(worst["ours"], window)
        worst["megatron"] = max(worst["megatron"], window_error(floats, weights))
    assert worst["ours"] <= worst["megatron"], worst


def test_a_long_period_is_built_quickly_enough_for_start_up() -> None:
    import time

    units = weight_units([0.123456789, 0.3456789, 0.5309])
    started = time.perf_counter()
    interleave = Interleave(units)
    assert interleave.period == MAX_PERIOD
    assert time.perf_counter() - started < 10  # ~0.5 s alone; generous for a shared machine
    assert interleave.counts(MAX_PERIOD) == units
