"""Budgeted selection, the compaction plan and in-place hole-filling compaction.

* ``select_slots`` vs a per-sequence full-sort reference written here.
* ``compaction_plan`` vs a per-sequence walk written here, and its bound:
  no more moves than slots released.
* The Triton ``compact_slots_`` vs the PyTorch twin and vs an out-of-place
  copy written here, on caches that are strided views of a bigger buffer,
  so bytes the op must not touch are checked too.
* ``ops.evict_`` end to end.
"""

from __future__ import annotations

import math

import pytest
import torch

from epikv_triton import ops
from epikv_triton.ops import naive, selection
from epikv_triton.ops.compaction import COMPACTION_CONFIGS, compact_slots_, pick_config
from tests.helpers import device

# ----------------------------------------------------------------------------
# select_slots
# ----------------------------------------------------------------------------


def reference_select(scores, pos, budget, protect_prefix, recent):
    """Per sequence, a full sort: protected slots first, then by score descending (NaN lowest),
    ties to the older token (lower position); padding (pos = -1) never kept. Returns [B, S] bool."""
    B, S = scores.shape
    width = min(budget, S)
    prefixes = [protect_prefix] * B if isinstance(protect_prefix, int) else list(protect_prefix)
    rows = []
    for b in range(B):
        positions = pos[b].tolist()
        values = scores[b].tolist()
        seen = max(positions) + 1
        real = [j for j in range(S) if positions[j] >= 0]

        def rank(j, positions=positions, values=values, prefix=prefixes[b], seen=seen):
            protected = positions[j] < prefix or positions[j] >= seen - recent
            is_nan = math.isnan(values[j])
            return (not protected, is_nan, 0.0 if is_nan else -values[j], positions[j])

        kept = set(sorted(real, key=rank)[:width])
        rows.append([j in kept for j in range(S)])
    return torch.tensor(rows, dtype=torch.bool)


def selection_inputs(
    B, S, generator, *, ties=False, signed_zeros=False, nan_fraction=0.0, infinite=False, left_padding=(), gaps=False,
    shuffled=False
):
    """scores with optional ties/NaN/±inf (NaN still ranks below -inf); positions 0.. per sequence after its
    left padding, optionally with gaps (positions of tokens evicted earlier) and shuffled across the slots
    (what hole-filling compaction leaves)."""
    if signed_zeros:
        scores = torch.where(torch.rand(B, S, generator=generator) < 0.5, -0.0, 0.0)
    elif ties:
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
        if shuffled:
            pos[b] = pos[b, torch.randperm(S, generator=generator)]
    return scores.to(device()), pos.to(device())


