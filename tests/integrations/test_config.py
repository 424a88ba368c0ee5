"""EpiKVConfig: defaults of docs/method.md, band resolution by depth, validation messages."""

from __future__ import annotations

import pytest

from epikv_triton.config import EpiKVConfig


def test_reference_bands_of_a_32_layer_model():
    assert EpiKVConfig(method="epikv").resolve_bands(32) == (tuple(range(7, 14)), tuple(range(18, 26)))
    assert EpiKVConfig(method="epikv_flat").resolve_bands(32) == ((10,), (21,))
    assert EpiKVConfig(method="kv").resolve_bands(32) == EpiKVConfig(method="epikv").resolve_bands(32)


def test_bands_scale_with_depth_rounding_half_up():
    # 0.22 * 30 = 6.6 -> 7, 0.41 * 30 = 12.3 -> 12, 0.56 * 30 = 16.8 -> 17, 0.78 * 30 = 23.4 -> 23
    assert EpiKVConfig(method="epikv").resolve_bands(30) == (tuple(range(7, 13)), tuple(range(17, 24)))
    # 0.41 * 50 = 20.5 rounds up to 21 (Python's banker's round would give 20)
    assert EpiKVConfig(method="epikv").resolve_bands(50)[0] == tuple(range(11, 22))


def test_defaults():
    config = EpiKVConfig(budget=256)
    assert (config.method, config.window, config.sink, config.recent) == ("tova", 64, 4, 64)
    assert (config.keep_prompt, config.evict_every) == (True, 1)
    assert EpiKVConfig(method="epikv").weights == (1.29, 1.0)
    assert EpiKVConfig(budget=4096).recent == 128
    assert EpiKVConfig(method="epikv_flat").weights == (1.0, 1.0)


def test_explicit_bands_are_validated_against_depth():
    config = EpiKVConfig(method="epikv", bands=([3, 1], [5]))
    assert config.bands == ((1, 3), (5,))
    with pytest.raises(ValueError, match="do not fit a 5-layer model"):
        config.resolve_bands(5)
    with pytest.raises(ValueError, match="disjoint"):
        EpiKVConfig(method="epikv", bands=([1, 2], [2, 3]))
    with pytest.raises(ValueError, match="non-empty"):
        EpiKVConfig(method="epikv", bands=([], [2]))


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(method="pyramidkv"), "method must be one of epikv, epikv_flat"),
        (dict(budget=0), "budget must be a positive int"),
        (dict(evict_every=0), "evict_every must be a positive int"),
        (dict(window=1.5), "window must be a positive int"),
        (dict(sink=-1), "sink must be a non-negative int"),
        (dict(value_reserve=-1), "value_reserve must be a non-negative int"),
        (dict(value_reserve=True), "value_reserve must be a non-negative int"),
        (dict(budget=8, value_reserve=9), r"value_reserve \(9\) is more than the budget \(8\)"),
        (dict(recent=-2), "recent must be a non-negative int"),
        (dict(keep_prompt="yes"), "keep_prompt must be True or False"),
        (dict(method="epikv", weights=(1.0,)), "weights must be two finite numbers"),
        (dict(method="epikv", weights=(float("nan"), 1.0)), "weights must be two finite numbers"),
        (dict(method="epikv", weights=(True, 1.0)), "weights must be two finite numbers"),
        (dict(method="epikv", bands=([1, "2"], [3])), "non-negative layer indices"),
        (dict(bands=([0], [1])), "bands and weights apply to the methods that score over layer bands"),
        (dict(method="knorm", weights=(2.0, 1.0)), "method 'knorm' has none: pass method='epikv'"),
        (
            dict(budget=10, sink=4, recent=7, keep_prompt=False),
            r"smaller than the protected tokens \(sink 4 \+ recent 7 = 11\)",
        ),
        (dict(budget=10, recent=11), r"smaller than the recent window \(11\)"),
    ],
)
def test_invalid_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        EpiKVConfig(**settings)


def test_sink_is_not_counted_when_the_prompt_is_kept():
    """keep_prompt=True protects the prompt, not the sink: only the recent window must fit the budget."""
    assert EpiKVConfig(budget=8, recent=6).recent == 6


def test_full_ignores_the_protected_budget_check():
    assert EpiKVConfig(method="full", budget=2, recent=8).evicts is False


def test_equal_settings_compare_equal():
    assert EpiKVConfig(budget=64) == EpiKVConfig(budget=64, recent=16, method="tova")
    assert EpiKVConfig(method="epikv") == EpiKVConfig(method="epikv", weights=(1.29, 1.0))
