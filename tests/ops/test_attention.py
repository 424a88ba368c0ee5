"""Triton slot attention (ops/attention.py) against its PyTorch twin.

Every Triton call runs with ``torch.empty`` poisoned (NaN-filled), so an
output element the kernels forget to write shows up as a NaN the twin does
not have. Shapes stay small: on CPU the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from epikv_triton.ops import attention, naive
from epikv_triton.ops.attention import DECODE_CONFIGS, PREFILL_CONFIGS
from epikv_triton.ops.slots import last_slots, slots_in_use, visibility_mask
from epikv_triton.ops.static_report import StandInDriver
from tests.helpers import (
    ANY_SLOT_CASES,
    assert_close_rms,
    buffer_in_use,
    cache_positions,
    chunk_positions,
    config_id,
    device,
    poisoning_runner,
    prefill_positions,
    randn,
    shuffle_slots,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Small key tiles: several per test, so per-tile decisions (splits, mask skip) vary.
SMALL_TILES = next(c for c in PREFILL_CONFIGS if c.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32})


# --------------------------------------------------------------------------- #
# Input builders
# --------------------------------------------------------------------------- #


def qkv(B, Hq, Hkv, T, S, D, dtype, layout="contiguous"):
    """Random ``q [B, Hq, T, D]``, ``k``, ``v [B, Hkv, S, D]``."""
    return (
        randn(B, Hq, T, D, dtype=dtype, layout=layout),
        randn(B, Hkv, S, D, dtype=dtype, layout=layout),
        randn(B, Hkv, S, D, dtype=dtype, layout=layout),
    )


def vectors(B, H, D, dtype):
    """Random ``[B, H, D]`` (``prev_k`` / ``prev_v``)."""
    return torch.randn(B, H, D, device=device()).to(dtype)


# --------------------------------------------------------------------------- #
# Running and comparing
# --------------------------------------------------------------------------- #


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Run the Triton launcher with every float ``torch.empty`` NaN-filled."""
    return poisoning_runner(monkeypatch, attention.slot_attention)


# Launcher arguments the twin does not take: how the kernel runs, not what it computes.
LAUNCH_ONLY = ("config", "use_tma")


def check_against_twin(run, q, k, v, pos, **kwargs):
    """Run the Triton kernel and the twin with the same arguments; compare everything."""
    result = run(q, k, v, pos, **kwargs)
    for name in LAUNCH_ONLY:
        kwargs.pop(name, None)
    expected = naive.slot_attention(q, k, v, pos, **kwargs)
    dtype = q.dtype
    assert result.out.dtype == q.dtype and result.out.is_contiguous()
    assert_close_rms(result.out, expected.out, dtype, "out")
    for name in ("dk", "dv"):
        got, want = getattr(result, name), getattr(expected, name)
        if want is None:
            assert got is None, f"{name} returned without with_deltas"
        else:
            assert got.dtype == torch.float32
            # Deltas are float32 differences of exactly-upcast inputs: tight in every dtype.
            assert_close_rms(got, want, torch.float32, name)
    if expected.lse is None:
        assert result.lse is None
    else:
        assert result.lse.dtype == torch.float32
        assert_close_rms(result.lse, expected.lse, dtype, "lse")
    return result, expected


def assert_blind_queries_are_zero(result, pos, query_slots=None):
    """Queries that see no key (padding) must give exactly 0 and, when asked, lse = -inf."""
    B, _, T, _ = result.out.shape
    slots = last_slots(B, T, pos.shape[1], pos.device) if query_slots is None else query_slots
    blind = visibility_mask(pos, slots, None).sum(-1) == 0  # [B, T]
    assert bool(blind.any()), "test setup: expected some blind queries"
    out = result.out.float().permute(0, 2, 1, 3)  # [B, T, Hq, D]
    assert bool((out[blind] == 0).all())
    if result.lse is not None:
        assert bool(torch.isneginf(result.lse.permute(0, 2, 1)[blind]).all())


# --------------------------------------------------------------------------- #
# The oracle itself
# --------------------------------------------------------------------------- #


# The new tokens last (query_slots=None), and the same slots shuffled, the new tokens in slots 7, 2, 10, 0, 5
# of sequence 0 (out of order, not contiguous) and anywhere in sequence 1.
SHUFFLED_POS = [[7, 5, 8, -1, 3, 10, 1, 0, 2, 6, 9], [-1, 2, -1, -1, -1, 1, -1, -1, -1, 0, -1]]
SHUFFLED_QUERY_SLOTS = [[7, 2, 10, 0, 5], [9, 5, 1, 3, 8]]


# Score blocks of the twin: the whole matrix at once, one query at a time, and two at a time (5 = 2 + 2 + 1).
SCORE_BLOCKS = {"one-block": naive.SCORE_BLOCK, "1-query-blocks": 1, "2-query-blocks": 2 * 2 * 4 * 11}


