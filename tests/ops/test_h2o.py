"""H2O column sums (ops/h2o.py): Triton pass 2 against its PyTorch twin and eager attention.

The row normalisers ``lse`` come from attention (pass 1); with them both
backends compute ``Σ exp(scale · q · k − lse)`` over visible pairs. Every Triton
call runs with ``torch.empty`` poisoned (NaN-filled), so a key slot the kernel
forgets to write shows up. Shapes stay small: on CPU the kernel runs in
Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch

from epikv_triton import ops
from epikv_triton.ops import h2o, naive
from epikv_triton.ops.h2o import COLUMN_SUM_CONFIGS
from epikv_triton.ops.slots import last_slots, resolve_query_slots, slots_in_use, visibility_mask
from tests.helpers import (
    ANY_SLOT_CASES,
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

# Relative RMS error allowed per input dtype. Half-precision inputs are upcast
# exactly and every score, exponential and sum is float32 on both sides, so the
# only differences are accumulation order (and a GPU's tensor-core adds and
# approximate exp2): tighter than the output tolerances of attention.
COLUMN_SUM_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


# --------------------------------------------------------------------------- #
# Inputs and comparisons
# --------------------------------------------------------------------------- #


def qk(B, Hq, Hkv, T, S, D, dtype, layout="contiguous"):
    """Random ``q [B, Hq, T, D]`` and ``k [B, Hkv, S, D]``."""
    return randn(B, Hq, T, D, dtype=dtype, layout=layout), randn(B, Hkv, S, D, dtype=dtype, layout=layout)


def pass_one_lse(q, k, pos, scale=None, window=None, query_slots=None):
    """``[B, Hq, T]`` row normalisers from the attention twin (the values do not affect lse)."""
    return naive.slot_attention(
        q, k, k, pos, query_slots=query_slots, scale=scale, window=window, with_deltas=False, return_lse=True
    ).lse


@pytest.fixture
def poisoned_run(monkeypatch):
    """Run the Triton launcher with every float ``torch.empty`` NaN-filled."""
    return poisoning_runner(monkeypatch, h2o.attention_column_sums)


def assert_close_sums(got, want, dtype, what):
    """Finite everywhere (NaN = a slot left unwritten) and within ``COLUMN_SUM_TOLERANCE[dtype]`` relative RMS."""
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite column sums (a slot left unwritten?)"
    error = torch.sqrt(torch.mean((got - want.float()) ** 2))
    reference = torch.sqrt(torch.mean(want.float() ** 2)).clamp(min=1e-6)
    tolerance = COLUMN_SUM_TOLERANCE[dtype]
    assert error <= tolerance * reference, f"{what}: relative RMS error {float(error / reference):.3g} > {tolerance:g}"


def check_against_twin(run, q, k, pos, lse=None, **kwargs):
    """Triton vs twin with the same lse, plus two properties the twin does not decide.

    * Mass: each query row that sees a key hands out probability 1 in total, so
      a (batch, kv head) row of sums adds up to the number of such (token, head)
      pairs of its group.
    * A slot no query can see gets exactly 0.
    """
    scale, window, query_slots = kwargs.get("scale"), kwargs.get("window"), kwargs.get("query_slots")
    if lse is None:
        lse = pass_one_lse(q, k, pos, scale=scale, window=window, query_slots=query_slots)
    got = run(q, k, pos, lse, **kwargs)
    kwargs.pop("config", None)
    want = naive.attention_column_sums(q, k, pos, lse, **kwargs)
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert got.shape == (B, Hkv, S) and got.dtype == torch.float32 and got.is_contiguous()
    assert_close_sums(got, want, q.dtype, "column sums vs twin")

    visible = visibility_mask(pos, resolve_query_slots(query_slots, q, k), window)  # [B, T, S]
    seeing_rows = torch.isfinite(lse).reshape(B, Hkv, Hq // Hkv, T).sum(dim=(2, 3)).float()
    torch.testing.assert_close(got.sum(-1), seeing_rows, rtol=1e-4, atol=1e-4)
    unseen = ~visible.any(dim=1)  # [B, S]
    assert bool((got.permute(0, 2, 1)[unseen] == 0).all()), "a slot nobody sees got a nonzero sum"
    return got, want


# --------------------------------------------------------------------------- #
# The oracle itself
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("score_block", [naive.SCORE_BLOCK, 1, 2 * 2 * 4 * 15], ids=["one-block", "1-query", "2-query"])
@pytest.mark.parametrize("empty_slots", [None, 4], ids=["last-slots", "shuffled-slots"])
def test_twin_matches_a_per_pair_loop(empty_slots, score_block, monkeypatch):
    """naive.attention_column_sums against probabilities written one (query, key) pair at a time, its score
    matrix built whole or a block of queries at a time."""
    monkeypatch.setattr(naive, "SCORE_BLOCK", score_block)
    torch.manual_seed(0)
    B, Hq, Hkv, T, S, D = 2, 4, 2, 5, 11, 6
    q = torch.randn(B, Hq, T, D)
    k = torch.randn(B, Hkv, S, D)
    pos = torch.tensor([[3, -1, 0, 5, 1, 2, 6, 7, 8, 9, 10], [-1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 2]])
    pos[1, -2] = -1  # a padding query inside the chunk: it sees nothing and adds nothing
    pos[1, -1] = 1
    query_slots = None
    if empty_slots:
        pos, k, slot_of = shuffle_slots(pos, k, empty_slots=empty_slots)
        query_slots = slot_of[:, -T:]
        S = pos.shape[1]
    slots = resolve_query_slots(query_slots, q, k).tolist()
    scale = 0.37
    for window in (None, 4):
        lse = pass_one_lse(q, k, pos, scale=scale, window=window, query_slots=query_slots)
        got = naive.attention_column_sums(q, k, pos, lse, query_slots=query_slots, scale=scale, window=window)
        for b in range(B):
            for kv in range(Hkv):
                for j in range(S):
                    total = 0.0
                    for h in range(kv * (Hq // Hkv), (kv + 1) * (Hq // Hkv)):
                        for i in range(T):
                            pq, pk = int(pos[b, slots[b][i]]), int(pos[b, j])
                            if pk < 0 or pk > pq or (window is not None and pq - pk >= window):
                                continue
                            seen = [
                                jj for jj in range(S)
                                if 0 <= pos[b, jj] <= pq and (window is None or pq - pos[b, jj] < window)
                            ]
                            logits = [float(q[b, h, i] @ k[b, kv, jj]) * scale for jj in seen]
                            top = max(logits)
                            norm = sum(math.exp(x - top) for x in logits)
                            total += math.exp(float(q[b, h, i] @ k[b, kv, j]) * scale - top) / norm
                    assert math.isclose(float(got[b, kv, j]), total, rel_tol=1e-5, abs_tol=1e-6), (b, kv, j)


# --------------------------------------------------------------------------- #
# Prefill, chunked prefill, decode
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "T, Hq, Hkv, D",
    [
        (1, 4, 4, 64),     # one token
        (63, 4, 1, 64),    # G = 4, rows one short of a power of two
        (129, 8, 1, 128),  # G = 8: several row blocks, a second key block of one slot
        (129, 2, 2, 8),    # G = 1, tiny head dim (BLOCK_D pads 8 to 16)
        (70, 3, 1, 8),     # G = 3, not a power of two
        (20, 2, 1, 256),   # the largest head dim the Triton path takes
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(poisoned_run, T, Hq, Hkv, D, dtype):
    torch.manual_seed(T + D)
    q, k = qk(1, Hq, Hkv, T, T, D, dtype)
    check_against_twin(poisoned_run, q, k, prefill_positions(1, T))


def test_prefill_left_padding(poisoned_run):
    """Unpadded, left-padded, and all-padding sequences: blind rows add nothing, padding slots get 0."""
    torch.manual_seed(1)
    B, Hq, Hkv, T, D = 3, 4, 2, 40, 64
    q, k = qk(B, Hq, Hkv, T, T, D, torch.float32)
    pos = prefill_positions(B, T, pad=(0, 13, T))
    lse = pass_one_lse(q, k, pos)
    assert bool(torch.isneginf(lse[2]).all()), "test setup: sequence 2 is all padding"
    got, _ = check_against_twin(poisoned_run, q, k, pos, lse)
    assert bool((got[2] == 0).all()) and bool((got[1, :, :13] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, Hq, Hkv", [(64, 8, 2), (128, 4, 1), (8, 2, 2)])
def test_chunked_prefill(poisoned_run, dtype, D, Hq, Hkv):
    """90 cache slots (shuffled positions, 9 empty) + 37 new tokens."""
    torch.manual_seed(D + Hq)
    C, T = 90, 37
    q, k = qk(1, Hq, Hkv, T, C + T, D, dtype)
    pos = cache_positions(1, C, T, seen=150, holes=9)
    check_against_twin(poisoned_run, q, k, pos)


@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (8, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode(poisoned_run, Hq, Hkv, dtype):
    """One new token over 299 cache slots (3 key blocks, the last partial), one left-padded sequence."""
    torch.manual_seed(Hq * 10 + Hkv)
    B, C, D = 2, 299, 64
    q, k = qk(B, Hq, Hkv, 1, C + 1, D, dtype)
    pos = cache_positions(B, C, 1, seen=400, holes=30, pad=(0, 100))
    check_against_twin(poisoned_run, q, k, pos)


@pytest.mark.parametrize("T", [1, 20])
def test_slot_count_bounds_the_slots_in_use(poisoned_run, T):
    """Slots past ``slot_count`` are empty whatever their positions say: the kernel (blocks wholly
    past the count included) and the twin both equal the twin over positions with those slots cleared,
    and the slots past the count get exactly 0."""
    torch.manual_seed(T)
    B, Hq, Hkv, S, D = 4, 4, 2, 300, 32
    q, k = qk(B, Hq, Hkv, T, S, D, torch.float32)
    pos, query_slots, slot_count = buffer_in_use([T, 70, 150, S], S, T, seen=400)
    slot_count[0] = 0  # sequence 0's new tokens lie past its count: they look at nothing
    cleared = slots_in_use(pos, slot_count)
    lse = pass_one_lse(q, k, cleared, query_slots=query_slots)
    got = poisoned_run(q, k, pos, lse, query_slots=query_slots, slot_count=slot_count)
    want = naive.attention_column_sums(q, k, pos, lse, query_slots=query_slots, slot_count=slot_count)
    assert torch.equal(want, naive.attention_column_sums(q, k, cleared, lse, query_slots=query_slots))
    assert_close_sums(got, want, torch.float32, "column sums vs twin")
    assert bool((pos[1, 70:] >= 0).all()), "test setup: the slots past the count must look real"
    past_count = cleared[:, None, :].expand(B, Hkv, S) < 0
    assert bool((got[past_count] == 0).all()) and bool((got[0] == 0).all())


def test_slot_count_past_int32_means_every_slot(poisoned_run):
    """An int64 slot count of 2**31 or more is clamped to S before the kernel's int32 cast, not wrapped."""
    torch.manual_seed(20)
    B, Hq, Hkv, C, T, D = 2, 4, 2, 30, 20, 32
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float32)
    pos = cache_positions(B, C, T, seen=40, holes=3)
    slot_count = torch.tensor([2**31, 2**32 + 3], device=device())
    got, _ = check_against_twin(poisoned_run, q, k, pos, slot_count=slot_count)
    torch.testing.assert_close(got, naive.attention_column_sums(q, k, pos, pass_one_lse(q, k, pos)))


