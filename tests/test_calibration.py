"""calibration.choose on synthetic recordings whose oracle is a known function of the bands' signals."""

from __future__ import annotations

import math

import pytest
import torch

from epikv_triton.calibration import Window, choose, future_reads, oracle_of_reads
from epikv_triton.config import EpiKVConfig
from epikv_triton.ops import naive


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The ops' PyTorch twins: the interpreter is too slow for hundreds of bands, and the twins are the definition."""
    monkeypatch.setenv("EPIKV_BACKEND", "torch")


def recorded_diffs(num_layers: int, tokens: int, seed: int) -> torch.Tensor:
    """Positive per-layer changes with a shared positional trend and a per-layer level, NaN at the first token."""
    generator = torch.Generator().manual_seed(seed)
    trend = torch.linspace(2.0, 1.0, tokens)
    diffs = trend * torch.exp(0.5 * torch.randn(num_layers, tokens, generator=generator)) * torch.rand(num_layers, 1)
    diffs[:, 0] = math.nan
    return diffs


def rolling_z(values: torch.Tensor, window: int) -> torch.Tensor:
    """The causal rolling z-score of one stream ``[T]`` by the ops' PyTorch twin."""
    ring = torch.zeros(1, 1, window)
    count = torch.zeros(1, 1, dtype=torch.int64)
    return naive.rolling_zscore(values[None, None].float(), ring, count, torch.ones(1))[0]


def judged_only(oracle: torch.Tensor, unjudged_tail: int) -> torch.Tensor:
    """``oracle`` with the first token and the last ``unjudged_tail`` tokens not judged (NaN)."""
    oracle = oracle.clone()
    oracle[0] = math.nan
    oracle[oracle.numel() - unjudged_tail :] = math.nan
    return oracle


def recording(num_layers: int, oracle_of, windows: int = 3, tokens: int = 240, window: int = 64) -> list[Window]:
    """Windows whose oracle is ``oracle_of(diffs, window)``, judged except at the first token and the last 20."""
    result = []
    for seed in range(windows):
        diffs = recorded_diffs(num_layers, tokens, seed)
        result.append(Window(diffs, judged_only(oracle_of(diffs, window), 20)))
    return result


def test_a_band_the_oracle_falls_with_is_chosen_alone_as_band_b():
    windows = recording(6, lambda diffs, window: -rolling_z(diffs[3], window))
    calibration = choose(windows, budget=256)
    assert calibration.config.bands == ((), (3,))
    assert calibration.config.weights == (0.0, 1.0)
    assert calibration.objective == 1.0
    assert calibration.config.method == "epikv" and calibration.config.budget == 256
    assert calibration.windows == 3 and calibration.judged_tokens == 3 * (240 - 21)


def test_a_band_the_oracle_rises_with_is_chosen_as_band_a_with_its_window():
    windows = recording(6, lambda diffs, window: rolling_z(diffs[1:3].mean(dim=0), window), window=16)
    calibration = choose(windows, window=16)
    assert calibration.config.bands == ((1, 2), ())
    assert calibration.config.weights == (1.0, 0.0)
    assert calibration.config.window == 16
    assert calibration.objective == 1.0


def test_two_bands_with_opposite_signs_are_found_and_the_default_bands_are_measured():
    # An oracle made of the 32-layer default bands' score: A = 7..13, B = 18..25, 1.29·z(a) − z(b).
    def default_score(diffs, window):
        return 1.29 * rolling_z(diffs[7:14].mean(dim=0), window) - rolling_z(diffs[18:26].mean(dim=0), window)

    calibration = choose(recording(32, default_score, windows=2))
    assert calibration.config.bands == (tuple(range(7, 14)), tuple(range(18, 26)))
    assert calibration.config.weights == (1.29, 1.0)  # the defaults win the tie with any refit of them
    assert calibration.objective == calibration.baselines["epikv"] == 1.0
    assert calibration.baselines["epikv_flat"] < 1.0
    assert 0.2 < calibration.baselines["chance"] < 0.3


def test_noise_gives_a_valid_config_and_a_summary():
    generator = torch.Generator().manual_seed(5)
    windows = recording(4, lambda diffs, window: torch.rand(diffs.shape[1], generator=generator))
    calibration = choose(windows, keep_fraction=0.5, pairs=4)
    assert calibration.baselines["epikv"] is None  # the default bands overlap in a 4-layer model
    assert 0.5 <= calibration.objective <= 1.0  # the best of many candidates is no worse than chance
    EpiKVConfig.from_json(calibration.config.to_json())
    assert "precision" in calibration.summary() and "epikv n/a" in calibration.summary()


def test_the_precision_counts_the_oracles_top_tokens_in_each_window():
    # One window: the oracle ranks tokens by layer 0; layer 0 itself keeps them all, its reverse none.
    diffs = recorded_diffs(2, 100, seed=1)
    windows = [Window(diffs, judged_only(rolling_z(diffs[0], 64), 0))]
    calibration = choose(windows, keep_fraction=0.1)
    assert calibration.config.bands == ((0,), ()) and calibration.objective == 1.0
    assert calibration.judged_tokens == 99


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(method="epikv_flat"), "calibration chooses method"),
        (dict(bands=([1], [2]), weights=(1, 1)), "calibration chooses bands, weights"),
        (dict(keep_fraction=1.0), r"keep_fraction must be in \(0, 1\)"),
        (dict(pairs=-1), "pairs must be a non-negative int"),
        (dict(budget=0), "budget must be a positive int"),
    ],
)
def test_invalid_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        choose(recording(3, lambda diffs, window: diffs[0], windows=1), **settings)


def test_recordings_that_cannot_be_used_raise():
    diffs = recorded_diffs(3, 50, seed=0)
    with pytest.raises(ValueError, match="same L in every window"):
        choose([Window(diffs, diffs[0]), Window(diffs[:2], diffs[0])])
    with pytest.raises(ValueError, match="diffs \\[L, T\\] and oracle \\[T\\]"):
        choose([Window(diffs, diffs[0, :10])])
    with pytest.raises(ValueError, match="no window has judged tokens"):
        choose([Window(diffs, torch.full((50,), math.nan))])


def test_future_reads_and_the_oracle_follow_their_formula():
    H, T, distance = 2, 12, 3
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(H, T, T, generator=generator).tril()
    probabilities /= probabilities.sum(dim=2, keepdim=True)
    value_norms = torch.rand(H, T, generator=generator) + 0.5
    reads = future_reads(probabilities, value_norms, distance)
    for t in range(T):
        expected = sum(
            float(value_norms[h, t]) * sum(float(probabilities[h, q, t]) * (q + 1) for q in range(t + distance, T))
            for h in range(H)
        ) / H
        assert reads[t].item() == pytest.approx(expected, rel=1e-6)
    oracle = oracle_of_reads(2 * reads, num_layers=2, min_distance=distance)
    judged = [t for t in range(T) if not math.isnan(oracle[t])]
    assert judged == list(range(1, T - 2 * distance + 1))
    for t in judged:  # the mean per layer and per query at least `distance` later
        assert oracle[t].item() == pytest.approx(float(reads[t]) / (T - t - distance), rel=1e-6)