@pytest.mark.parametrize("score_block", SCORE_BLOCKS.values(), ids=SCORE_BLOCKS)
@pytest.mark.parametrize("shuffled", [False, True], ids=["last-slots", "shuffled-slots"])
def test_twin_matches_a_per_query_loop(shuffled, score_block, monkeypatch):
    """naive.slot_attention against softmax written one query and one key at a time."""
    monkeypatch.setattr(naive, "SCORE_BLOCK", score_block)
    torch.manual_seed(0)
    B, Hq, Hkv, T, S, D, window = 2, 4, 2, 5, 11, 6, 4
    q = torch.randn(B, Hq, T, D)
    k = torch.randn(B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D)
    prev_k, prev_v = torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    if shuffled:
        pos, query_slots = torch.tensor(SHUFFLED_POS), torch.tensor(SHUFFLED_QUERY_SLOTS)
        slots = query_slots.tolist()
    else:
        pos = torch.tensor([[3, -1, 0, 5, 1, 2, 6, 7, 8, 9, 10], [-1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 2]])
        query_slots = None
        slots = [list(range(S - T, S))] * B
    scale = 0.37
    for win in (None, window):
        got = naive.slot_attention(
            q, k, v, pos, query_slots=query_slots, scale=scale, window=win, prev_k=prev_k, prev_v=prev_v,
            return_lse=True,
        )
        for b in range(B):
            for h in range(Hq):
                kv = h // (Hq // Hkv)
                for i in range(T):
                    pq = int(pos[b, slots[b][i]])
                    seen = [
                        j for j in range(S)
                        if pos[b, j] >= 0 and pos[b, j] <= pq and (win is None or pq - pos[b, j] < win)
                    ]
                    if not seen:
                        assert bool((got.out[b, h, i] == 0).all())
                        assert got.lse[b, h, i] == float("-inf")
                        continue
                    scores = [float(q[b, h, i] @ k[b, kv, j]) * scale for j in seen]
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    total = sum(weights)
                    out = sum(w / total * v[b, kv, j] for w, j in zip(weights, seen))
                    torch.testing.assert_close(got.out[b, h, i], out, rtol=1e-5, atol=1e-5)
                    assert math.isclose(float(got.lse[b, h, i]), top + math.log(total), rel_tol=1e-5)
        for b in range(B):
            for h in range(Hkv):
                for t in range(T):
                    slot = slots[b][t]
                    before_k = prev_k[b, h] if t == 0 else k[b, h, slots[b][t - 1]]
                    before_v = prev_v[b, h] if t == 0 else v[b, h, slots[b][t - 1]]
                    assert math.isclose(float(got.dk[b, h, t]), float((k[b, h, slot] - before_k).norm()), rel_tol=1e-5)
                    assert math.isclose(float(got.dv[b, h, t]), float((v[b, h, slot] - before_v).norm()), rel_tol=1e-5)
    without_prev = naive.slot_attention(q, k, v, pos, query_slots=query_slots)
    assert bool(torch.isnan(without_prev.dk[:, :, 0]).all()) and not bool(torch.isnan(without_prev.dk[:, :, 1:]).any())