@pytest.mark.parametrize("T", [1, 20], ids=["decode", "chunk"])
def test_negative_query_slot_is_blind(poisoned_run, T):
    """Query slots are not checked with ``check_positions=False``: slot -1 must not read the word before a
    row of ``pos`` (here a position that sees every key). It is a blind query, contributing nothing even
    with a finite lse: the twin's result with that query in an empty slot."""
    torch.manual_seed(22 + T)
    B, Hq, Hkv, C, D = 2, 4, 2, 30, 32
    S = C + T
    q, k = qk(B, Hq, Hkv, T, S, D, torch.float32)
    wide = torch.full((B, S + 1), 1000, dtype=torch.int64, device=device())
    pos = wide[:, 1:]
    pos.copy_(cache_positions(B, C, T, seen=40, holes=3))
    query_slots = last_slots(B, T, S, device()).clone()
    query_slots[1, 0] = -1
    standin_slots = query_slots.clone()
    standin_slots[1, 0] = int((pos[1, :C] < 0).nonzero()[0, 0])
    lse = pass_one_lse(q, k, pos, query_slots=standin_slots).nan_to_num(neginf=0.0)
    got = poisoned_run(q, k, pos, lse, query_slots=query_slots)
    want = naive.attention_column_sums(q, k, pos, lse, query_slots=standin_slots)
    assert_close_sums(got, want, torch.float32, "column sums vs twin")


