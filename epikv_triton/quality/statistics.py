"""Bootstrap intervals over cases, so that "A beats B" is a claim with an interval.

A paired comparison resamples *cases* (the same case for both methods), which removes the variation
between cases that both methods share: the interval is that of the mean per-case difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A sample mean and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


def bootstrap_mean(
    values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> Interval:
    """The mean of ``values`` with its percentile bootstrap interval at ``level``.

    ``resamples`` samples of ``len(values)`` values drawn with replacement (seeded: the same input gives the same
    interval). The interval's ends are sample means that occurred, the lower end rounded down and the upper end
    up between two of them, so it never claims more than the resamples show.
    """
    if len(values) == 0:
        raise ValueError("no values to bootstrap: every case was left out")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    sample = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(sample), (resamples, len(sample)), generator=generator)
    means = sample[picks].mean(dim=1)
    tail = (1 - level) / 2
    low = torch.quantile(means, tail, interpolation="lower")
    high = torch.quantile(means, 1 - tail, interpolation="higher")
    return Interval(float(sample.mean()), float(low), float(high))


def paired_difference(values: Sequence[float], reference: Sequence[float], **bootstrap) -> Interval:
    """Mean of ``values[i] - reference[i]`` over cases, with its paired bootstrap interval."""
    if len(values) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(values)} and {len(reference)} cases")
    return bootstrap_mean([a - b for a, b in zip(values, reference)], **bootstrap)


def verdict(difference: Interval, higher_is_better: bool) -> str:
    """``"better"``, ``"worse"`` or ``"tie"`` (the interval contains 0) for a difference method - reference."""
    if difference.contains_zero():
        return "tie"
    return "better" if (difference.low > 0) == higher_is_better else "worse"