SELECT_CASES = {
    # name: (B, S, budget, protect_prefix, recent, input options)
    "plain": (2, 30, 12, 4, 3, {}),
    "ties": (3, 25, 10, 2, 2, {"ties": True}),
    "ties_shuffled": (3, 25, 10, 2, 2, {"ties": True, "shuffled": True, "gaps": True}),
    "signed_zeros": (2, 20, 8, 1, 1, {"signed_zeros": True, "shuffled": True}),
    "nan_scores": (2, 25, 15, 1, 2, {"nan_fraction": 0.4}),
    "ties_and_nan": (2, 40, 20, 4, 4, {"ties": True, "nan_fraction": 0.3}),
    "infinite_and_nan": (2, 30, 22, 1, 1, {"infinite": True, "nan_fraction": 0.4}),
    "budget_equals_slots": (2, 16, 16, 4, 4, {}),
    "budget_equals_protected": (2, 30, 7, 4, 3, {"gaps": True}),
    "budget_above_slots": (2, 10, 25, 2, 2, {}),
    "left_padding": (3, 24, 10, 3, 2, {"left_padding": (0, 5, 20), "nan_fraction": 0.2}),
    "padding_shuffled": (3, 24, 10, 3, 2, {"left_padding": (0, 5, 20), "ties": True, "shuffled": True}),
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
    assert keep.dtype == torch.bool
    assert torch.equal(keep.cpu(), expected), f"\nkeep     {keep.int().tolist()}\nexpected {expected.int().tolist()}"


def test_select_slots_keeps_protected_even_when_they_score_lowest():
    scores = torch.tensor([[-9.0, -9.0, 5.0, 4.0, 3.0, 2.0, 1.0, -9.0]], device=device())
    pos = torch.arange(8, device=device())[None]
    keep = ops.select_slots(scores, pos, 4, protect_prefix=2, recent=1)
    assert keep.nonzero()[:, 1].tolist() == [0, 1, 2, 7]


def test_select_slots_ties_keep_the_older_token_wherever_it_sits():
    """Equal scores: the lower position is kept, though it sits in a later slot."""
    scores = torch.zeros(1, 6, device=device())
    pos = torch.tensor([[0, 5, 4, 1, 3, 2]], device=device())
    keep = ops.select_slots(scores, pos, 4, protect_prefix=1, recent=1)
    assert sorted(pos[keep].tolist()) == [0, 1, 2, 5]


def test_select_slots_reserve_keeps_the_largest_values_before_any_score():
    """Slots 2..6 are unprotected; the two with the largest reserve scores (slots 5 and 3) are kept although
    they score lowest, then the best score (slot 2); the protected slots 0, 1 and 7 stay whatever their values."""
    scores = torch.tensor([[0.0, 0.0, 5.0, -3.0, 4.0, -2.0, 3.0, 0.0]], device=device())
    values = torch.tensor([[99.0, 99.0, 1.0, 7.0, 2.0, 8.0, 1.0, 99.0]], device=device())
    pos = torch.arange(8, device=device())[None]
    keep = ops.select_slots(scores, pos, 6, protect_prefix=2, recent=1, reserve=2, reserve_scores=values)
    assert keep.nonzero()[:, 1].tolist() == [0, 1, 2, 3, 5, 7]
    unreserved = ops.select_slots(scores, pos, 6, protect_prefix=2, recent=1)
    assert unreserved.nonzero()[:, 1].tolist() == [0, 1, 2, 4, 6, 7]


def test_select_slots_reserve_ties_keep_the_older_and_never_take_padding():
    """Equal values: the older token, wherever it sits; a reserve larger than the candidates reserves only
    real unprotected slots (padding at position -1 is never kept)."""
    scores = torch.zeros(1, 7, device=device())
    values = torch.tensor([[0.0, 3.0, 3.0, 3.0, 9.0, 0.0, 9.0]], device=device())
    pos = torch.tensor([[0, 4, 2, 3, 1, 5, -1]], device=device())
    keep = ops.select_slots(scores - 1, pos, 4, protect_prefix=1, recent=1, reserve=2, reserve_scores=values)
    assert sorted(pos[keep].tolist()) == [0, 1, 2, 5]  # position 1 (value 9), then 2 before 3 and 4
    keep = ops.select_slots(scores, pos, 6, protect_prefix=1, recent=1, reserve=10, reserve_scores=values)
    assert sorted(pos[keep].tolist()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"reserve": 2}, "needs reserve_scores"),
        ({"reserve": -1, "reserve_scores": torch.zeros(1, 4)}, "reserve must be a non-negative int"),
        ({"reserve": 1, "reserve_scores": torch.zeros(1, 3)}, "reserve_scores must have shape"),
        ({"reserve": 1, "reserve_scores": torch.zeros(1, 4, dtype=torch.int64)}, "reserve_scores"),
    ],
)
def test_select_slots_reserve_rejects_bad_input(settings, message):
    scores, pos = torch.zeros(1, 4), torch.arange(4)[None]
    with pytest.raises(ValueError, match=message):
        ops.select_slots(scores, pos, 3, protect_prefix=1, recent=1, **settings)


# ----------------------------------------------------------------------------
# compaction_plan
# ----------------------------------------------------------------------------


def reference_plan(keep, fill):
    """Per sequence: the i-th kept slot at or above fill goes to the i-th slot below fill that is not kept."""
    rows = []
    for row in keep.tolist():
        holes = [j for j in range(fill) if not row[j]]
        movers = iter(holes)
        rows.append([next(movers) if row[j] else -1 for j in range(fill, len(row))])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(keep[0]) - fill)