def test_decode_blind_query(poisoned_run):
    """A padding decode query (lse = -inf) leaves its whole sequence at 0."""
    torch.manual_seed(5)
    B, Hq, Hkv, C, D = 2, 4, 1, 250, 64
    q, k = qk(B, Hq, Hkv, 1, C + 1, D, torch.float16)
    pos = cache_positions(B, C, 1, seen=300, holes=10)
    pos[1, -1] = -1
    got, _ = check_against_twin(poisoned_run, q, k, pos)
    assert bool((got[1] == 0).all()) and bool((got[0] > 0).any())


# --------------------------------------------------------------------------- #
# Sliding windows (and the kernel's window skip)
# --------------------------------------------------------------------------- #


def config_with(block_m, block_n):
    return next(c for c in COLUMN_SUM_CONFIGS if c.kwargs == {"BLOCK_M": block_m, "BLOCK_N": block_n})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_sliding_window(poisoned_run, dtype):
    """Window 16 over 129 tokens with 64-key blocks: later key blocks end their row walk early."""
    torch.manual_seed(2)
    B, Hq, Hkv, T, D = 2, 2, 1, 129, 64
    q, k = qk(B, Hq, Hkv, T, T, D, dtype)
    pos = prefill_positions(B, T, pad=(0, 7))
    check_against_twin(poisoned_run, q, k, pos, window=16, config=config_with(64, 64))


