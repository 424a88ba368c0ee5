"""Budgeted selection and in-place compaction.

* ``select_slots`` vs a per-sequence stable-sort reference written here.
* The Triton ``compact_slots_`` vs the PyTorch twin and vs an out-of-place
  gather written here, on caches that are strided views of a bigger buffer,
  so bytes the op must not touch are checked too.
* ``ops.evict_`` end to end.
"""

from __future__ import annotations

import math

import pytest
import torch

from epikv_triton import ops
from epikv_triton.ops import naive
from epikv_triton.ops.compaction import COMPACTION_CONFIGS, compact_slots_
from tests.helpers import device

# ----------------------------------------------------------------------------
# select_slots
# ----------------------------------------------------------------------------


def reference_select(scores, pos, budget, protect_prefix, recent):
    """Per sequence: protected slots first, then by score descending (NaN lowest),
    ties to the lower slot index; padding (pos = -1) never kept. Returns [B, min(budget, S)]."""
    B, S = scores.shape
    width = min(budget, S)
    prefixes = [protect_prefix] * B if isinstance(protect_prefix, int) else list(protect_prefix)
    rows = []
    for b in range(B):
        positions = pos[b].tolist()
        values = scores[b].tolist()
        seen = max(positions) + 1
        real = [j for j in range(S) if positions[j] >= 0]

        def rank(j):
            protected = positions[j] < prefixes[b] or positions[j] >= seen - recent
            is_nan = math.isnan(values[j])
            return (not protected, is_nan, 0.0 if is_nan else -values[j], j)

        kept = sorted(sorted(real, key=rank)[:width])
        rows.append(kept + [-1] * (width - len(kept)))
    return torch.tensor(rows, dtype=torch.int64)


def selection_inputs(B, S, generator, *, ties=False, nan_fraction=0.0, infinite=False, left_padding=(), gaps=False):
    """scores with optional ties/NaN/±inf (NaN still ranks below -inf); positions 0.. per sequence after its left padding, optionally with gaps
    (positions of tokens evicted earlier)."""
    if ties:
        scores = torch.randint(0, 3, (B, S), generator=generator).float()
    else:
        scores = torch.randn(B, S, generator=generator)
    if infinite:
        scores[:, 1::5] = float("-inf")
        scores[:, 3::7] = float("inf")
    scores[torch.rand(B, S, generator=generator) < nan_fraction] = float("nan")
    pos = torch.full((B, S), -1, dtype=torch.int64)
    for b in range(B):
        pad = left_padding[b] if left_padding else 0
        steps = torch.randint(1, 4, (S - pad,), generator=generator) if gaps else torch.ones(S - pad, dtype=torch.int64)
        pos[b, pad:] = torch.cumsum(steps, 0) - 1
    return scores.to(device()), pos.to(device())


SELECT_CASES = {
    # name: (B, S, budget, protect_prefix, recent, input options)
    "plain": (2, 30, 12, 4, 3, {}),
    "ties": (3, 25, 10, 2, 2, {"ties": True}),
    "nan_scores": (2, 25, 15, 1, 2, {"nan_fraction": 0.4}),
    "ties_and_nan": (2, 40, 20, 4, 4, {"ties": True, "nan_fraction": 0.3}),
    "infinite_and_nan": (2, 30, 22, 1, 1, {"infinite": True, "nan_fraction": 0.4}),
    "budget_equals_slots": (2, 16, 16, 4, 4, {}),
    "budget_equals_protected": (2, 30, 7, 4, 3, {"gaps": True}),
    "budget_above_slots": (2, 10, 25, 2, 2, {}),
    "left_padding": (3, 24, 10, 3, 2, {"left_padding": (0, 5, 20), "nan_fraction": 0.2}),
    "per_sequence_prefix": (3, 24, 14, [0, 6, 11], 3, {"left_padding": (0, 2, 4), "gaps": True}),
    "all_padding_sequence": (2, 12, 6, 2, 2, {"left_padding": (12, 3)}),
}


@pytest.mark.parametrize("name", list(SELECT_CASES))
def test_select_slots_matches_stable_sort_reference(name):
    B, S, budget, prefix, recent, options = SELECT_CASES[name]
    g = torch.Generator().manual_seed(list(SELECT_CASES).index(name))
    scores, pos = selection_inputs(B, S, g, **options)
    keep = ops.select_slots(scores, pos, budget, protect_prefix=prefix, recent=recent)
    expected = reference_select(scores.cpu(), pos.cpu(), budget, prefix, recent)
    assert keep.dtype == torch.int64
    assert torch.equal(keep.cpu(), expected), f"\nkeep     {keep.tolist()}\nexpected {expected.tolist()}"