# --------------------------------------------------------------------------- #
# Prefill (S == T)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "T, Hq, Hkv, D",
    [
        (1, 4, 4, 64),     # one token: G = 1, decode config space
        (63, 4, 1, 64),    # G = 4, one row block short of a tile
        (129, 8, 1, 128),  # G = 8, rows cross several row blocks
        (200, 3, 1, 8),    # G = 3 (not a power of two), tiny head dim
        (20, 2, 1, 256),   # the largest head dim the Triton path takes
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(poisoned_allocations, T, Hq, Hkv, D, dtype):
    torch.manual_seed(T)
    q, k, v = qkv(1, Hq, Hkv, T, T, D, dtype)
    pos = prefill_positions(1, T)
    check_against_twin(poisoned_allocations, q, k, v, pos, return_lse=True)


def test_prefill_left_padding(poisoned_allocations):
    """Batch of 3: unpadded, left-padded, and entirely padding (every query blind)."""
    torch.manual_seed(1)
    B, Hq, Hkv, T, D = 3, 4, 2, 40, 64
    q, k, v = qkv(B, Hq, Hkv, T, T, D, torch.float32)
    pos = prefill_positions(B, T, pad=(0, 13, T))
    result, _ = check_against_twin(poisoned_allocations, q, k, v, pos, return_lse=True)
    assert_blind_queries_are_zero(result, pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_sliding_window(poisoned_allocations, dtype):
    torch.manual_seed(2)
    B, Hq, Hkv, T, D = 2, 2, 1, 100, 64
    q, k, v = qkv(B, Hq, Hkv, T, T, D, dtype)
    pos = prefill_positions(B, T, pad=(0, 7))
    check_against_twin(poisoned_allocations, q, k, v, pos, window=16, return_lse=True)


@pytest.mark.parametrize("T", [1, 40], ids=["decode", "chunk"])
def test_largest_int32_window_sees_everything(poisoned_allocations, T):
    """window = 2**31 - 1 (a "no window" sentinel) gives exactly the windowless result."""
    torch.manual_seed(19)
    B, Hq, Hkv, C, D = 2, 4, 2, 30, 32
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.float32)
    pos = cache_positions(B, C, T, seen=40, holes=3, pad=(0, 6))
    result, _ = check_against_twin(poisoned_allocations, q, k, v, pos, window=2**31 - 1, return_lse=True)
    unwindowed = naive.slot_attention(q, k, v, pos, return_lse=True)
    torch.testing.assert_close(result.out, unwindowed.out)
    torch.testing.assert_close(result.lse, unwindowed.lse)


def test_custom_scale_with_large_scores(poisoned_allocations):
    """Scores in the hundreds: the online softmax must rescale without overflow."""
    torch.manual_seed(3)
    T, D = 70, 64
    q, k, v = qkv(1, 2, 2, T, T, D, torch.float32)
    check_against_twin(poisoned_allocations, q * 4, k * 4, v, prefill_positions(1, T), scale=1.0, return_lse=True)


# --------------------------------------------------------------------------- #
# Chunked prefill and decode (cache slots + new tokens)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, Hq, Hkv", [(64, 8, 2), (80, 3, 1), (128, 2, 2)])
def test_chunked_prefill(poisoned_allocations, dtype, D, Hq, Hkv):
    """90 cache slots (shuffled, with holes) + 37 new tokens, prev_k/prev_v given."""
    torch.manual_seed(D)
    B, C, T = 1, 90, 37
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, dtype)
    pos = cache_positions(B, C, T, seen=150, holes=9)
    prev_k, prev_v = vectors(B, Hkv, D, dtype), vectors(B, Hkv, D, dtype)
    check_against_twin(poisoned_allocations, q, k, v, pos, prev_k=prev_k, prev_v=prev_v, return_lse=True)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_chunked_prefill_window_and_padding(poisoned_allocations, num_splits):
    """Left-padded sequence next to a full one, sliding window shorter than the chunk.

    Small tiles (64 rows x 32 keys) and 2 forced splits of 64 keys: the first
    row block's causal bound (slot 56) ends before the second split starts, so
    that program runs no iteration and must still write an empty partial.
    """
    torch.manual_seed(4)
    B, Hq, Hkv, C, T, D = 2, 4, 1, 40, 30, 64
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float16)
    pos = cache_positions(B, C, T, seen=60, holes=5, pad=(0, 20))
    check_against_twin(
        poisoned_allocations, q, k, v, pos, window=24, prev_k=k[:, :, 0], prev_v=v[:, :, 0], return_lse=True,
        num_splits=num_splits, config=SMALL_TILES,
    )


@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (8, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode(poisoned_allocations, num_splits, Hq, Hkv, dtype):
    """One new token over 299 cache slots (not a multiple of any split or tile)."""
    torch.manual_seed(num_splits * 10 + Hkv)
    B, C, D = 2, 299, 64
    S = C + 1
    q, k, v = qkv(B, Hq, Hkv, 1, S, D, dtype)
    pos = cache_positions(B, C, 1, seen=400, holes=30, pad=(0, 100))
    prev = vectors(B, Hkv, D, dtype)
    check_against_twin(
        poisoned_allocations, q, k, v, pos, prev_k=prev, prev_v=prev, num_splits=num_splits, return_lse=True
    )


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window_and_blind_query(poisoned_allocations, num_splits):
    """Sliding-window decode; sequence 1 is a padding query that sees nothing."""
    torch.manual_seed(5)
    B, Hq, Hkv, C, D = 2, 4, 1, 250, 64
    S = C + 1
    q, k, v = qkv(B, Hq, Hkv, 1, S, D, torch.float16)
    pos = cache_positions(B, C, 1, seen=300, holes=10)
    pos[1, -1] = -1
    result, _ = check_against_twin(
        poisoned_allocations, q, k, v, pos, window=120, num_splits=num_splits, return_lse=True
    )
    assert_blind_queries_are_zero(result, pos)


def test_split_with_nothing_visible_in_some_splits(poisoned_allocations):
    """Splits whose keys are all empty slots must weigh 0 in the merge, not NaN."""
    torch.manual_seed(6)
    B, Hq, Hkv, S, D = 1, 4, 2, 260, 64
    q, k, v = qkv(B, Hq, Hkv, 1, S, D, torch.float32)
    pos = torch.full((B, S), -1, dtype=torch.int32, device=device())
    pos[:, 200:210] = torch.arange(10, dtype=torch.int32)
    pos[:, -1] = 10
    check_against_twin(poisoned_allocations, q, k, v, pos, num_splits=4, return_lse=True)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_split_at_budget_plus_one(poisoned_allocations, num_splits):
    """Decode over budget + 1 = 257 slots: with 5 splits of 64 keys the last holds a single key."""
    torch.manual_seed(13)
    B, Hq, Hkv, C, D = 2, 8, 2, 256, 64
    S = C + 1
    keys_per_split, launched = attention.split_plan(S, num_splits)
    assert launched == num_splits and S - (launched - 1) * keys_per_split == (1 if num_splits > 1 else S)
    q, k, v = qkv(B, Hq, Hkv, 1, S, D, torch.float16)
    pos = cache_positions(B, C, 1, seen=300, holes=12, pad=(0, 40))
    check_against_twin(poisoned_allocations, q, k, v, pos, num_splits=num_splits, return_lse=True)


@pytest.mark.parametrize("config", [PREFILL_CONFIGS[0], SMALL_TILES], ids=config_id)
def test_split_chunk_above_decode_rows(poisoned_allocations, config):
    """T·G = 24 rows (above the decode space) split three ways, as few row blocks get on a GPU."""
    torch.manual_seed(14)
    B, Hq, Hkv, C, T, D = 1, 8, 1, 150, 3, 64
    S = C + T
    assert not attention.uses_decode_space(T * Hq // Hkv)
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.bfloat16)
    pos = cache_positions(B, C, T, seen=200, holes=9)
    check_against_twin(
        poisoned_allocations, q, k, v, pos, prev_k=k[:, :, 0], prev_v=v[:, :, 0], num_splits=3, return_lse=True,
        config=config,
    )


@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["autotuned", "small-tiles"])
@pytest.mark.parametrize("C, T, window", [(128, 20, None), (128, 20, 150), (128, 20, 40), (126, 2, None)])
def test_fully_visible_tiles_skip_the_mask(poisoned_allocations, C, T, window, config):
    """A hole-free cache older than every new token: whole key tiles are visible and unmasked.

    Sequence 0's cache tiles are fully visible to its rows without a window and
    with 150 (its newest query is 147, its oldest key 0); with 40 they are not,
    and the mask must come back. With 2 new tokens the tile holding both has a
    key one position past the first query: the proof must fail there. Sequence
    1 has a padding query, so its tiles always keep the mask.
    """
    torch.manual_seed(15)
    B, Hq, Hkv, D = 2, 4, 2, 32
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float32)
    pos = cache_positions(B, C, T, seen=C)  # the cache holds positions 0..C-1, shuffled
    pos[1, -1] = -1
    check_against_twin(poisoned_allocations, q, k, v, pos, window=window, return_lse=True, config=config)