def test_chunked_prefill_window_and_padding(poisoned_run):
    """Cache + chunk, window shorter than the chunk, one left-padded sequence; small key tiles."""
    torch.manual_seed(4)
    B, Hq, Hkv, C, T, D = 2, 4, 1, 40, 90, 64
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float16)
    pos = cache_positions(B, C, T, seen=60, holes=5, pad=(0, 20))
    check_against_twin(poisoned_run, q, k, pos, window=24, config=config_with(64, 64))


def test_window_skip_ends_exactly_at_the_last_seeing_token(poisoned_run):
    """Windows 1..16 with 16-row blocks and G = 1: the row walk of key block 0 ends at
    token ``127 + window``, which lands on every residue modulo BLOCK_M, so one of
    them leaves a single seeing token alone in the last row block — an end one
    token short drops it."""
    torch.manual_seed(15)
    T, D = 200, 16
    q, k = qk(1, 1, 1, T, T, D, torch.float32)
    pos = prefill_positions(1, T)
    config = config_with(16, 128)
    for window in range(1, 17):
        check_against_twin(poisoned_run, q, k, pos, window=window, config=config)


@pytest.mark.parametrize(
    "config",
    [None, next(c for c in COLUMN_SUM_CONFIGS if c.kwargs == {"BLOCK_M": 64, "BLOCK_N": 64})],
    ids=["autotuned", "small-tiles"],
)
@pytest.mark.parametrize("C, T, window", [(128, 20, None), (128, 20, 150), (128, 20, 40), (126, 2, None)])
def test_fully_visible_tiles_skip_the_mask(poisoned_run, C, T, window, config):
    """A hole-free cache older than every new token: whole tiles are visible and unmasked.

    The same cases as attention's test: fully visible cache tiles without a
    window and with 150, none with 40, a tile holding a key one position past
    the first query with 2 new tokens, and a padding query in sequence 1.
    """
    torch.manual_seed(16)
    B, Hq, Hkv, D = 2, 4, 2, 32
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float32)
    pos = cache_positions(B, C, T, seen=C)
    pos[1, -1] = -1
    check_against_twin(poisoned_run, q, k, pos, window=window, config=config)


def test_largest_int32_window_sees_everything(poisoned_run):
    """window = 2**31 - 1 (a "no window" sentinel): the window skip's newest key + window - 1 must not
    wrap, or no token sees any block and every sum is 0."""
    torch.manual_seed(18)
    B, Hq, Hkv, C, T, D = 2, 4, 2, 30, 20, 32
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float32)
    pos = cache_positions(B, C, T, seen=40, holes=3, pad=(0, 6))
    got, _ = check_against_twin(poisoned_run, q, k, pos, window=2**31 - 1)
    torch.testing.assert_close(got, naive.attention_column_sums(q, k, pos, pass_one_lse(q, k, pos)))


