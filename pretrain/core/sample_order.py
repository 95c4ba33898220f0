"""Global sample orders as pure arithmetic: one source's epochs, and the interleave of several sources.

Both map a position to where its sample comes from in O(1), without replaying the positions before it, so a
resume at any cursor (and any number of ranks) asks for exactly the samples an uninterrupted run would see.

- `GlobalOrder`: one source. Position `p` is sample `perm_e[p % N]` of epoch `e = p // N`, each epoch a fresh
  permutation seeded by `(seed, e)`.
- `Interleave`: k sources with integer weights `units` (their share is `units[s] / period`). Position `q`
  belongs to source `picks[q % period]`, and is that source's `(q // period) * units[s] + rank[q % period]`-th
  position: a lookup table of one period. Any choice rule whose counts are exact after one period
  (`c_s(period) = units[s]`) repeats with that period, which makes the table exact for every position.

The choice rule. Megatron-LM's `BlendedDataset` gives position i to the source with the largest error
`w_s * i - c_s` (c_s: its count so far; its C++ writes max(i, 1), which only changes its first period), older
versions `w_s * (i + 1) - c_s`. Tijdeman's rule for the "chairman assignment problem"
(Discrete Mathematics 32, 1980: among the sources whose error is at least 1/(2k-2), the one whose count
falls behind first) keeps every source within `1 - 1/(2k-2)` of `w_s * n` after any n positions, a bound
Megatron's rule does not have (its error reaches 1.5 for some weights). Neither wins for every weight vector:
for most weights Megatron's rule is the tighter one. The three tables are built (a few ms for common weights,
~2 s for a MAX_PERIOD of 6 sources), and the one with the smallest window discrepancy is used: for every weight
vector the share of each source in every window of consecutive positions is as close to its weight as with
Megatron's rule, and within `2 - 1/(k-1)` samples of it (for two sources: floor or ceil of `w_s * L` in every
window of L positions, the best a whole number allows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from common.errors import UserError

# Longest period built (positions); weights whose exact period is longer are rounded to multiples of
# 1 / MAX_PERIOD (each share moves by less than 1 / MAX_PERIOD).
MAX_PERIOD = 1 << 16


class GlobalOrder:
    """Global position -> sample index: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise UserError("the training split has no samples; prepare the dataset again")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epoch, self._permutation = -1, np.arange(0)

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return int(self._permutation[offset])

    def epoch(self, position: int) -> int:
        return position // self.num_samples


def weight_units(weights: Sequence[float]) -> list[int]:
    """Integer weights with the same proportions as `weights` (all > 0), summing to the shortest period.

    A weight is taken as the decimal the user wrote (0.7 is 7/10, not the binary float nearest to it), so
    common weights give short exact periods ([0.7, 0.3] -> [7, 3]; [1, 1, 1] -> [1, 1, 1]). When the exact
    period exceeds MAX_PERIOD the shares are rounded to MAX_PERIOD units (largest remainders, at least one each).
    """
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact, Fraction(0))
    shares = [w / total for w in exact]
    period = math.lcm(*(share.denominator for share in shares))
    if period <= MAX_PERIOD:
        return [int(share * period) for share in shares]
    floors = [max(1, math.floor(share * MAX_PERIOD)) for share in shares]
    remainders = sorted(range(len(shares)), key=lambda s: (-(shares[s] * MAX_PERIOD - floors[s]), s))
    for s in remainders[: MAX_PERIOD - sum(floors)]:
        floors[s] += 1
    return floors


def _largest_error_picks(units: Sequence[int], shift: int) -> list[int]:
    """Megatron-LM's rule in exact integers: position i goes to argmax_s (w_s * (i + shift) - c_s), ties to the
    lowest s. Its C++ (megatron/core/datasets/helpers.cpp, build_blending_indices) uses w_s * max(i, 1): from
    position `period` on, that sequence is the shift-0 one, repeating; older versions (and GPT-NeoX) use shift 1."""
    period, counts, picks = sum(units), [0] * len(units), []
    for i in range(period):
        errors = [u * (i + shift) - period * c for u, c in zip(units, counts, strict=True)]  # scaled by the period
        chosen = errors.index(max(errors))
        counts[chosen] += 1
        picks.append(chosen)
    return picks


