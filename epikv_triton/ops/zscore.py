"""Triton kernel: causal rolling z-score of many bands, combined into one score per token.

Same contract as :func:`epikv_triton.ops.rolling_zscore`:

* ``values``: ``[B, NB, T]`` float32, any strides. New band values in stream
  order; NaN = "no value" (not pushed, contributes 0).
* ``ring``: ``[B, NB, W]`` float32, contiguous, updated in place. The last ``W``
  pushed values of each band; the next push goes to index ``count % W``.
* ``count``: ``[B, NB]`` int64, contiguous, updated in place. Values pushed so far.
* ``weights``: ``[NB]`` float32 signed band weights.
* Returns ``score``: ``[B, T]`` float32, contiguous.

Design: one program per sequence. It holds the ring of every band as a
``[BLOCK_NB, BLOCK_W]`` register tile (masked, so ``W`` and ``NB`` need not be
powers of two), walks the ``T`` new values in order — a chunk is a causal
windowed scan whose state is carried in from, and back out to, ``ring`` and
``count`` — and writes ``score[b, t]`` as it goes. Mean and variance are
recomputed from the window tile at every step (two passes: mean, then the
squared deviations from it) rather than kept as running sums, which would
drift over a long stream and cancel catastrophically when the window is
nearly constant.

Cost per token: about ``6 · NB · W`` flops on registers and ``8 · NB`` bytes of
HBM traffic (one value in, a share of one score out); the state is read and
written once per call. The kernel is latency-bound, so its only tuning knob
is the warp count: fewer warps make the per-step reductions cheaper. The
count is picked from the tile size (:func:`zscore_config`), never by timing:
timing would run the kernel repeatedly on the caller's state, which it
updates in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import launch_options

# The configs the heuristic picks from. One ring tile is NB·W floats (128 for
# the default 2 bands of 64): one warp already holds it in 4 registers per
# thread; more warps only pay off for wide windows or many bands, where they
# spread the tile out.
ZSCORE_CONFIGS = [
    triton.Config({}, num_warps=1, num_stages=1),
    triton.Config({}, num_warps=2, num_stages=1),
    triton.Config({}, num_warps=4, num_stages=1),
]
# Ring elements per thread above which the tile is spread over more warps.
ZSCORE_ELEMENTS_PER_THREAD = 32


def zscore_config(block_nb: int, block_w: int) -> triton.Config:
    """The config for a ``[block_nb, block_w]`` ring tile: the fewest warps holding it in a few registers."""
    wanted_warps = triton.cdiv(block_nb * block_w, 32 * ZSCORE_ELEMENTS_PER_THREAD)
    fitting = [config for config in ZSCORE_CONFIGS if config.num_warps <= wanted_warps]
    return fitting[-1] if fitting else ZSCORE_CONFIGS[0]


# ----------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------


@triton.jit
def _rolling_zscore_kernel(
    values_ptr,
    ring_ptr,
    count_ptr,
    weights_ptr,
    score_ptr,
    T,
    NB,
    W,
    stride_values_b,
    stride_values_band,
    stride_values_t,
    eps,
    BLOCK_NB: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # Every input is float32 (the dispatcher checks), so the interpreter's bf16
    # arithmetic problem cannot arise and no UPCAST guard is needed.
    seq = tl.program_id(0).to(tl.int64)
    bands = tl.arange(0, BLOCK_NB)
    slots = tl.arange(0, BLOCK_W)
    band_ok = bands < NB
    tile_ok = band_ok[:, None] & (slots[None, :] < W)

    # State carried in. ring and count are contiguous [B, NB, W] / [B, NB].
    ring_offsets = seq * NB * W + bands[:, None] * W + slots[None, :]
    ring = tl.load(ring_ptr + ring_offsets, mask=tile_ok, other=0.0)
    count = tl.load(count_ptr + seq * NB + bands, mask=band_ok, other=0)
    weights = tl.load(weights_ptr + bands, mask=band_ok, other=0.0)

    value_row = values_ptr + seq * stride_values_b + bands.to(tl.int64) * stride_values_band
    for t in range(T):
        # Bands past NB read NaN, so they never push and score 0, like a missing value.
        x = tl.load(value_row + t * stride_values_t, mask=band_ok, other=float("nan"))
        pushed = x == x  # false exactly for NaN
        write_slot = count % W
        ring = tl.where(pushed[:, None] & (slots[None, :] == write_slot[:, None]), x[:, None], ring)
        count += pushed.to(tl.int64)

        # The window is the first min(count, W) ring slots: before the ring wraps
        # the values sit at 0..count-1, after it every slot is live.
        filled = tl.minimum(count, W)
        in_window = slots[None, :] < filled[:, None]
        filled_f = tl.maximum(filled, 1).to(tl.float32)
        mean = tl.sum(tl.where(in_window, ring, 0.0), axis=1) / filled_f
        deviation = tl.where(in_window, ring - mean[:, None], 0.0)
        variance = tl.sum(deviation * deviation, axis=1) / filled_f
        z = (x - mean) / (tl.sqrt_rn(variance) + eps)
        z = tl.where(pushed & (filled >= 2), z, 0.0)
        tl.store(score_ptr + seq * T + t, tl.sum(z * weights, axis=0))

    # State carried out.
    tl.store(ring_ptr + ring_offsets, ring, mask=tile_ok)
    tl.store(count_ptr + seq * NB + bands, count, mask=band_ok)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------


def rolling_zscore(
    values: torch.Tensor,
    ring: torch.Tensor,
    count: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Rolling z-score update on the GPU (or Triton's interpreter); see the module docstring.

    Inputs are assumed validated by :func:`epikv_triton.ops.rolling_zscore`.
    ``config`` launches that config instead of :func:`zscore_config`'s choice
    (tests use it to cover every config).
    """
    B, NB, T = values.shape
    W = ring.shape[2]
    if B == 0 or NB == 0 or T == 0:
        # No band contributes: every score is 0 and the state does not move.
        return torch.zeros(B, T, dtype=torch.float32, device=values.device)
    score = torch.empty(B, T, dtype=torch.float32, device=values.device)
    weights = weights.contiguous()
    args = (
        values, ring, count, weights, score,
        T, NB, W,
        values.stride(0), values.stride(1), values.stride(2),
        float(eps),
    )
    blocks = dict(BLOCK_NB=triton.next_power_of_2(NB), BLOCK_W=triton.next_power_of_2(W))
    chosen = config if config is not None else zscore_config(blocks["BLOCK_NB"], blocks["BLOCK_W"])
    _rolling_zscore_kernel[(B,)](*args, **blocks, **launch_options(chosen))
    return score


__all__ = ["ZSCORE_CONFIGS", "rolling_zscore", "zscore_config"]
