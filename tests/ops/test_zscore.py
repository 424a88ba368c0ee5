"""Triton rolling z-score vs docs/method.md section 1 written out as a scalar Python loop, and vs the PyTorch twin.

The Python reference keeps each band's window as a plain list of floats and
computes the population mean and std of it directly, so it shares no code
(and no ring-buffer indexing) with either implementation under test. Every
Triton call runs with ``torch.empty`` poisoned (NaN-filled), so a score the
kernel forgets to write shows up.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from epikv_triton import ops
from epikv_triton.ops import naive, zscore
from epikv_triton.ops.zscore import ZSCORE_CONFIGS
from tests.helpers import device, poisoning_runner

EPS = 1e-6


def python_rolling_zscore(values, ring, count, weights, eps=EPS):
    """Score [B][T] and the final (ring, count) state, from docs/method.md section 1 with scalar floats.

    The window of a band is the list of its last min(count, W) pushed values;
    a NaN value is "no value": not pushed, contributes 0 to the score.
    """
    B, NB, T = values.shape
    W = ring.shape[2]
    ring_out = ring.double().tolist()
    count_out = count.tolist()
    scores = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for band in range(NB):
            n = count_out[b][band]
            # Rebuild the window in push order from the ring: oldest first.
            if n <= W:
                window = ring_out[b][band][:n]
            else:
                start = n % W
                window = ring_out[b][band][start:] + ring_out[b][band][:start]
            for t in range(T):
                x = float(values[b, band, t])
                if math.isnan(x):
                    continue
                ring_out[b][band][n % W] = x
                n += 1
                window = (window + [x])[-W:]
                if len(window) < 2:
                    continue
                z = (x - statistics.fmean(window)) / (statistics.pstdev(window) + eps)
                scores[b][t] += float(weights[band]) * z
            count_out[b][band] = n
    return (
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(ring_out, dtype=torch.float64),
        torch.tensor(count_out, dtype=torch.int64),
    )


@pytest.fixture
def run_kernel(monkeypatch):
    """The Triton launcher with every float ``torch.empty`` NaN-filled."""
    return poisoning_runner(monkeypatch, zscore.rolling_zscore)


def make_state(counts, W, generator):
    """Ring with random values in its live slots and NaN in the never-written ones (must not be read)."""
    counts = torch.tensor(counts, dtype=torch.int64)
    B, NB = counts.shape
    ring = torch.rand(B, NB, W, generator=generator) * 4 + 1
    never_written = torch.arange(W)[None, None, :] >= counts[..., None]
    ring[never_written] = float("nan")
    return ring.to(device()), counts.to(device())


def make_values(B, NB, T, generator, nan_fraction=0.1):
    """Positive band values like delta norms, some of them NaN ("no value")."""
    values = torch.rand(B, NB, T, generator=generator) * 4 + 1
    values[torch.rand(B, NB, T, generator=generator) < nan_fraction] = float("nan")
    return values.to(device())


def assert_state_equal(ring, count, expected_ring, expected_count):
    assert torch.equal(count.cpu(), expected_count.cpu()), "count differs"
    torch.testing.assert_close(ring.cpu().double(), expected_ring.cpu().double(), rtol=0, atol=0, equal_nan=True)


CASES = {
    # name: (initial counts [B][NB], W, T)
    "window_not_yet_full": ([[0, 0], [3, 1]], 64, 20),
    "chunk_straddles_window": ([[50, 50]], 64, 30),
    "chunk_longer_than_two_windows": ([[10, 11]], 64, 140),
    "small_window_wrapped_many_times": ([[0, 2], [7, 123]], 5, 17),
    "three_sequences_four_bands": ([[0, 1, 2, 3], [40, 63, 64, 65], [1000, 1001, 5, 0]], 64, 12),
    "three_bands_odd_window": ([[4, 9, 30]], 10, 25),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_python_loop_and_naive(run_kernel, name):
    counts, W, T = CASES[name]
    g = torch.Generator().manual_seed(list(CASES).index(name))
    B, NB = len(counts), len(counts[0])
    ring, count = make_state(counts, W, g)
    values = make_values(B, NB, T, g)
    values[0, 0, 0] = float("nan")  # the first token of a sequence has no value
    weights = (torch.randn(NB, generator=g) * 1.5).to(device())

    expected_score, expected_ring, expected_count = python_rolling_zscore(
        values.cpu(), ring.cpu(), count.cpu(), weights.cpu()
    )
    naive_ring, naive_count = ring.clone(), count.clone()
    naive_score = naive.rolling_zscore(values, naive_ring, naive_count, weights)

    score = run_kernel(values, ring, count, weights)

    assert score.shape == (B, T) and score.dtype == torch.float32
    assert bool(torch.isfinite(score).all())
    torch.testing.assert_close(score.cpu().double(), expected_score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score, naive_score, rtol=1e-5, atol=1e-5)
    assert_state_equal(ring, count, expected_ring, expected_count)
    assert_state_equal(ring, count, naive_ring, naive_count)


def test_decode_steps_and_uneven_chunks_equal_one_chunk(run_kernel):
    """State is carried across calls: T=1 steps, or chunks of any length, give one long chunk's result."""
    g = torch.Generator().manual_seed(1)
    B, NB, W, T = 2, 2, 8, 30
    ring, count = make_state([[0, 0], [5, 12]], W, g)
    values = make_values(B, NB, T, g)
    weights = torch.tensor([1.29, -1.0], device=device())

    whole_ring, whole_count = ring.clone(), count.clone()
    whole = run_kernel(values, whole_ring, whole_count, weights)

    step_ring, step_count = ring.clone(), count.clone()
    steps = torch.cat([run_kernel(values[:, :, t : t + 1], step_ring, step_count, weights) for t in range(T)], dim=1)

    chunk_ring, chunk_count = ring.clone(), count.clone()
    bounds = [0, 7, 8, 21, T]
    chunks = torch.cat(
        [run_kernel(values[:, :, lo:hi], chunk_ring, chunk_count, weights) for lo, hi in zip(bounds, bounds[1:])],
        dim=1,
    )

    torch.testing.assert_close(steps, whole, rtol=0, atol=0)
    torch.testing.assert_close(chunks, whole, rtol=0, atol=0)
    assert_state_equal(step_ring, step_count, whole_ring, whole_count)
    assert_state_equal(chunk_ring, chunk_count, whole_ring, whole_count)