def _tijdeman_picks(units: Sequence[int]) -> list[int]:
    """Tijdeman's rule: among sources with error w_s * i - c_s >= 1/(2k-2), the smallest deadline
    (c_s + 1 - 1/(2k-2)) / w_s (when the source would fall 1 - 1/(2k-2) behind), ties to the lowest s."""
    k, period = len(units), sum(units)
    scale = 2 * k - 2
    counts, picks = [0] * k, []
    for i in range(1, period + 1):
        best, best_deadline = -1, (0, 1)
        for s, (u, c) in enumerate(zip(units, counts, strict=True)):
            if scale * (u * i - period * c) < period:
                continue  # not behind enough to be eligible
            deadline = (scale * (c + 1) - 1, u)  # a fraction, compared by cross-multiplying
            if best < 0 or deadline[0] * best_deadline[1] < best_deadline[0] * deadline[1]:
                best, best_deadline = s, deadline
        counts[best] += 1
        picks.append(best)
    return picks


def discrepancy(picks: np.ndarray, units: Sequence[int]) -> tuple[float, float]:
    """(max over n of |c_s(n) - w_s n|, max over windows of |count_s - w_s * length|), in samples, over all
    sources, for the periodic sequence `picks` repeated forever."""
    period, k = len(picks), len(units)
    onehot = np.zeros((period + 1, k), dtype=np.int64)
    onehot[np.arange(1, period + 1), picks] = 1
    counts = np.cumsum(onehot, axis=0)  # (period + 1, k): c_s(n) for n = 0..period
    errors = counts * period - np.arange(period + 1)[:, None] * np.asarray(units)[None, :]  # scaled by period
    # The errors repeat with the period (c_s(period) = units[s]), so one period holds every value they take.
    cumulative = float(np.abs(errors).max()) / period
    window = float((errors.max(axis=0) - errors.min(axis=0)).max()) / period
    return cumulative, window


class Interleave:
    """Positions 0, 1, 2, ... dealt to sources 0..k-1 in proportion to `units`, by a periodic table."""

    def __init__(self, units: Sequence[int]) -> None:
        if not units or min(units) < 1:
            raise ValueError(f"units must be positive integers, got {list(units)}")
        self.units = np.asarray(units, dtype=np.int64)
        self.period = int(self.units.sum())
        if len(units) == 1:
            picks = np.zeros(self.period, dtype=np.int64)
        else:
            rules = [_largest_error_picks(units, 0), _largest_error_picks(units, 1), _tijdeman_picks(units)]
            candidates = [np.asarray(picks, dtype=np.int64) for picks in rules]
            # The rules end a period with every count exact (their error stays below one sample), which is
            # what makes the table repeat; checked rather than trusted.
            candidates = [p for p in candidates if np.bincount(p, minlength=len(units)).tolist() == list(units)]
            # Smallest window discrepancy, then smallest cumulative; Megatron's on a tie.
            picks = min(candidates, key=lambda p: discrepancy(p, units)[::-1])
        self.picks = picks
        # rank[r]: how many positions before r in the period went to the same source as r.
        self.rank = np.zeros(self.period, dtype=np.int64)
        for s in range(len(units)):
            where = np.flatnonzero(picks == s)
            self.rank[where] = np.arange(len(where))

    def locate(self, position: int) -> tuple[int, int]:
        """(source, how many earlier positions went to that source) of `position`."""
        cycle, offset = divmod(position, self.period)
        source = int(self.picks[offset])
        return source, cycle * int(self.units[source]) + int(self.rank[offset])

    def counts(self, positions: int) -> list[int]:
        """How many of the first `positions` positions went to each source."""
        cycle, offset = divmod(positions, self.period)
        partial = np.bincount(self.picks[:offset], minlength=len(self.units))
        return [int(v) for v in self.units * cycle + partial]