def test_tile_spanning_exactly_the_window_keeps_the_mask(poisoned_allocations):
    """A hole-free 128-key tile of positions 0..127 and a query at 127 with window 127: the tile spans
    exactly the window, so key 0 is hidden and the "fully visible" proof must fail (``<``, not ``<=``)."""
    torch.manual_seed(23)
    S = 128
    q, k, v = qkv(1, 2, 1, 1, S, 32, torch.float32)
    pos = torch.arange(S, device=device())[torch.randperm(S - 1, device=device()).tolist() + [S - 1]][None]
    decode_128 = next(c for c in DECODE_CONFIGS if c.kwargs["BLOCK_N"] == S)
    check_against_twin(poisoned_allocations, q, k, v, pos, window=S - 1, return_lse=True, config=decode_128)


def test_causal_skip_keeps_the_oldest_key_in_the_window(poisoned_allocations):
    """A chunk (skip by position) of 20 tokens at positions 100..119, window 10: the only key the first
    token sees outside the chunk, position 91 = 100 - 10 + 1, sits alone in the first key tile. The
    scan's lower bound must be exactly earliest - window + 1, or that tile is skipped."""
    torch.manual_seed(24)
    C, T, window = 64, 20, 10
    q, k, v = qkv(1, 1, 1, T, C + T, 32, torch.float32)
    assert not attention.uses_decode_space(T)
    pos = torch.full((1, C + T), -1, device=device())
    pos[0, 5] = 100 - window + 1
    pos[0, 32:40] = torch.arange(92, 100)
    pos[0, C:] = torch.arange(100, 100 + T)
    check_against_twin(poisoned_allocations, q, k, v, pos, window=window, return_lse=True, config=SMALL_TILES)


# --------------------------------------------------------------------------- #
# New tokens in any slots (query_slots)
# --------------------------------------------------------------------------- #


def check_any_layout(run, q, k, v, pos, empty_slots, **kwargs):
    """The call in the default layout, then with the slots shuffled (the new tokens anywhere, in no order,
    ``empty_slots`` empty slots mixed in): the kernel must match the twin there, and the twin there must
    match the twin in the default layout, since nothing may depend on slot order."""
    T = q.shape[2]
    default = naive.slot_attention(q, k, v, pos, **{n: a for n, a in kwargs.items() if n not in LAUNCH_ONLY})
    pos, k, v, slot_of = shuffle_slots(pos, k, v, empty_slots=empty_slots)
    query_slots = slot_of[:, -T:]
    assert not bool((query_slots == torch.arange(k.shape[2] - T, k.shape[2], device=q.device)).all()), "setup"
    result, twin = check_against_twin(run, q, k, v, pos, query_slots=query_slots, **kwargs)
    for name in ("out", "dk", "dv", "lse"):
        if getattr(default, name) is not None:
            dtype = q.dtype if name == "out" else torch.float32
            assert_close_rms(getattr(twin, name), getattr(default, name), dtype, f"{name} (layouts)")
    return result, pos, query_slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, T, window, empty_slots", ANY_SLOT_CASES)
