"""Scorers driven chunk by chunk, against per-token references written here in float64.

Chunks of uneven length, some spanning several lag chunks, one sequence
left-padded: the O(T) segment arithmetic must give every token the score of
the plain per-token definition.
"""

from __future__ import annotations

import pytest
import torch

from epikv_triton.scoring import AttentionView, ChunkInfo, base
from epikv_triton.scoring.bands import BandScorer
from epikv_triton.scoring.baselines import KeyNormScorer
from epikv_triton.scoring.lag_kv import LagKVScorer
from tests.helpers import shuffle_slots

LAG_CHUNK = 8
CHUNK_SIZES = (37, 5, 1, 1, 19, 3, 8)
PADDING = (0, 4)  # left padding of each sequence in the first chunk
LAYERS, HEADS, HEAD_DIM, HIDDEN = 2, 2, 6, 12


def chunks(sizes=CHUNK_SIZES, padding=PADDING):
    """ChunkInfo of each forward chunk, positions counted from each sequence's first real token."""
    seen = [0] * len(padding)
    last_valid = torch.zeros(len(padding), dtype=torch.bool)
    for index, size in enumerate(sizes):
        positions = torch.full((len(padding), size), -1, dtype=torch.int64)
        for b, pad in enumerate(padding):
            skip = pad if index == 0 else 0
            positions[b, skip:] = torch.arange(seen[b], seen[b] + size - skip)
            seen[b] += size - skip
        valid = positions >= 0
        before = torch.cat([last_valid[:, None], valid[:, :-1]], dim=1)
        last_valid = valid[:, -1]
        yield ChunkInfo(positions, valid, valid & before)


def reference_lag_kv(keys, values, padding):
    """Per token, per the definition: the spread of k and v normalised by the previous lag chunk's range."""
    B = keys[0].shape[0]
    scores = []
    for b in range(B):
        per_layer = []
        for layer in range(len(keys)):
            spread = 0
            for x in (keys[layer][b, :, padding[b] :], values[layer][b, :, padding[b] :]):  # [H, n, D]
                x = x.double()
                std = torch.empty(x.shape[:2], dtype=torch.float64)
                for t in range(x.shape[1]):
                    c = t // LAG_CHUNK
                    if c == 0:
                        std[:, t] = x[:, t].std(dim=-1, unbiased=False)
                    else:
                        previous = x[:, (c - 1) * LAG_CHUNK : c * LAG_CHUNK]
                        lo, hi = previous.amin(dim=1), previous.amax(dim=1)
                        std[:, t] = ((x[:, t] - lo) / (hi - lo + 1e-9)).std(dim=-1, unbiased=False)
                spread = spread + std
            per_layer.append(spread.mean(dim=0))
        scores.append(torch.stack(per_layer).mean(dim=0))
    return scores


@pytest.mark.parametrize("slice_elements", [base.TEMPORARY_SLICE_ELEMENTS, 2 * 2 * HEADS * HEAD_DIM * 5 + 1])
def test_lag_kv_matches_the_per_token_definition(monkeypatch, slice_elements):
    """One slice per chunk, or slices of 5 tokens that cut through lag chunks."""
    monkeypatch.setattr(base, "TEMPORARY_SLICE_ELEMENTS", slice_elements)
    g = torch.Generator().manual_seed(0)
    total = sum(CHUNK_SIZES)
    keys = [torch.randn(len(PADDING), HEADS, total, HEAD_DIM, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(len(PADDING), HEADS, total, HEAD_DIM, generator=g) for _ in range(LAYERS)]
    scorer = LagKVScorer(LAYERS, LAG_CHUNK)
    start, got = 0, []
    for chunk in chunks():
        T = chunk.positions.shape[1]
        scorer.begin_chunk(chunk)
        for layer in range(LAYERS):
            # Every slot so far, shuffled: the scorer must find the chunk's tokens by their query slots.
            seen = keys[layer][:, :, : start + T], values[layer][:, :, : start + T]
            pos, k, v, slot_of = shuffle_slots(torch.arange(start + T).repeat(len(PADDING), 1), *seen)
            view = AttentionView(None, k, v, pos, slot_of[:, start:], None, None, None)
            scorer.observe_attention(layer, view)
        got.append(scorer.finish_chunk())
        start += T
    got = torch.cat(got, dim=1)
    for b, expected in enumerate(reference_lag_kv(keys, values, PADDING)):
        torch.testing.assert_close(got[b, PADDING[b] :].double(), expected, rtol=1e-5, atol=1e-5)
        assert bool((got[b, : PADDING[b]] == 0).all()), "padding must score 0"


def test_key_norm_reads_the_new_tokens_by_slot():
    """knorm scores minus the mean key norm of each new token, found at its query slot among shuffled slots."""
    g = torch.Generator().manual_seed(1)
    B, C, T = 2, 9, 4
    keys = torch.randn(B, HEADS, C + T, HEAD_DIM, generator=g)
    positions = torch.arange(C, C + T).repeat(B, 1)
    valid = torch.ones(B, T, dtype=torch.bool)
    pos, shuffled, slot_of = shuffle_slots(torch.arange(C + T).repeat(B, 1), keys, empty_slots=3)
    scorer = KeyNormScorer(LAYERS)
    scorer.begin_chunk(ChunkInfo(positions, valid, valid))
    for layer in range(LAYERS):
        scorer.observe_attention(layer, AttentionView(None, shuffled, shuffled, pos, slot_of[:, C:], None, None, None))
    expected = -keys[:, :, C:].norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(scorer.finish_chunk(), expected)


@pytest.mark.parametrize("slice_elements", [base.TEMPORARY_SLICE_ELEMENTS, 2 * 2 * HIDDEN + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_band_step_norms_match_float64_in_slices(monkeypatch, slice_elements, dtype):
    """The residual-stream step norms, one slice or several slices per chunk, in the model dtype."""
    monkeypatch.setattr(base, "TEMPORARY_SLICE_ELEMENTS", slice_elements)
    g = torch.Generator().manual_seed(1)
    total = sum(CHUNK_SIZES)
    hidden = (torch.randn(2, total, HIDDEN, generator=g) * 4).to(dtype)
    scorer = BandScorer(((0,), (1,)), (1.0, 1.0), window=16, source="hidden")
    start, got = 0, []
    for chunk in chunks(padding=(0, 0)):
        T = chunk.positions.shape[1]
        scorer.begin_chunk(chunk)
        scorer.observe_hidden(0, hidden[:, start : start + T])
        got.append(scorer.band_values[:, 0].clone())
        start += T
    got = torch.cat(got, dim=1)
    h = hidden.double()
    expected = torch.linalg.vector_norm(h[:, 1:] - h[:, :-1], dim=-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:, 1:].double(), expected, rtol=1e-5, atol=1e-5)
    assert bool((got[:, 0] == 0).all()), "the stream's first token has no predecessor"
