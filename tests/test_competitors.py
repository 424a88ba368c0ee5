"""The competitors (``keydiff``, ``tova``, ``snapkv``, ``rkv``) against their definitions, written here in float64.

The references materialise what the scorers avoid: the softmax attention matrix, the pooling as a search over
positions, and R-KV's pairwise cosine-similarity matrix. Slots are shuffled, with empty slots, a left-padded
sequence, grouped-query heads, a sliding window, and a whole-buffer layout whose slots past ``slot_count`` hold
stale positions (a compiled step's view).
"""

from __future__ import annotations

import pytest
import torch

from epikv_triton import ops
from epikv_triton.config import EpiKVConfig
from epikv_triton.scoring import AttentionView, ChunkInfo, base, make_scorer
from epikv_triton.scoring import observation_window as window_scorers
from epikv_triton.store import SlotStore
from tests.helpers import buffer_in_use, cache_positions, prefill_positions, shuffle_slots

LAYERS, KV_HEADS, QUERY_HEADS, DIM = 2, 2, 4, 16
# name -> (window, pooling radius, importance weight λ or None): the registered defaults, restated.
WINDOW_METHODS = {"tova": (1, 0, None), "snapkv": (32, 3, None), "rkv": (8, 3, 0.1)}


# ----------------------------------------------------------------------------- references (float64)
def reference_probabilities(q, k, pos, query_slots, window):
    """``[B, Hq, T, S]`` softmax attention of each query over the slots it sees, 0 where it sees nothing."""
    Hq, D = q.shape[1], q.shape[3]
    k = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    logits = q.double() @ k.transpose(-1, -2) * D**-0.5
    pos_q = pos.gather(1, query_slots)[:, :, None]
    pos_k = pos[:, None, :]
    visible = (pos_k >= 0) & (pos_q >= 0) & (pos_k <= pos_q)
    if window is not None:
        visible &= pos_q - pos_k < window
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def reference_pool(scores, pos, radius):
    """Per slot in use: the largest score among the slots in use at most ``radius`` positions away."""
    pooled = scores.clone()
    for b in range(pos.shape[0]):
        for j in range(pos.shape[1]):
            if pos[b, j] >= 0:
                near = (pos[b] >= 0) & ((pos[b] - pos[b, j]).abs() <= radius)
                pooled[b, :, j] = scores[b][:, near].max(dim=-1).values
    return pooled


def reference_window_attention(q, k, pos, query_slots, window, w, radius):
    """``[B, Hkv, S]``: the last ``w`` queries' attention, mean over the real ones and each group's heads, pooled."""
    T = q.shape[2]
    w = min(w, T)
    probs = reference_probabilities(q, k, pos, query_slots, window)[:, :, T - w :]  # [B, Hq, w, S]
    real = pos.gather(1, query_slots)[:, T - w :] >= 0  # [B, w]
    mean_over_window = probs.sum(dim=2) / real.sum(dim=1).clamp(min=1)[:, None, None]
    per_kv_head = mean_over_window.unflatten(1, (k.shape[1], -1)).mean(dim=2)
    return reference_pool(per_kv_head, pos, radius)


def reference_unit_cosines(k, in_use):
    """``[B, H, S, S]`` cosine similarity of every pair of keys; 0 on pairs with a slot not in use."""
    unit = k.double() / k.double().norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(-1, -2)
    return cos * (in_use[:, None, :, None] & in_use[:, None, None, :])


def reference_redundancy(k, in_use):
    """R-KV's redundancy: the pairwise cosines with the diagonal zeroed, averaged over the ``n`` keys in use,
    softmax over the keys in use."""
    cos = reference_unit_cosines(k, in_use)
    cos = cos.masked_fill(torch.eye(cos.shape[-1], dtype=torch.bool), 0.0)
    mean_to_others = cos.sum(dim=-1) / in_use.sum(dim=1)[:, None, None]
    return torch.softmax(mean_to_others.masked_fill(~in_use[:, None], float("-inf")), dim=-1)


def reference_keydiff(k, in_use):
    """Minus the cosine of each key to the mean of the unit keys in use, mean over heads."""
    unit = k.double() / k.double().norm(dim=-1, keepdim=True)
    anchor = (unit * in_use[:, None, :, None]).sum(dim=2) / in_use.sum(dim=1)[:, None, None]
    cosine = (k.double() @ anchor[..., None]).squeeze(-1) / (k.double().norm(dim=-1) * anchor.norm(dim=-1)[..., None])
    return -cosine.mean(dim=1)


