"""Kernel-level use, the way an inference engine would drive it: no transformers.

A tiny multi-layer attention model decodes with a bounded slot cache. Every
step writes the new K/V into preallocated slots, runs ``ops.slot_attention``
over the whole buffer, naming the new tokens' slots (it also emits the
key/value delta norms), turns the per-layer deltas into
band values, scores them with ``ops.rolling_zscore`` and, past the budget,
compacts every layer at once with ``ops.evict_``. The loop on the kernels must
match the same loop on the PyTorch twins.
"""

import pytest
import torch

from epikv_triton import ops

from ..helpers import device

LAYERS, BATCH, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 4, 2, 16, 61
BUDGET, EVICT_EVERY, SINK, RECENT, WINDOW = 12, 3, 2, 4, 8
PROMPT, PADDING, STEPS = 9, 3, 14


def build_weights(generator):
    hidden = Q_HEADS * HEAD_DIM

    def rand(*shape):
        return torch.randn(*shape, generator=generator) / shape[0] ** 0.5

    return {
        "embed": torch.randn(VOCAB, hidden, generator=generator),
        "unembed": rand(hidden, VOCAB),
        "layers": [
            {"q": rand(hidden, hidden), "k": rand(hidden, KV_HEADS * HEAD_DIM),
             "v": rand(hidden, KV_HEADS * HEAD_DIM), "o": rand(hidden, hidden)}
            for _ in range(LAYERS)
        ],
    }


def heads(x, count):
    B, T, _ = x.shape
    return x.view(B, T, count, HEAD_DIM).transpose(1, 2)


def run_engine(weights, dev, static_shapes=True):
    """Greedy decoding with eviction; returns per-step tokens, logits and slot positions.

    ``static_shapes``: every step attends over the whole capacity, the slots
    past the fill empty (position -1, stale K/V after a compaction), the new
    tokens named by their slots; otherwise over the slots in use, the new
    tokens last (the default ``query_slots``).
    """
    capacity = BUDGET + EVICT_EVERY
    kv = torch.zeros(2, LAYERS, BATCH, KV_HEADS, capacity, HEAD_DIM, device=dev)
    planes = kv.view(2 * LAYERS, BATCH, KV_HEADS, capacity, HEAD_DIM)
    pos = torch.full((BATCH, capacity), -1, dtype=torch.int64, device=dev)
    scores = torch.full((BATCH, capacity), float("nan"), device=dev)
    ring = torch.zeros(BATCH, LAYERS, 5, device=dev)
    count = torch.zeros(BATCH, LAYERS, dtype=torch.int64, device=dev)
    band_weights = torch.tensor([1.29, -1.0], device=dev)
    prev_k = prev_v = [None] * LAYERS
    w = {"embed": weights["embed"].to(dev), "unembed": weights["unembed"].to(dev),
         "layers": [{n: t.to(dev) for n, t in layer.items()} for layer in weights["layers"]]}

    tokens = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1)).to(dev)
    new_pos = torch.arange(PROMPT, device=dev).repeat(BATCH, 1)
    new_pos[1] -= PADDING
    new_pos[1, :PADDING] = -1  # left padding of the second sequence
    seen = new_pos.max(dim=1).values + 1
    fill, history = 0, []
    for _ in range(STEPS):
        T = tokens.shape[1]
        slots = torch.arange(fill, fill + T, device=dev).expand(BATCH, T)
        pos[:, fill : fill + T] = new_pos
        x = w["embed"][tokens]
        layer_signal = []
        for layer, lw in enumerate(w["layers"]):
            q = heads(x @ lw["q"], Q_HEADS)
            kv[0, layer, :, :, fill : fill + T] = heads(x @ lw["k"], KV_HEADS)
            kv[1, layer, :, :, fill : fill + T] = heads(x @ lw["v"], KV_HEADS)
            used = capacity if static_shapes else fill + T
            result = ops.slot_attention(
                q, kv[0, layer, :, :, :used], kv[1, layer, :, :, :used], pos[:, :used],
                query_slots=slots if static_shapes else None, window=WINDOW if layer == 1 else None,
                prev_k=prev_k[layer], prev_v=prev_v[layer],
            )
            last = fill + T - 1
            prev_k[layer], prev_v[layer] = kv[0, layer, :, :, last].clone(), kv[1, layer, :, :, last].clone()
            x = x + result.out.transpose(1, 2).reshape(x.shape) @ lw["o"]
            layer_signal.append((result.dk + result.dv).mean(dim=1))
        band_values = torch.stack(layer_signal, dim=1)
        band_values = band_values.masked_fill((new_pos < 1)[:, None], float("nan"))
        scores[:, fill : fill + T] = ops.rolling_zscore(band_values, ring, count, band_weights)
        fill += T
        assert fill <= capacity
        if fill > BUDGET + EVICT_EVERY - 1:  # the cadence: compact once every EVICT_EVERY steps
            ops.evict_(planes[..., :fill, :], pos[:, :fill], scores[:, :fill], BUDGET,
                       protect_prefix=SINK, recent=RECENT)
            fill = BUDGET
        logits = x[:, -1] @ w["unembed"]
        tokens = logits.argmax(dim=-1, keepdim=True)
        new_pos, seen = seen[:, None].clone(), seen + 1
        history.append((tokens.cpu(), logits.cpu(), pos[:, :fill].cpu().clone(), fill))
    return history