def random_keep(B, S, fill, generator, real=None):
    """[B, S] bool with min(fill, real[b]) kept slots per row, anywhere."""
    rows = []
    for b in range(B):
        count = min(fill, S if real is None else real[b])
        chosen = torch.randperm(S, generator=generator)[:count]
        rows.append(torch.zeros(S, dtype=torch.bool).index_fill_(0, chosen, True))
    return torch.stack(rows).to(device())


@pytest.mark.parametrize(
    "B, S, fill, real",
    [(3, 40, 30, None), (2, 17, 16, None), (3, 30, 12, (30, 5, 0)), (2, 9, 9, None), (2, 9, 0, None)],
)
def test_plan_matches_reference_and_moves_at_most_what_it_releases(B, S, fill, real):
    keep = random_keep(B, S, fill, torch.Generator().manual_seed(S + fill), real)
    destination = ops.compaction_plan(keep, fill)
    assert destination.shape == (B, S - fill) and destination.dtype == torch.int64
    assert torch.equal(destination.cpu(), reference_plan(keep.cpu(), fill))
    moved = (destination >= 0).sum(dim=1)
    assert bool((moved <= S - fill).all())
    assert bool((moved <= (~keep[:, :fill]).sum(dim=1)).all()), "more movers than holes"


def test_plan_moves_nothing_when_the_released_slots_are_the_dropped_ones():
    keep = torch.ones(2, 12, dtype=torch.bool, device=device())
    keep[:, 8:] = False
    assert bool((ops.compaction_plan(keep, 8) == -1).all())


def test_plan_rejects_bad_input():
    keep = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep must have dtype"):
        ops.compaction_plan(keep.long(), 8)
    with pytest.raises(ValueError, match="fill must be an int in"):
        ops.compaction_plan(keep, 13)


# ----------------------------------------------------------------------------
# compact_slots_
# ----------------------------------------------------------------------------


def reference_compact(kv, pos, scores, destination):
    """Out-of-place: what kv/pos/scores must hold afterwards (kv bytes of released slots untouched)."""
    kv, pos, scores = kv.clone(), pos.clone(), scores.clone()
    source_kv, source_pos, source_scores = kv.clone(), pos.clone(), scores.clone()
    B, W = destination.shape
    fill = pos.shape[1] - W
    for b in range(B):
        for j, dest in enumerate(destination[b].tolist()):
            if dest >= 0:
                kv[:, b, :, dest] = source_kv[:, b, :, fill + j]
                pos[b, dest] = source_pos[b, fill + j]
                scores[b, dest] = source_scores[b, fill + j]
        pos[b, fill:] = -1
        scores[b, fill:] = float("nan")
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


def random_destination(B, S, fill, generator, real=None):
    """The plan of a random keep mask: a realistic, sync-free-built destination [B, S - fill]."""
    return selection.compaction_plan(random_keep(B, S, fill, generator, real), fill)