def test_new_tokens_in_any_slots(poisoned_allocations, dtype, C, T, window, empty_slots):
    """Causal skip by position, masks and deltas (each token against its predecessor's slot) whatever the
    slots; sequence 1 is left-padded, so some queries are blind and some slots are padding."""
    torch.manual_seed(C + T + empty_slots)
    Hq, Hkv, D = 4, 2, 64
    q, k, v = qkv(2, Hq, Hkv, T, C + T, D, dtype)
    pos = chunk_positions(C, T)
    result, pos, query_slots = check_any_layout(
        poisoned_allocations, q, k, v, pos, empty_slots, window=window, prev_k=k[:, :, 0], prev_v=v[:, :, 0],
        return_lse=True, config=SMALL_TILES,
    )
    if not C:
        assert_blind_queries_are_zero(result, pos, query_slots)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_in_any_slot(poisoned_allocations, num_splits, T):
    """Decode-space steps written into a hole in the middle of the cache, past empty capacity, as a static
    decode step over a whole buffer does; sequence 1's last token is padding."""
    torch.manual_seed(num_splits + T)
    B, Hq, Hkv, C, D = 2, 4, 1, 200, 64
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.bfloat16)
    pos = cache_positions(B, C, T, seen=260, holes=12, pad=(0, 30))
    pos[1, -1] = -1
    assert attention.uses_decode_space(T * Hq // Hkv)
    result, pos, query_slots = check_any_layout(
        poisoned_allocations, q, k, v, pos, 60, prev_k=k[:, :, 0], prev_v=v[:, :, 0], num_splits=num_splits,
        return_lse=True,
    )
    assert_blind_queries_are_zero(result, pos, query_slots)


@pytest.mark.parametrize("T, num_splits", [(1, 1), (1, 5), (20, 1), (20, 3)], ids=["decode", "decode-split",
                                                                                  "chunk", "chunk-split"])
def test_slot_count_bounds_the_slots_in_use(poisoned_allocations, T, num_splits):
    """Slots past ``slot_count`` are empty whatever their positions say: the kernel (decode and chunk
    spaces, splits wholly past the count included) and the twin both equal the twin over positions
    with those slots cleared; a query slot past the count is a blind query."""
    torch.manual_seed(T + num_splits)
    B, Hq, Hkv, S, D = 4, 4, 2, 300, 32
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float32)
    pos, query_slots, slot_count = buffer_in_use([T, 70, 150, S], S, T, seen=400)
    slot_count[0] = 0  # sequence 0's new tokens lie past its count: blind
    prev = vectors(B, Hkv, D, torch.float32)
    kwargs = dict(query_slots=query_slots, prev_k=prev, prev_v=prev, return_lse=True)
    result, twin = check_against_twin(
        poisoned_allocations, q, k, v, pos, slot_count=slot_count, num_splits=num_splits, **kwargs
    )
    cleared = naive.slot_attention(q, k, v, slots_in_use(pos, slot_count), **kwargs)
    for got, want in zip(twin, cleared):
        assert torch.equal(got, want)
    assert bool((pos[1, 70:] >= 0).all()), "test setup: the slots past the count must look real"
    assert bool((result.out[0] == 0).all()) and bool(torch.isneginf(result.lse[0]).all())


def test_slot_count_past_int32_means_every_slot(poisoned_allocations):
    """An int64 slot count of 2**31 or more is clamped to S before the kernel's int32 cast, not wrapped
    (2**31 would become "no slot", 2**32 + 3 three slots)."""
    torch.manual_seed(20)
    B, Hq, Hkv, C, T, D = 2, 4, 2, 30, 1, 32
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.float32)
    pos = cache_positions(B, C, T, seen=40, holes=3)
    slot_count = torch.tensor([2**31, 2**32 + 3], device=device())
    result, _ = check_against_twin(poisoned_allocations, q, k, v, pos, slot_count=slot_count, return_lse=True)
    every_slot = naive.slot_attention(q, k, v, pos, return_lse=True)
    torch.testing.assert_close(result.lse, every_slot.lse)


@pytest.mark.parametrize("T", [1, 20], ids=["decode", "chunk"])
def test_negative_query_slot_is_blind_and_reads_nothing_outside(poisoned_allocations, T):
    """Query slots are not checked with ``check_positions=False``: slot -1 must read neither the word
    before a row of ``pos`` (here a position every key is visible to) nor another head's K/V. It is
    a blind query whose K/V read as zeros: the twin's result with that query in an empty, zeroed slot."""
    torch.manual_seed(21 + T)
    B, Hq, Hkv, C, D = 2, 4, 2, 30, 32
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float32)
    wide = torch.full((B, S + 1), 1000, dtype=torch.int64, device=device())
    pos = wide[:, 1:]
    pos.copy_(cache_positions(B, C, T, seen=40, holes=3))
    query_slots = last_slots(B, T, S, device()).clone()
    query_slots[1, 0] = -1
    prev = vectors(B, Hkv, D, torch.float32)
    kwargs = dict(prev_k=prev, prev_v=prev, return_lse=True)
    result = poisoned_allocations(q, k, v, pos, query_slots=query_slots, **kwargs)

    empty = int((pos[1, :C] < 0).nonzero()[0, 0])  # a hole of the cache stands in for slot -1
    standin_slots = query_slots.clone()
    standin_slots[1, 0] = empty
    zeroed_k, zeroed_v = k.clone(), v.clone()
    zeroed_k[1, :, empty] = 0
    zeroed_v[1, :, empty] = 0
    expected = naive.slot_attention(q, zeroed_k, zeroed_v, pos, query_slots=standin_slots, **kwargs)
    for name in ("out", "dk", "dv", "lse"):
        assert_close_rms(getattr(result, name), getattr(expected, name), torch.float32, name)
    assert bool((result.out[1, :, 0] == 0).all()) and bool(torch.isneginf(result.lse[1, :, 0]).all())


