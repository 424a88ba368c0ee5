"""The bootstrap against cases whose resampling distribution can be written down by hand."""

import random

import pytest

from epikv_triton.quality.statistics import Interval, bootstrap_mean, paired_difference, verdict


def test_interval_of_a_hand_enumerated_sample():
    # Resampling [0, 0, 0, 4] draws k fours, k ~ Binomial(4, 1/4), and the mean is k:
    # P(k <= 0) = 0.316, P(k <= 2) = 0.949, P(k <= 3) = 0.996. The 2.5% quantile is 0 and the 97.5% quantile
    # is 3: the sample's own maximum (4, probability 1/256) lies outside the interval.
    assert bootstrap_mean([0, 0, 0, 4]) == Interval(mean=1.0, low=0.0, high=3.0)


def test_paired_difference_is_the_interval_of_the_differences():
    method, reference = [1.5, 2.0, 0.5, 9.0], [1.5, 2.0, 0.5, 5.0]
    assert paired_difference(method, reference) == Interval(mean=1.0, low=0.0, high=3.0)


@pytest.mark.parametrize("value", [0.0, -0.25, 3.0])
def test_equal_differences_give_a_zero_width_interval(value):
    assert bootstrap_mean([value] * 7) == Interval(value, value, value)


def test_interval_contains_the_mean_and_is_seeded():
    rng = random.Random(0)
    for size in (2, 5, 30):
        sample = [rng.gauss(0, 1) for _ in range(size)]
        interval = bootstrap_mean(sample, seed=3)
        assert interval.low <= interval.mean <= interval.high
        assert bootstrap_mean(sample, seed=3) == interval


@pytest.mark.parametrize(
    "difference, higher_is_better, expected",
    [
        (Interval(0.2, 0.1, 0.3), True, "better"),
        (Interval(0.2, 0.1, 0.3), False, "worse"),
        (Interval(-0.2, -0.3, -0.1), True, "worse"),
        (Interval(-0.2, -0.3, -0.1), False, "better"),
        (Interval(0.1, -0.1, 0.3), True, "tie"),
        (Interval(0.0, 0.0, 0.0), False, "tie"),  # an interval touching 0 is a tie
    ],
)
def test_verdict(difference, higher_is_better, expected):
    assert verdict(difference, higher_is_better) == expected


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0, 2.0], [1.0])