def clone_keep_strides(x):
    """A copy with x's strides (Tensor.clone makes a strided, non-dense view contiguous)."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


def check_compaction(buffer, kv_view_fn, pos, scores, destination, **launch):
    """Run the Triton op and the twin on copies of the same state; compare both with the reference."""
    expected_buffer = buffer.clone()
    expected_view = kv_view_fn(expected_buffer)
    expected_kv, expected_pos, expected_scores = reference_compact(expected_view, pos, scores, destination)
    expected_view.copy_(expected_kv)

    twin_buffer, twin_pos, twin_scores = buffer.clone(), clone_keep_strides(pos), clone_keep_strides(scores)
    naive.compact_slots_(kv_view_fn(twin_buffer), twin_pos, twin_scores, destination)

    kernel_buffer, kernel_pos, kernel_scores = buffer.clone(), clone_keep_strides(pos), clone_keep_strides(scores)
    compact_slots_(kv_view_fn(kernel_buffer), kernel_pos, kernel_scores, destination, **launch)

    fill = pos.shape[1] - destination.shape[1]
    assert bool((kernel_pos[:, fill:] == -1).all()) and bool(torch.isnan(kernel_scores[:, fill:]).all()), (
        "released slots not cleared"
    )
    # Copies are exact: compare bit for bit, over the whole buffer.
    assert torch.equal(kernel_buffer, expected_buffer), "kv differs from the reference"
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
def test_compaction_matches_twin_and_reference(dtype, P, D, layout):
    g = torch.Generator().manual_seed(10)
    B, H, S, fill = 2, 2, 37, 20
    buffer = cache_buffer(P, B, H, S, D, dtype, g, layout=layout)
    pos, scores = slot_metadata(B, S, g)
    destination = random_destination(B, S, fill, g, real=(S, 15))
    check_compaction(buffer, kv_view(S, layout), pos, scores, destination)


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(lambda S, fill: [[j for j in range(S - fill)]] * 2, id="every_released_slot_moves"),
        pytest.param(lambda S, fill: [[-1] * (S - fill)] * 2, id="nothing_moves"),
        pytest.param(lambda S, fill: [[fill - 1 - j if j % 3 else -1 for j in range(S - fill)], [-1] * (S - fill)],
                     id="reversed_with_drops"),
    ],
)
def test_compaction_of_several_blocks_of_released_slots(plan):
    """W = 37 released slots with BLOCK_S = 16: three blocks, the last one masked."""
    g = torch.Generator().manual_seed(11)
    P, B, H, S, fill, D = 3, 2, 1, 77, 40, 8
    buffer = cache_buffer(P, B, H, S, D, torch.float32, g)
    pos, scores = slot_metadata(B, S, g, pos_dtype=torch.int32, strided=True)
    destination = torch.tensor(plan(S, fill), dtype=torch.int64, device=device())
    config = next(c for c in COMPACTION_CONFIGS if c.kwargs["BLOCK_S"] == 16)
    kernel_buffer, _, _ = check_compaction(buffer, kv_view(S), pos, scores, destination, config=config)
    if not bool((destination >= 0).any()):
        assert torch.equal(kernel_buffer, buffer), "a plan without moves must leave kv unchanged"


@pytest.mark.parametrize(
    "config", COMPACTION_CONFIGS, ids=lambda c: f"S{c.kwargs['BLOCK_S']}-D{c.kwargs['BLOCK_D']}-w{c.num_warps}"
)
def test_every_gpu_config(config):
    g = torch.Generator().manual_seed(12)
    P, B, H, S, fill, D = 2, 2, 1, 37, 20, 8
    buffer = cache_buffer(P, B, H, S, D, torch.float16, g)
    pos, scores = slot_metadata(B, S, g)
    destination = random_destination(B, S, fill, g)
    check_compaction(buffer, kv_view(S), pos, scores, destination, config=config)


def test_head_dim_spanning_several_blocks():
    """D = 80 with BLOCK_D = 64: two D-blocks per row, the second one masked."""
    g = torch.Generator().manual_seed(13)
    P, B, H, S, fill, D = 2, 1, 2, 37, 30, 80
    buffer = cache_buffer(P, B, H, S, D, torch.bfloat16, g)
    pos, scores = slot_metadata(B, S, g)
    destination = random_destination(B, S, fill, g)
    config = next(c for c in COMPACTION_CONFIGS if c.kwargs["BLOCK_D"] == 64)
    check_compaction(buffer, kv_view(S), pos, scores, destination, config=config)


def test_destination_outside_the_free_slots_drops_its_slot():
    """Destinations are not checked (a host sync). One past S (outside the view) or onto a released
    slot (a source still to be read) drops its slot, as -1 does: the result is the reference's with -1
    there, and no byte of the buffers around the views changes."""
    g = torch.Generator().manual_seed(15)
    P, B, H, S, fill, D, spare = 2, 2, 2, 20, 12, 8, 4
    buffer = cache_buffer(P, B, H, S, D, torch.float32, g)
    wide_pos, wide_scores = slot_metadata(B, S + spare, g)
    pos, scores = wide_pos[:, :S], wide_scores[:, :S]
    destination = torch.tensor(
        [[0, S + 1, 2, -1, 5, -1, -1, 7], [fill, 1, -1, S - 1, 4, -1, 6, -1]], device=device()
    )
    dropped = torch.where(destination < fill, destination, -1)

    expected_buffer, expected_wide_pos, expected_wide_scores = buffer.clone(), wide_pos.clone(), wide_scores.clone()
    expected_kv, expected_pos, expected_scores = reference_compact(kv_view(S)(buffer), pos, scores, dropped)
    kv_view(S)(expected_buffer).copy_(expected_kv)
    expected_wide_pos[:, :S], expected_wide_scores[:, :S] = expected_pos, expected_scores

    compact_slots_(kv_view(S)(buffer), pos, scores, destination)
    assert torch.equal(buffer, expected_buffer)
    assert torch.equal(wide_pos, expected_wide_pos)
    torch.testing.assert_close(wide_scores, expected_wide_scores, rtol=0, atol=0, equal_nan=True)


def test_no_released_slot_is_a_no_op():
    g = torch.Generator().manual_seed(14)
    buffer = cache_buffer(2, 2, 1, 19, 8, torch.float32, g)
    pos, scores = slot_metadata(2, 19, g)
    check_compaction(buffer, kv_view(19), pos, scores, torch.empty(2, 0, dtype=torch.int64, device=device()))


@pytest.mark.parametrize("width, head_dim, block_s, block_d", [(1, 64, 16, 64), (16, 128, 16, 128), (17, 128, 32, 128),
                                                                 (500, 256, 64, 128), (3, 80, 16, 128)])
def test_config_follows_the_released_slots_and_head_dim(width, head_dim, block_s, block_d):
    config = pick_config(width, head_dim)
    assert config in COMPACTION_CONFIGS
    assert (config.kwargs["BLOCK_S"], config.kwargs["BLOCK_D"]) == (block_s, block_d)


# ----------------------------------------------------------------------------
# evict_ end to end
# ----------------------------------------------------------------------------


def test_evict_end_to_end():
    """ops.evict_ (Triton compaction) equals the twins' select + plan + compact, and leaves a sane cache."""
    g = torch.Generator().manual_seed(15)
    P, B, H, S, D = 4, 3, 2, 40, 16
    budget, prefix, recent = 18, [4, 2, 9], 5
    buffer = cache_buffer(P, B, H, S, D, torch.float16, g, layout="token_major")
    kv_of = kv_view(S, "token_major")
    scores, pos = selection_inputs(B, S, g, nan_fraction=0.1, left_padding=(0, 7, 30), gaps=True, shuffled=True)
    assert ops.backend_for(buffer) == "triton"

    twin_buffer, twin_pos, twin_scores = buffer.clone(), pos.clone(), scores.clone()
    twin_keep = selection.select_slots(twin_scores, twin_pos, budget, protect_prefix=prefix, recent=recent)
    twin_destination = selection.compaction_plan(twin_keep, budget)
    naive.compact_slots_(kv_of(twin_buffer), twin_pos, twin_scores, twin_destination)

    original_pos = pos.clone()
    destination = ops.evict_(kv_of(buffer), pos, scores, budget, protect_prefix=prefix, recent=recent)

    assert torch.equal(destination, twin_destination)
    assert torch.equal(buffer, twin_buffer)
    assert torch.equal(pos, twin_pos)
    torch.testing.assert_close(scores, twin_scores, rtol=0, atol=0, equal_nan=True)
    for b in range(B):
        real = original_pos[b][original_pos[b] >= 0]
        kept = pos[b][pos[b] >= 0]
        assert len(kept) == min(budget, len(real))
        assert int((destination[b] >= 0).sum()) <= S - budget
        must_keep = real[(real < prefix[b]) | (real >= real.max() + 1 - recent)]
        assert set(must_keep.tolist()) <= set(kept.tolist()), "protected tokens were evicted"
        assert bool((pos[b, budget:] == -1).all()) and bool(torch.isnan(scores[b, budget:]).all())
        # Every kept token's K/V travelled with its position.
        for slot in range(budget):
            if pos[b, slot] >= 0:
                source = int((original_pos[b] == pos[b, slot]).nonzero())
                assert torch.equal(kv_of(buffer)[:, b, :, slot], kv_of(twin_buffer)[:, b, :, slot])
                assert source >= budget or source == slot, "a slot below the fill moved"


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