def test_engine_loop_on_kernels_matches_twins(monkeypatch):
    weights = build_weights(torch.Generator().manual_seed(0))
    dev = device()
    on_kernels = run_engine(weights, dev)
    monkeypatch.setenv("EPIKV_BACKEND", "torch")
    on_twins = run_engine(weights, dev)
    fills = [entry[3] for entry in on_kernels]
    evictions = sum(now < before for before, now in zip(fills, fills[1:]))
    assert evictions >= 3, f"the loop evicted only {evictions} times: the test proves too little"
    for step, (mine, ref) in enumerate(zip(on_kernels, on_twins)):
        assert torch.equal(mine[0], ref[0]), f"tokens differ at step {step}"
        torch.testing.assert_close(mine[1], ref[1], rtol=1e-4, atol=1e-4)
        assert mine[3] == ref[3] and torch.equal(mine[2], ref[2]), f"kept slots differ at step {step}"
        kept_per_sequence = (mine[2] >= 0).sum(dim=1)
        assert int(kept_per_sequence.max()) <= BUDGET + EVICT_EVERY - 1


def test_static_shapes_match_the_slots_in_use():
    """Attending over the whole buffer with explicit query slots changes nothing."""
    weights = build_weights(torch.Generator().manual_seed(5))
    static = run_engine(weights, device())
    dynamic = run_engine(weights, device(), static_shapes=False)
    for step, (mine, ref) in enumerate(zip(static, dynamic)):
        assert torch.equal(mine[0], ref[0]), f"tokens differ at step {step}"
        torch.testing.assert_close(mine[1], ref[1], rtol=1e-4, atol=1e-4)
        assert torch.equal(mine[2], ref[2]), f"kept slots differ at step {step}"


@pytest.mark.parametrize("backend", ["torch", None])
def test_engine_loop_keeps_protected_tokens(monkeypatch, backend):
    if backend:
        monkeypatch.setenv("EPIKV_BACKEND", backend)
    history = run_engine(build_weights(torch.Generator().manual_seed(3)), device())
    for _, _, kept, _ in history:
        for row in kept:
            real = row[row >= 0]
            assert set(range(SINK)) <= set(real.tolist()), "a sink token was evicted"
            newest = int(real.max())
            assert set(range(newest - RECENT + 1, newest + 1)) <= set(real.tolist()), "a recent token was evicted"
            assert len(set(real.tolist())) == len(real), "a token is held twice"