def reference_scores(method, layers, pos, query_slots, window=None):
    """``[B, S]``: the method's slot scores, mean over layers; NaN for a slot not in use."""
    in_use = pos >= 0
    total = 0
    for q, k in layers:
        if method == "keydiff":
            total = total + reference_keydiff(k, in_use)
            continue
        w, radius, mix = WINDOW_METHODS[method]
        importance = reference_window_attention(q, k, pos, query_slots, window, w, radius)
        per_head = importance if mix is None else mix * importance - (1 - mix) * reference_redundancy(k, in_use)
        total = total + per_head.mean(dim=1)
    return torch.where(in_use, total / len(layers), float("nan"))


# ----------------------------------------------------------------------------- scorers fed views
def layouts():
    """``(pos, query_slots, slot_count, window)`` of one chunk; ``pos`` is what the scorer sees (for the
    whole-buffer layout, stale past ``slot_count``)."""
    torch.manual_seed(5)
    for C, T, window, empty in [(0, 40, None, 0), (30, 9, None, 7), (30, 1, None, 5), (24, 12, 6, 4)]:
        pos = cache_positions(2, C, T, seen=50, holes=3, pad=(0, 5)) if C else prefill_positions(2, T, pad=(0, 9))
        pos, slot_of = shuffle_slots(pos, empty_slots=empty)
        yield pytest.param(pos, slot_of[:, -T:], None, window, id=f"C{C}-T{T}-w{window}")
    pos, query_slots, slot_count = buffer_in_use([33, 20], capacity=40, T=3, seen=45)
    yield pytest.param(pos, query_slots, slot_count, None, id="whole-buffer")


def drive(scorer, pos, query_slots, slot_count, window, seed=0):
    """One chunk through ``scorer`` over random per-layer queries and keys; returns the per-layer
    ``(q, k)`` and the summed ``observe_attention`` results (what the store stores)."""
    g = torch.Generator().manual_seed(seed)
    B, S = pos.shape
    T = query_slots.shape[1]
    positions = pos.gather(1, query_slots)
    valid = positions >= 0
    scorer.begin_chunk(ChunkInfo(positions, valid, valid))
    layers, total = [], 0
    for layer in range(LAYERS):
        q = torch.randn(B, QUERY_HEADS, T, DIM, generator=g)
        k = torch.randn(B, KV_HEADS, S, DIM, generator=g)
        v = torch.randn(B, KV_HEADS, S, DIM, generator=g)
        result = ops.slot_attention(
            q, k, v, pos, query_slots=query_slots, window=window, with_deltas=False, return_lse=True,
            slot_count=slot_count,
        )
        view = AttentionView(q, k, v, pos, query_slots, None, window, result, slot_count)
        total = total + scorer.observe_attention(layer, view)
        layers.append((q, k))
    assert scorer.finish_chunk() is None, "a rescoring method leaves the new tokens' scores to the slots' scores"
    return layers, total


# The attention-reading methods through the column-sum kernel (the interpreter without a GPU) and its twin.
METHOD_BACKENDS = [("keydiff", "torch")]
METHOD_BACKENDS += [(method, backend) for method in WINDOW_METHODS for backend in ("torch", "triton")]


@pytest.mark.parametrize("method, backend", METHOD_BACKENDS, ids=[f"{m}-{b}" for m, b in METHOD_BACKENDS])
@pytest.mark.parametrize("pos, query_slots, slot_count, window", list(layouts()))
def test_slot_scores_match_the_definition(monkeypatch, method, backend, pos, query_slots, slot_count, window):
    monkeypatch.setenv("EPIKV_BACKEND", backend)
    scorer = make_scorer(EpiKVConfig(method=method), LAYERS)
    assert scorer.rescores_slots
    layers, got = drive(scorer, pos, query_slots, slot_count, window)
    seen = pos if slot_count is None else torch.where(torch.arange(pos.shape[1]) < slot_count[:, None], pos, -1)
    expected = reference_scores(method, layers, seen, query_slots, window)
    assert bool((torch.isnan(got) == torch.isnan(expected)).all()), "exactly the slots not in use are NaN"
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_keydiff_slices_its_float32_work(monkeypatch):
    """Slices of 5 slots give the one-slice scores: the mean unit key adds up across slices."""
    pos, query_slots, slot_count, window = next(iter(layouts())).values
    _, whole = drive(make_scorer(EpiKVConfig(method="keydiff"), LAYERS), pos, query_slots, slot_count, window)
    monkeypatch.setattr(base, "TEMPORARY_SLICE_ELEMENTS", 2 * KV_HEADS * DIM * 5)
    _, sliced = drive(make_scorer(EpiKVConfig(method="keydiff"), LAYERS), pos, query_slots, slot_count, window)
    torch.testing.assert_close(sliced, whole, equal_nan=True)