def test_select_slots_keeps_protected_even_when_they_score_lowest():
    scores = torch.tensor([[-9.0, -9.0, 5.0, 4.0, 3.0, 2.0, 1.0, -9.0]], device=device())
    pos = torch.arange(8, device=device())[None]
    keep = ops.select_slots(scores, pos, 4, protect_prefix=2, recent=1)
    assert keep.tolist() == [[0, 1, 2, 7]]


# ----------------------------------------------------------------------------
# compact_slots_
# ----------------------------------------------------------------------------


def reference_compact(kv, pos, scores, keep):
    """Out-of-place gather: what kv/pos/scores must hold afterwards (kv bytes at keep = -1 and >= K untouched)."""
    kv, pos, scores = kv.clone(), pos.clone(), scores.clone()
    source_kv, source_pos, source_scores = kv.clone(), pos.clone(), scores.clone()
    B, K = keep.shape
    for b in range(B):
        for i, src in enumerate(keep[b].tolist()):
            if src >= 0:
                kv[:, b, :, i] = source_kv[:, b, :, src]
                pos[b, i] = source_pos[b, src]
                scores[b, i] = source_scores[b, src]
            else:
                pos[b, i] = -1
                scores[b, i] = float("nan")
        pos[b, K:] = -1
        scores[b, K:] = float("nan")
    return kv, pos, scores


def cache_buffer(P, B, H, S, D, dtype, generator, *, layout="slots_inner", spare_slots=11):
    """A random cache buffer with spare capacity past S, as a real cache has; see :func:`kv_view`.

    The whole buffer is compared afterwards, so a stray write anywhere shows up.
    """
    capacity = S + spare_slots
    if layout == "slots_inner":
        shape = (P, B, H, capacity, D)
    else:  # token-major: [B, capacity, P, H, D], slots outside planes and heads
        shape = (B, capacity, P, H, D)
    return torch.randn(shape, generator=generator).to(dtype).to(device())


def kv_view(S, layout="slots_inner"):
    """Function mapping a :func:`cache_buffer` to its kv [P, B, H, S, D] view (never contiguous)."""
    if layout == "slots_inner":
        return lambda buffer: buffer[:, :, :, :S, :]
    return lambda buffer: buffer[:, :S].permute(2, 0, 3, 1, 4)


def slot_metadata(B, S, generator, pos_dtype=torch.int64, strided=False):
    """Distinct positions and random scores; optionally strided views of wider tensors."""
    pos = (torch.arange(S)[None, :] * 3 + torch.arange(B)[:, None] * 1000).to(pos_dtype)
    scores = torch.randn(B, S, generator=generator)
    if strided:
        wide_pos = torch.zeros(B, 2 * S, dtype=pos_dtype)
        wide_scores = torch.zeros(B, 2 * S)
        wide_pos[:, ::2], wide_scores[:, ::2] = pos, scores
        return wide_pos.to(device())[:, ::2], wide_scores.to(device())[:, ::2]
    return pos.to(device()), scores.to(device())


def random_keep(B, S, K, generator, padding=(0,)):
    """Ascending random kept slots, with padding[b] trailing -1 entries per sequence."""
    rows = []
    for b in range(B):
        pad = padding[b % len(padding)]
        chosen = torch.sort(torch.randperm(S, generator=generator)[: K - pad]).values.tolist()
        rows.append(chosen + [-1] * pad)
    return torch.tensor(rows, dtype=torch.int64, device=device())