def test_tile_spanning_exactly_the_window_keeps_the_mask(poisoned_run):
    """The attention case: a hole-free 128-key block of positions 0..127, a query at 127, window 127 hides
    key 0, so the block must keep the mask."""
    torch.manual_seed(23)
    S = 128
    q, k = qk(1, 2, 1, 1, S, 32, torch.float32)
    pos = torch.arange(S, device=device())[torch.randperm(S - 1, device=device()).tolist() + [S - 1]][None]
    got, _ = check_against_twin(poisoned_run, q, k, pos, window=S - 1, config=config_with(16, 128))
    assert bool((got[:, :, pos[0] == 0] == 0).all())


def test_window_of_one_sees_only_itself(poisoned_run):
    """window = 1: each query sees only its own key, so every new slot gets exactly G."""
    torch.manual_seed(13)
    B, Hq, Hkv, C, T, D = 1, 4, 2, 30, 50, 64
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float32)
    pos = cache_positions(B, C, T, seen=40)
    got, _ = check_against_twin(poisoned_run, q, k, pos, window=1, config=config_with(64, 64))
    torch.testing.assert_close(got[:, :, C:], torch.full((B, Hkv, T), 2.0), rtol=1e-5, atol=1e-5)
    assert bool((got[:, :, :C] == 0).all())


# --------------------------------------------------------------------------- #
# New tokens in any slots (query_slots)
# --------------------------------------------------------------------------- #


def check_any_layout(run, q, k, pos, empty_slots, **kwargs):
    """The call in the default layout, then with the slots shuffled (the new tokens anywhere, in no order,
    ``empty_slots`` empty slots mixed in): the kernel must match the twin there (empty slots getting 0),
    and every slot's sum must follow it to its new slot."""
    T = q.shape[2]
    twin_kwargs = {n: a for n, a in kwargs.items() if n != "config"}
    lse = pass_one_lse(q, k, pos, scale=kwargs.get("scale"), window=kwargs.get("window"))
    default = naive.attention_column_sums(q, k, pos, lse, **twin_kwargs)
    pos, k, slot_of = shuffle_slots(pos, k, empty_slots=empty_slots)
    got, _ = check_against_twin(run, q, k, pos, query_slots=slot_of[:, -T:], **kwargs)
    moved = got.gather(2, slot_of[:, None, :].expand_as(default))
    assert_close_sums(moved, default, q.dtype, "column sums in their new slots")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, T, window, empty_slots", ANY_SLOT_CASES)
def test_new_tokens_in_any_slots(poisoned_run, dtype, C, T, window, empty_slots):
    """The row walk's bounds by position, whatever the slots; sequence 1 is left-padded."""
    torch.manual_seed(C + T + empty_slots)
    Hq, Hkv, D = 4, 2, 64
    q, k = qk(2, Hq, Hkv, T, C + T, D, dtype)
    pos = chunk_positions(C, T)
    check_any_layout(poisoned_run, q, k, pos, empty_slots, window=window, config=config_with(64, 64))


@pytest.mark.parametrize("T", [1, 3])
def test_decode_in_any_slot(poisoned_run, T):
    """A decode step written into a hole in the middle of the cache, past empty capacity."""
    torch.manual_seed(T)
    B, Hq, Hkv, C, D = 2, 4, 1, 200, 64
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.bfloat16)
    pos = cache_positions(B, C, T, seen=260, holes=12, pad=(0, 30))
    check_any_layout(poisoned_run, q, k, pos, 60)


# --------------------------------------------------------------------------- #
# Strides, scale
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("T", [1, 45])
def test_non_contiguous_inputs(poisoned_run, T):
    """q/k as transposed views of [B, N, H, D] storage, pos and lse as strided views."""
    torch.manual_seed(7)
    B, Hq, Hkv, C, D = 2, 4, 2, 50, 64
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float16, layout="bshd")
    assert not (q.is_contiguous() or k.is_contiguous())
    wide = torch.zeros(B, 2 * (C + T), dtype=torch.int32, device=device())
    pos = wide[:, ::2]
    pos.copy_(cache_positions(B, C, T, seen=70, holes=4, pad=(0, 9)))
    lse_storage = torch.empty(B, T, Hq + 3, device=device())
    lse = lse_storage[:, :, :Hq].permute(0, 2, 1)  # [B, Hq, T] with strides (., 1, Hq + 3)
    lse.copy_(pass_one_lse(q, k, pos))
    assert not lse.is_contiguous()
    check_against_twin(poisoned_run, q, k, pos, lse)