def test_pooling_is_by_position_not_by_slot_or_rank():
    """Positions with gaps (evicted tokens): a slot two ranks away but four positions away is no neighbour."""
    pos = torch.tensor([[9, -1, 0, 4, 1, 20, 5, -1]])
    scores = torch.tensor([[[1.0, 50.0, 2.0, 3.0, 7.0, 6.0, 0.5, 60.0]]])
    pooled = window_scorers.max_pool(scores, window_scorers.positional_neighbours(pos, radius=1))
    # 0~1 (7), 4~5 (3), 9 and 20 alone; empty slots keep their values.
    assert pooled.tolist() == [[[1.0, 50.0, 7.0, 3.0, 7.0, 6.0, 3.0, 60.0]]]
    torch.manual_seed(0)
    pos = torch.stack([torch.randperm(200)[:60] for _ in range(3)])
    pos[1, :7] = -1
    scores = torch.randn(3, 2, 60)
    for radius in (1, 3, 6):
        pooled = window_scorers.max_pool(scores, window_scorers.positional_neighbours(pos, radius))
        torch.testing.assert_close(pooled, reference_pool(scores, pos, radius))


def test_window_settings_are_validated():
    with pytest.raises(ValueError, match="odd pool_kernel"):
        window_scorers.ObservationWindowScorer(LAYERS, window=8, pool_kernel=4)
    with pytest.raises(ValueError, match="window >= 1"):
        window_scorers.ObservationWindowScorer(LAYERS, window=0, pool_kernel=1)
    with pytest.raises(ValueError, match=r"λ must lie in \[0, 1\]"):
        window_scorers.RedundancyAwareScorer(LAYERS, window=8, pool_kernel=7, mix=1.5)


# ----------------------------------------------------------------------------- through the slot store
BUDGET, RECENT, SINK = 14, 3, 2


@pytest.mark.parametrize("method", ["keydiff", "tova", "snapkv", "rkv"])
def test_the_store_keeps_the_top_rescored_slots_after_every_chunk(monkeypatch, method):
    """Chunks of several lengths, one sequence left-padded, evicting at most chunks: after each chunk the kept
    set is the protected tokens plus the best of the rest by the method's scores over every token held during
    that chunk, the scores of that chunk alone (an accumulated score would pick others)."""
    monkeypatch.setenv("EPIKV_BACKEND", "torch")
    config = EpiKVConfig(method=method, budget=BUDGET, recent=RECENT, sink=SINK, keep_prompt=False, evict_every=2)
    store = SlotStore(config, LAYERS)
    g = torch.Generator().manual_seed(7)
    evictions = 0
    for index, T in enumerate([9, 1, 1, 6, 1, 3, 1, 1, 5, 1]):
        mask = torch.ones(2, T, dtype=torch.long)
        if index == 0:
            mask[1, :4] = 0
        positions = store.next_positions(2, T, mask)
        store.begin_chunk(positions)
        layers = []
        for layer in range(LAYERS):
            key, value = torch.randn(2, 2, KV_HEADS, T, DIM, generator=g)
            query = torch.randn(2, QUERY_HEADS, T, DIM, generator=g)
            keys, values = store.write(layer, key, value)
            store.attend(layer, query, keys, values, scale=None, window=None)
            layers.append((query, keys.clone()))
        pos = store.buffers.pos[:, : keys.shape[2]].clone()
        query_slots = store.chunk.query_slots
        scores = reference_scores(method, layers, pos, query_slots)
        before = store.stats().eviction_passes
        store.end_chunk()
        evicted = store.stats().eviction_passes > before
        evictions += evicted
        assert store.kept_positions() == expected_kept(pos, scores, evicted), f"chunk {index}"
    assert evictions >= 4


def expected_kept(pos, scores, evicted):
    """Sorted kept positions per sequence: everything, or the sink, the recent window and the best of the rest."""
    kept = []
    for b in range(pos.shape[0]):
        real = pos[b] >= 0
        positions, row_scores = pos[b][real], scores[b][real]
        if not evicted or len(positions) <= BUDGET:
            kept.append(sorted(positions.tolist()))
            continue
        seen = int(positions.max()) + 1
        protected = (positions < SINK) | (positions >= seen - RECENT)
        rest = (~protected).nonzero().squeeze(1)
        best = rest[row_scores[rest].argsort(descending=True)[: BUDGET - int(protected.sum())]]
        kept.append(sorted(positions[protected].tolist() + positions[best].tolist()))
    return kept