def clone_keep_strides(x):
    """A copy with x's strides (Tensor.clone makes a strided, non-dense view contiguous)."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


def check_compaction(buffer, kv_view_fn, pos, scores, keep, **launch):
    """Run the Triton op and the twin on copies of the same state; compare both with the reference gather."""
    expected_buffer = buffer.clone()
    expected_view = kv_view_fn(expected_buffer)
    expected_kv, expected_pos, expected_scores = reference_compact(expected_view, pos, scores, keep)
    expected_view.copy_(expected_kv)

    twin_buffer, twin_pos, twin_scores = buffer.clone(), clone_keep_strides(pos), clone_keep_strides(scores)
    naive.compact_slots_(kv_view_fn(twin_buffer), twin_pos, twin_scores, keep)

    kernel_buffer, kernel_pos, kernel_scores = buffer.clone(), clone_keep_strides(pos), clone_keep_strides(scores)
    compact_slots_(kv_view_fn(kernel_buffer), kernel_pos, kernel_scores, keep, **launch)

    K = keep.shape[1]
    assert bool((kernel_pos[:, K:] == -1).all()) and bool(torch.isnan(kernel_scores[:, K:]).all()), "slots >= K not cleared"
    # Copies are exact: compare bit for bit, over the whole buffer.
    assert torch.equal(kernel_buffer, expected_buffer), "kv differs from the reference gather"
    assert torch.equal(kernel_buffer, twin_buffer), "kv differs from the PyTorch twin"
    assert torch.equal(kernel_pos, expected_pos) and torch.equal(kernel_pos, twin_pos), "pos differs"
    torch.testing.assert_close(kernel_scores, expected_scores, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(kernel_scores, twin_scores, rtol=0, atol=0, equal_nan=True)
    return kernel_buffer, kernel_pos, kernel_scores


@pytest.mark.parametrize(
    "dtype, P, D, layout",
    [
        (torch.float32, 6, 8, "slots_inner"),
        (torch.float16, 6, 8, "token_major"),
        (torch.bfloat16, 2, 64, "slots_inner"),
        (torch.float16, 2, 64, "token_major"),
    ],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_compaction_matches_twin_and_gather(dtype, P, D, layout):
    g = torch.Generator().manual_seed(10)
    B, H, S, K = 2, 2, 37, 20
    buffer = cache_buffer(P, B, H, S, D, dtype, g, layout=layout)
    pos, scores = slot_metadata(B, S, g)
    keep = random_keep(B, S, K, g, padding=(0, 3))
    check_compaction(buffer, kv_view(S, layout), pos, scores, keep)


@pytest.mark.parametrize(
    "keep_rows, is_identity",
    [
        pytest.param(lambda S, K: [list(range(S - K, S))] * 2, False, id="newest_slots_overlap_every_block"),
        pytest.param(lambda S, K: [list(range(1, K + 1))] * 2, False, id="shift_by_one"),
        pytest.param(lambda S, K: [list(range(4)) + list(range(S - K + 4, S)), list(range(K))], False, id="prefix_in_place"),
        pytest.param(lambda S, K: [list(range(K))] * 2, True, id="identity_no_op"),
        pytest.param(lambda S, K: [list(range(0, 2 * (K - 3), 2)) + [-1] * 3, [-1] * K], False, id="padding_rows"),
    ],
)
def test_compaction_in_place_overlaps(keep_rows, is_identity):
    """Source and destination ranges overlap (the normal case); the walk order must never read a clobbered slot."""
    g = torch.Generator().manual_seed(11)
    P, B, H, S, K, D = 3, 2, 2, 37, 20, 8
    buffer = cache_buffer(P, B, H, S, D, torch.float32, g)
    pos, scores = slot_metadata(B, S, g, pos_dtype=torch.int32, strided=True)
    keep = torch.tensor(keep_rows(S, K), dtype=torch.int64, device=device())
    # BLOCK_S = 16 < K, so destinations span two blocks whose sources overlap the next block.
    config = next(c for c in COMPACTION_CONFIGS if c.kwargs["BLOCK_S"] == 16)
    kernel_buffer, kernel_pos, kernel_scores = check_compaction(buffer, kv_view(S), pos, scores, keep, config=config)
    if is_identity:
        assert torch.equal(kernel_buffer, buffer), "identity keep must leave kv unchanged"
        assert torch.equal(kernel_pos[:, :K], pos[:, :K])


@pytest.mark.parametrize("config", COMPACTION_CONFIGS, ids=lambda c: f"S{c.kwargs['BLOCK_S']}-D{c.kwargs['BLOCK_D']}-w{c.num_warps}")
def test_every_gpu_config(config):
    g = torch.Generator().manual_seed(12)
    P, B, H, S, K, D = 2, 2, 1, 37, 20, 8
    buffer = cache_buffer(P, B, H, S, D, torch.float16, g)
    pos, scores = slot_metadata(B, S, g)
    keep = random_keep(B, S, K, g, padding=(2, 0))
    check_compaction(buffer, kv_view(S), pos, scores, keep, config=config)


def test_head_dim_spanning_several_blocks():
    """D = 80 with BLOCK_D = 64: two D-blocks per row, the second one masked."""
    g = torch.Generator().manual_seed(13)
    P, B, H, S, K, D = 2, 1, 2, 37, 20, 80
    buffer = cache_buffer(P, B, H, S, D, torch.bfloat16, g)
    pos, scores = slot_metadata(B, S, g)
    keep = random_keep(B, S, K, g)
    config = next(c for c in COMPACTION_CONFIGS if c.kwargs["BLOCK_D"] == 64)
    check_compaction(buffer, kv_view(S), pos, scores, keep, config=config)


def test_keep_as_wide_as_the_cache():
    """K = S: nothing is cleared past K, padding entries still clear their slot's metadata."""
    g = torch.Generator().manual_seed(14)
    P, B, H, S, D = 2, 2, 1, 19, 8
    buffer = cache_buffer(P, B, H, S, D, torch.float32, g)
    pos, scores = slot_metadata(B, S, g)
    keep = random_keep(B, S, S, g, padding=(0, 5))
    check_compaction(buffer, kv_view(S), pos, scores, keep)