def test_custom_scale_with_large_scores(poisoned_run):
    """Scores in the hundreds: probabilities must come from lse, not overflow."""
    torch.manual_seed(3)
    T, D = 70, 64
    q, k = qk(1, 2, 2, T, T, D, torch.float32)
    check_against_twin(poisoned_run, q * 4, k * 4, prefill_positions(1, T), scale=1.0)


# --------------------------------------------------------------------------- #
# Every autotune config, launched explicitly
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("empty_slots", [None, 20], ids=["last-slots", "shuffled-slots"])
@pytest.mark.parametrize("config", COLUMN_SUM_CONFIGS, ids=config_id)
def test_every_config_chunked_prefill(poisoned_run, config, empty_slots):
    """40 cache slots + 70 new tokens, G = 4, window 50: both skips and a partial key block."""
    torch.manual_seed(11)
    B, Hq, Hkv, C, T, D = 1, 4, 1, 40, 70, 64
    q, k = qk(B, Hq, Hkv, T, C + T, D, torch.float16)
    pos = cache_positions(B, C, T, seen=60, holes=6)
    if empty_slots is None:
        check_against_twin(poisoned_run, q, k, pos, window=50, config=config)
    else:
        check_any_layout(poisoned_run, q, k, pos, empty_slots, window=50, config=config)


@pytest.mark.parametrize("config", COLUMN_SUM_CONFIGS, ids=config_id)
def test_every_config_decode(poisoned_run, config):
    torch.manual_seed(12)
    B, Hq, Hkv, C, D = 1, 8, 2, 299, 128
    q, k = qk(B, Hq, Hkv, 1, C + 1, D, torch.bfloat16)
    pos = cache_positions(B, C, 1, seen=350, holes=20)
    check_against_twin(poisoned_run, q, k, pos, config=config)


def test_config_space_is_well_formed():
    assert 1 <= len(COLUMN_SUM_CONFIGS) <= 8
    assert len({(str(c.kwargs), c.num_warps, c.num_stages) for c in COLUMN_SUM_CONFIGS}) == len(COLUMN_SUM_CONFIGS)
    for config in COLUMN_SUM_CONFIGS:
        assert set(config.kwargs) == {"BLOCK_M", "BLOCK_N"}
        assert config.kwargs["BLOCK_M"] >= 16 and config.kwargs["BLOCK_N"] >= 16  # tl.dot minimum
    # Decode has G <= 16 rows per (batch, kv head): some config must not waste a bigger row tile.
    assert any(c.kwargs["BLOCK_M"] == 16 for c in COLUMN_SUM_CONFIGS)


# --------------------------------------------------------------------------- #
# The public dispatcher
# --------------------------------------------------------------------------- #