@pytest.mark.parametrize("T", [1, 20], ids=["decode", "chunk"])
def test_query_slot_past_the_count_is_blind_even_with_visible_keys(poisoned_allocations, T):
    """A query slot past ``slot_count`` holds a stale position later than every key in use: only the
    query-slot bound (not the key bound) makes the query blind."""
    torch.manual_seed(25 + T)
    B, Hq, Hkv, S, D = 1, 4, 2, 60, 32
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float32)
    pos = torch.arange(S, device=device())[None]
    query_slots = torch.arange(S - T, S, device=device())[None]
    slot_count = torch.tensor([30], device=device())
    result, _ = check_against_twin(
        poisoned_allocations, q, k, v, pos, query_slots=query_slots, slot_count=slot_count, return_lse=True
    )
    assert bool((result.out == 0).all()) and bool(torch.isneginf(result.lse).all())


def test_explicit_last_slots_equal_the_default(poisoned_allocations):
    """query_slots naming the last T slots, int32 and strided, is exactly the default call."""
    torch.manual_seed(16)
    B, Hq, Hkv, C, T, D = 2, 4, 2, 30, 20, 32
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.float16)
    pos = cache_positions(B, C, T, seen=40, holes=3, pad=(0, 5))
    wide = torch.arange(C, C + 2 * T, dtype=torch.int32, device=device()).repeat(B, 1)
    wide[:, 0::2] = torch.arange(C, C + T, dtype=torch.int32, device=device())
    query_slots = wide[:, ::2]
    assert not query_slots.is_contiguous()
    default = poisoned_allocations(q, k, v, pos, prev_k=k[:, :, 0], return_lse=True)
    explicit = poisoned_allocations(q, k, v, pos, query_slots=query_slots, prev_k=k[:, :, 0], return_lse=True)
    for name in ("out", "dk", "dv", "lse"):
        assert torch.equal(getattr(default, name).nan_to_num(7.0), getattr(explicit, name).nan_to_num(7.0)), name


# --------------------------------------------------------------------------- #
# Strides, options, deltas
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("T", [1, 45])
def test_non_contiguous_inputs(poisoned_allocations, T):
    """q/k/v as transposed views of [B, N, H, D] storage, pos and prev_* as strided slices."""
    torch.manual_seed(7)
    B, Hq, Hkv, C, D = 2, 4, 2, 50, 64
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float16, layout="bshd")
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    wide = torch.zeros(B, 2 * S, dtype=torch.int32, device=device())
    pos = wide[:, ::2]
    pos.copy_(cache_positions(B, C, T, seen=70, holes=4, pad=(0, 9)))
    prev_k = vectors(B, 2 * Hkv, D, torch.float32)[:, ::2]  # another dtype, like a float32 state
    prev_v = vectors(B, Hkv, 2 * D, torch.float16)[:, :, ::2]
    check_against_twin(poisoned_allocations, q, k, v, pos, prev_k=prev_k, prev_v=prev_v, return_lse=True)


def test_without_deltas_and_lse(poisoned_allocations):
    torch.manual_seed(8)
    T, D = 33, 64
    q, k, v = qkv(1, 4, 2, T, T, D, torch.float32)
    result, _ = check_against_twin(poisoned_allocations, q, k, v, prefill_positions(1, T), with_deltas=False)
    assert result.dk is None and result.dv is None and result.lse is None


def test_prev_key_without_prev_value(poisoned_allocations):
    """Only the key has a predecessor: dk[t=0] is a number, dv[t=0] stays NaN."""
    torch.manual_seed(9)
    T, D = 20, 64
    q, k, v = qkv(1, 2, 2, T, T + 5, D, torch.float32)
    pos = cache_positions(1, 5, T, seen=5)
    prev_k = vectors(1, 2, D, torch.float32)
    result, _ = check_against_twin(poisoned_allocations, q, k, v, pos, prev_k=prev_k)
    assert not bool(torch.isnan(result.dk).any())
    assert bool(torch.isnan(result.dv[:, :, 0]).all()) and not bool(torch.isnan(result.dv[:, :, 1:]).any())


def test_deltas_ignore_padding_and_cache(poisoned_allocations):
    """Deltas are over the raw new keys (padding included), never the cache before them."""
    torch.manual_seed(10)
    T, D = 12, 8
    q, k, v = qkv(2, 2, 1, T, T + 3, D, torch.float32)
    pos = cache_positions(2, 3, T, seen=3, pad=(0, 3))
    result, _ = check_against_twin(poisoned_allocations, q, k, v, pos)
    new_k = k[:, :, 3:].float()
    torch.testing.assert_close(result.dk[:, :, 1:], (new_k[:, :, 1:] - new_k[:, :, :-1]).norm(dim=-1))
    assert bool(torch.isnan(result.dk[:, :, 0]).all())