# ----------------------------------------------------------------------------
# evict_ end to end
# ----------------------------------------------------------------------------


def test_evict_end_to_end():
    """ops.evict_ (Triton compaction) equals the twin's select + compact, and the cache it leaves is sane."""
    g = torch.Generator().manual_seed(15)
    P, B, H, S, D = 4, 3, 2, 40, 16
    budget, prefix, recent = 18, [4, 2, 9], 5
    buffer = cache_buffer(P, B, H, S, D, torch.float16, g, layout="token_major")
    kv_of = kv_view(S, "token_major")
    scores, pos = selection_inputs(B, S, g, nan_fraction=0.1, left_padding=(0, 7, 30), gaps=True)
    assert ops.backend_for(buffer) == "triton"

    twin_buffer, twin_pos, twin_scores = buffer.clone(), pos.clone(), scores.clone()
    twin_keep = naive.select_slots(twin_scores, twin_pos, budget, protect_prefix=prefix, recent=recent)
    naive.compact_slots_(kv_of(twin_buffer), twin_pos, twin_scores, twin_keep)

    original_pos = pos.clone()
    keep = ops.evict_(kv_of(buffer), pos, scores, budget, protect_prefix=prefix, recent=recent)

    assert torch.equal(keep, twin_keep)
    assert torch.equal(buffer, twin_buffer)
    assert torch.equal(pos, twin_pos)
    torch.testing.assert_close(scores, twin_scores, rtol=0, atol=0, equal_nan=True)
    for b in range(B):
        real = original_pos[b][original_pos[b] >= 0]
        kept = pos[b][pos[b] >= 0]
        assert len(kept) == min(budget, len(real))
        assert bool((kept[1:] > kept[:-1]).all()), "kept tokens stay in stream order"
        must_keep = real[(real < prefix[b]) | (real >= real.max() + 1 - recent)]
        assert set(must_keep.tolist()) <= set(kept.tolist()), "protected tokens were evicted"
        assert bool((pos[b, budget:] == -1).all()) and bool(torch.isnan(scores[b, budget:]).all())


def test_select_slots_accepts_a_device_tensor_of_prefixes():
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(3, 40, generator=generator)
    pos = torch.arange(40).repeat(3, 1)
    prefixes = [2, 9, 5]
    as_list = ops.select_slots(scores, pos, 16, protect_prefix=prefixes, recent=4)
    as_tensor = ops.select_slots(scores, pos, 16, protect_prefix=torch.tensor(prefixes), recent=4)
    assert torch.equal(as_list, as_tensor)
    with pytest.raises(ValueError, match="protect_prefix must have shape"):
        ops.select_slots(scores, pos, 16, protect_prefix=torch.tensor([1, 2]), recent=4)
    with pytest.raises(ValueError, match="protect_prefix must have dtype"):
        ops.select_slots(scores, pos, 16, protect_prefix=torch.tensor([1.0, 2.0, 3.0]), recent=4)
    with pytest.raises(ValueError, match="recent window"):
        ops.select_slots(scores, pos, 3, protect_prefix=torch.tensor(prefixes), recent=4)