def eager_column_sums(q, k, mask, scale):
    """Eager H2O: materialise softmax(masked q·kᵀ), sum over queries and group heads -> [B, Hkv, S].

    ``mask [B, T, S]`` bool (True = attend). Written with plain torch ops, the
    way eager H2O implementations do it; a row with nothing to attend to is a
    NaN softmax, zeroed.
    """
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    logits = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float().repeat_interleave(group, dim=1)) * scale
    probs = torch.softmax(logits.masked_fill(~mask[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=2).reshape(B, Hkv, group, S).sum(dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_two_pass_h2o_scores_match_eager_attention_column_sums(dtype):
    """The fused two-pass H2O scores match eager attention column sums.

    Pass 1 = ``ops.slot_attention(..., return_lse=True)``, pass 2 =
    ``ops.attention_column_sums`` (Triton here: GPU or interpreter), against a
    materialised softmax whose masks are built the eager way — a causal
    ``tril`` and a 0/1 padding mask for prefill, explicit position arithmetic
    for a chunk over a cache with a sliding window.
    """
    torch.manual_seed(21)
    B, Hq, Hkv, T, D = 2, 8, 2, 129, 64
    scale = D**-0.5
    q, k = qk(B, Hq, Hkv, T, T, D, dtype)
    v = randn(B, Hkv, T, D, dtype=dtype)
    assert ops.backend_for(q) == "triton", "this test must exercise the fused kernels"

    # Causal prefill; sequence 1 left-padded by 17 tokens.
    attention_mask = torch.ones(B, T, dtype=torch.bool, device=device())
    attention_mask[1, :17] = False
    pos = torch.where(attention_mask, attention_mask.long().cumsum(-1) - 1, -1)
    causal = torch.ones(T, T, dtype=torch.bool, device=device()).tril()
    mask = causal[None] & attention_mask[:, None, :] & attention_mask[:, :, None]
    lse = ops.slot_attention(q, k, v, pos, scale=scale, return_lse=True).lse
    fused = ops.attention_column_sums(q, k, pos, lse, scale=scale)
    expected = eager_column_sums(q, k, mask, scale)
    assert_close_sums(fused, expected, dtype, "prefill")

    # Chunk of 40 tokens over 60 cache slots (positions in shuffled order), window 32.
    C, T2, window = 60, 40, 32
    q2, k2 = qk(B, Hq, Hkv, T2, C + T2, D, dtype)
    v2 = randn(B, Hkv, C + T2, D, dtype=dtype)
    pos2 = torch.cat(
        [torch.stack([torch.randperm(C, device=device()) for _ in range(B)]),
         torch.arange(C, C + T2, device=device()).expand(B, T2)], dim=1,
    )
    pos_q, pos_k = pos2[:, C:, None], pos2[:, None, :]
    mask2 = (pos_k <= pos_q) & (pos_q - pos_k < window)
    lse2 = ops.slot_attention(q2, k2, v2, pos2, window=window, return_lse=True).lse
    fused2 = ops.attention_column_sums(q2, k2, pos2, lse2, window=window)
    expected2 = eager_column_sums(q2, k2, mask2, scale)
    assert_close_sums(fused2, expected2, dtype, "chunk")


def column_sum_inputs(B=2, Hq=4, Hkv=2, T=3, S=7, D=16):
    q = torch.randn(B, Hq, T, D)
    k = torch.randn(B, Hkv, S, D)
    pos = torch.arange(S).repeat(B, 1)
    lse = torch.randn(B, Hq, T)
    return dict(q=q, k=k, pos=pos, lse=lse)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(q=a["q"][0]), "q must have 4 dimensions"),
        (lambda a: a.update(k=a["k"].half()), "share one dtype"),
        (lambda a: a.update(k=a["k"][:, :, :, :8]), "k must have shape"),
        (lambda a: a.update(q=torch.randn(2, 3, 3, 16)), "multiple of key/value heads"),
        (lambda a: a.update(q=torch.randn(2, 0, 3, 16), lse=torch.randn(2, 0, 3)), "positive multiple"),
        (lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0]), r"empty head dim \(D = 0\)"),
        (lambda a: a.update(q=torch.randn(2, 4, 9, 16)), "last T key slots"),
        (lambda a: a.update(pos=a["pos"].float()), "pos must have dtype"),
        (lambda a: a.update(pos=a["pos"][:, :5]), "pos must have shape"),
        (lambda a: a.update(lse=a["lse"].half()), "lse must have dtype"),
        (lambda a: a.update(lse=a["lse"][:, :, :2]), "lse must have shape"),
        (lambda a: a.update(lse=a["lse"][0]), "lse must have 3 dimensions"),
        (lambda a: a.update(window=0), "window must be a positive int"),
        (lambda a: a["pos"].__setitem__((0, 5), 2), "positions out of order"),
        (lambda a: a.update(lse=a["lse"].to("meta")), "one device"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 5]] * 2)), r"query_slots must have shape \[B, T\]"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 5, 7]] * 2)), r"every entry in \[0, S=7\)"),
        (lambda a: a.update(query_slots=torch.tensor([[6, 5, 4]] * 2)), "positions out of order"),
    ],
)
def test_rejects_bad_input(mutate, message):
    args = column_sum_inputs()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ops.attention_column_sums(args.pop("q"), args.pop("k"), args.pop("pos"), args.pop("lse"), **args)


def test_dispatcher_accepts_padding_and_unchecked_positions():
    torch.manual_seed(14)
    args = column_sum_inputs()
    args["pos"][1, :2] = -1
    args["pos"][1, 2:] -= 2
    args["lse"] = pass_one_lse(args["q"], args["k"], args["pos"])
    got = ops.attention_column_sums(**args)
    torch.testing.assert_close(got, naive.attention_column_sums(**args), rtol=1e-5, atol=1e-6)
    args["pos"][0, 5] = 2  # out of order, but the caller vouches for its positions
    ops.attention_column_sums(**args, check_positions=False)