def test_nan_values_are_skipped(run_kernel):
    """A NaN neither enters the window nor scores: removing it from the stream changes no other score."""
    g = torch.Generator().manual_seed(2)
    W = 6
    ring, count = make_state([[3]], W, g)
    clean = make_values(1, 1, 12, g, nan_fraction=0.0)
    with_gaps = torch.full((1, 1, 16), float("nan"), device=device())
    real_at = torch.tensor([0, 1, 3, 4, 5, 6, 9, 10, 11, 12, 13, 15])
    with_gaps[0, 0, real_at] = clean[0, 0]
    weights = torch.tensor([1.0], device=device())

    clean_ring, clean_count = ring.clone(), count.clone()
    clean_score = run_kernel(clean, clean_ring, clean_count, weights)
    gap_ring, gap_count = ring.clone(), count.clone()
    gap_score = run_kernel(with_gaps, gap_ring, gap_count, weights)

    gaps = torch.ones(16, dtype=torch.bool)
    gaps[real_at] = False
    assert bool((gap_score[0, gaps.to(gap_score.device)] == 0).all())
    torch.testing.assert_close(gap_score[0, real_at.to(gap_score.device)], clean_score[0], rtol=0, atol=0)
    assert_state_equal(gap_ring, gap_count, clean_ring, clean_count)


def test_all_nan_chunk_leaves_state_alone(run_kernel):
    g = torch.Generator().manual_seed(3)
    ring, count = make_state([[2, 70]], 64, g)
    before_ring, before_count = ring.clone(), count.clone()
    values = torch.full((1, 2, 5), float("nan"), device=device())
    score = run_kernel(values, ring, count, torch.tensor([1.0, -1.0], device=device()))
    assert bool((score == 0).all())
    assert_state_equal(ring, count, before_ring, before_count)


def test_non_contiguous_values(run_kernel):
    """values is a strided view (tokens-major, every other band of a wider tensor)."""
    g = torch.Generator().manual_seed(4)
    B, NB, W, T = 2, 2, 64, 21
    wide = make_values(B, T, 2 * NB + 1, g).transpose(1, 2)  # [B, 2NB+1, T] with bands contiguous
    values = wide[:, 1::2, :]
    assert not values.is_contiguous()
    ring, count = make_state([[60, 3], [0, 64]], W, g)
    weights = torch.tensor([1.29, -1.0], device=device())

    naive_ring, naive_count = ring.clone(), count.clone()
    expected = naive.rolling_zscore(values.contiguous(), naive_ring, naive_count, weights)
    score = run_kernel(values, ring, count, weights)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    assert_state_equal(ring, count, naive_ring, naive_count)


@pytest.mark.parametrize("config", ZSCORE_CONFIGS, ids=lambda c: f"warps{c.num_warps}")
def test_every_gpu_config(run_kernel, config):
    g = torch.Generator().manual_seed(5)
    ring, count = make_state([[0, 62], [30, 200]], 64, g)
    values = make_values(2, 2, 6, g)
    weights = torch.tensor([1.29, -1.0], device=device())
    naive_ring, naive_count = ring.clone(), count.clone()
    expected = naive.rolling_zscore(values, naive_ring, naive_count, weights)
    score = run_kernel(values, ring, count, weights, config=config)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    assert_state_equal(ring, count, naive_ring, naive_count)


def test_public_dispatcher_runs_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(6)
    values = make_values(1, 2, 9, g)
    ring, count = make_state([[10, 100]], 64, g)
    weights = torch.tensor([1.29, -1.0], device=device())
    assert ops.backend_for(values) == "triton"
    naive_ring, naive_count = ring.clone(), count.clone()
    expected = naive.rolling_zscore(values, naive_ring, naive_count, weights, eps=1e-3)
    score = poisoning_runner(monkeypatch, ops.rolling_zscore)(values, ring, count, weights, eps=1e-3)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    assert_state_equal(ring, count, naive_ring, naive_count)