# --------------------------------------------------------------------------- #
# TMA: K/V tiles through tensor descriptors
# --------------------------------------------------------------------------- #
# A GPU takes this path on sm_90 outside the decode space. The interpreter runs
# descriptors too, so use_tma=True checks the kernel's descriptor branch on a CPU.

needs_descriptors = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
    reason="TMA descriptors need sm_90 or newer (or the interpreter)",
)


@pytest.mark.parametrize(
    "T, Hq, Hkv, D, dtype, layout",
    [
        (129, 8, 2, 128, torch.bfloat16, "contiguous"),  # ragged last tile in every (batch, head)
        (40, 6, 2, 80, torch.float16, "contiguous"),     # D < BLOCK_D: the box's dims past D read zeros
        (200, 3, 1, 8, torch.bfloat16, "contiguous"),    # G = 3, 16 bytes a key
        (45, 4, 2, 64, torch.float16, "bshd"),           # transposed views of padded storage, still aligned
    ],
)
@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["autotuned", "small-tiles"])
@needs_descriptors
def test_tensor_descriptor_path(poisoned_allocations, T, Hq, Hkv, D, dtype, layout, config):
    """Chunked prefill, two sequences (one left-padded): a tile past S must read zeros, never the next
    head's or sequence's slots. ``config=None`` sizes the box through the autotuner's pre-hook."""
    torch.manual_seed(T + D)
    B, C = 2, 23
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, dtype, layout=layout)
    assert attention.descriptor_layout_ok(k, v)
    pos = cache_positions(B, C, T, seen=30, holes=4, pad=(0, 11))
    check_against_twin(
        poisoned_allocations, q, k, v, pos, window=60, prev_k=k[:, :, 0], prev_v=v[:, :, 0], return_lse=True,
        use_tma=True, config=config,
    )


@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=config_id)
@needs_descriptors
def test_tensor_descriptor_path_any_slots_splits_and_slot_count(poisoned_allocations, config):
    """Every prefill config on the descriptor path, over shuffled slots with empty ones, then split three
    ways with ``slot_count`` hiding stale slots: tiles that run past the split or the count load those
    slots whole, and positions alone must keep them out."""
    torch.manual_seed(17)
    B, Hq, Hkv, C, T, D = 1, 4, 2, 60, 40, 32
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.float16)
    pos = cache_positions(B, C, T, seen=90, holes=6)
    check_any_layout(
        poisoned_allocations, q, k, v, pos, 30, window=70, prev_k=k[:, :, 0], return_lse=True,
        use_tma=True, config=config,
    )
    S = 300
    q, k, v = qkv(2, Hq, Hkv, T, S, D, torch.float16)
    pos, query_slots, slot_count = buffer_in_use([150, 270], S, T, seen=400)
    check_against_twin(
        poisoned_allocations, q, k, v, pos, query_slots=query_slots, slot_count=slot_count, num_splits=3,
        return_lse=True, use_tma=True, config=config,
    )


def test_descriptor_path_choice(monkeypatch):
    """TMA for 16-bit prefill on sm_90 when the layout allows it; the pointer path on sm_80, for decode,
    for fp32, under the interpreter, and whenever the layout rules a descriptor out."""
    k = torch.zeros(1, 2, 64, 64, dtype=torch.float16, device=device())
    odd = torch.zeros(1, 2, 64, 6, dtype=torch.float16, device=device())  # 12-byte slot stride
    shifted = torch.zeros(1 + 2 * 64 * 64, dtype=torch.float16, device=device())[1:].view(1, 2, 64, 64)
    strided = torch.zeros(1, 2, 64, 128, dtype=torch.float16, device=device())[..., ::2]
    assert attention.descriptor_layout_ok(k, k)
    for plane in (odd, shifted, strided):
        assert not attention.descriptor_layout_ok(k, plane)
    on_hopper = not attention.INTERPRET and torch.cuda.get_device_capability() >= (9, 0)
    assert attention.uses_tensor_descriptors(k, k, 512) == on_hopper  # never under the interpreter

    # What a GPU launch would pick, with the static report's stand-in driver as the compile target.
    monkeypatch.setattr(attention, "INTERPRET", False)
    previous = triton.runtime.driver._active
    try:
        triton.runtime.driver.set_active(StandInDriver(90))
        assert attention.uses_tensor_descriptors(k, k, 512)
        assert attention.uses_tensor_descriptors(k.bfloat16(), k.bfloat16(), attention.DECODE_MAX_ROWS + 1)
        assert not attention.uses_tensor_descriptors(k, k, attention.DECODE_MAX_ROWS)
        assert not attention.uses_tensor_descriptors(k.float(), k.float(), 512)
        assert not attention.uses_tensor_descriptors(k, shifted, 512)
        triton.runtime.driver.set_active(StandInDriver(80))
        assert not attention.uses_tensor_descriptors(k, k, 512)
    finally:
        triton.runtime.driver.set_active(previous)

    q = torch.zeros(1, 2, 64, 6, dtype=torch.float16, device=device())
    with pytest.raises(ValueError, match="use_tma"):
        attention.slot_attention(q, odd, odd, prefill_positions(1, 64), use_tma=True)


# --------------------------------------------------------------------------- #
# Every autotune config, launched explicitly
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("empty_slots", [None, 20], ids=["last-slots", "shuffled-slots"])
@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=config_id)
def test_every_prefill_config(poisoned_allocations, config, empty_slots):
    torch.manual_seed(11)
    B, Hq, Hkv, C, T, D = 1, 2, 1, 40, 70, 64
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float16)
    pos = cache_positions(B, C, T, seen=60, holes=6)
    kwargs = dict(window=50, prev_k=k[:, :, 0], prev_v=v[:, :, 0], return_lse=True, config=config)
    if empty_slots is None:
        check_against_twin(poisoned_allocations, q, k, v, pos, **kwargs)
    else:
        check_any_layout(poisoned_allocations, q, k, v, pos, empty_slots, **kwargs)


@pytest.mark.parametrize("empty_slots", [None, 40], ids=["last-slots", "shuffled-slots"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=config_id)
def test_every_decode_config(poisoned_allocations, config, num_splits, empty_slots):
    torch.manual_seed(12)
    B, Hq, Hkv, C, D = 1, 8, 2, 299, 64
    S = C + 1
    q, k, v = qkv(B, Hq, Hkv, 1, S, D, torch.float16)
    pos = cache_positions(B, C, 1, seen=350, holes=20)
    kwargs = dict(prev_k=k[:, :, 0], num_splits=num_splits, return_lse=True, config=config)
    if empty_slots is None:
        check_against_twin(poisoned_allocations, q, k, v, pos, **kwargs)
    else:
        check_any_layout(poisoned_allocations, q, k, v, pos, empty_slots, **kwargs)


def test_config_spaces_are_well_formed():
    # A config tuned for a handful of programs must not serve a full GPU, nor one split for many.
    assert {"PROGRAMS_BUCKET", "SPLITS_BUCKET"} <= set(attention.AUTOTUNE_KEY)
    decode_rows = attention.DECODE_MAX_ROWS
    for space, min_rows in ((PREFILL_CONFIGS, decode_rows + 1), (DECODE_CONFIGS, decode_rows)):
        assert 1 <= len(space) <= 8
        assert len({(str(c.kwargs), c.num_warps, c.num_stages) for c in space}) == len(space), "duplicate config"
        for config in space:
            assert set(config.kwargs) == {"BLOCK_M", "BLOCK_N"}
            assert config.kwargs["BLOCK_M"] >= 16 and config.kwargs["BLOCK_N"] >= 16  # tl.dot minimum
            # Decode: one row block covers a whole step; prefill tiles are bigger still.
            assert config.kwargs["BLOCK_M"] >= min_rows


# --------------------------------------------------------------------------- #
# Heuristics
# --------------------------------------------------------------------------- #


def test_split_heuristic():
    h100 = 132
    # Batch 1, 8 KV heads, 32k cache: 264 programs wanted -> 33 splits of ~1k keys.
    assert attention.choose_num_splits(8, 4, 32768, h100) == 33
    # A short cache: each split keeps at least MIN_KEYS_PER_SPLIT keys.
    assert attention.choose_num_splits(8, 4, 1000, h100) == 1000 // attention.MIN_KEYS_PER_SPLIT
    # The batch already fills the GPU.
    assert attention.choose_num_splits(64 * 8, 4, 32768, h100) == 1
    # Rows above the decode space split too when their row blocks leave SMs idle:
    # a 16-token chunk at G = 8 is one row block per (batch, kv head).
    assert attention.choose_num_splits(8, 16 * 8, 32768, h100) == 33
    # ... but a long prefill fills the GPU with row blocks alone.
    assert attention.choose_num_splits(8, 8192 * 4, 32768, h100) == 1
    # No GPU, nothing to fill.
    assert attention.choose_num_splits(8, 4, 32768, 0) == 1
    assert attention.uses_decode_space(16) and not attention.uses_decode_space(17)


@pytest.mark.parametrize("budget", [64, 255, 256, 1000, 4096, 32768])
@pytest.mark.parametrize("multiprocessors", [8, 132])
def test_every_launched_split_has_keys_at_budget_plus_one(budget, multiprocessors):
    """The steady state S = budget + 1: the launched splits cover the keys, none of them empty."""
    S = budget + 1
    for batch_kv_heads in (1, 8, 32):
        for num_rows in (1, 4, 64, 512):
            wanted = attention.choose_num_splits(batch_kv_heads, num_rows, S, multiprocessors)
            keys_per_split, launched = attention.split_plan(S, wanted)
            assert 1 <= launched <= wanted
            assert keys_per_split % attention.SPLIT_GRANULE == 0
            # Split i covers [i * keys_per_split, (i + 1) * keys_per_split) ∩ [0, S).
            assert (launched - 1) * keys_per_split < S <= launched * keys_per_split
