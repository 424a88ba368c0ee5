"""The slot store driven directly, as an engine would, with no transformers: chunks of random keys, values,
queries and hidden states through ``begin_chunk`` -> ``write``/``attend``/``observe_hidden`` -> ``end_chunk``.

The oracle keeps every key and value it ever wrote, by position. After every chunk the store's kept positions
must be the policy's (sink + recent for ``streaming``), and attention must equal the PyTorch twin over the kept
keys plus the new tokens: whatever the store moved, it moved whole.
"""

from __future__ import annotations

import pytest
import torch

from epikv_triton import ops
from epikv_triton.config import EpiKVConfig
from epikv_triton.store import SlotStore

LAYERS, HEADS, QUERY_HEADS, DIM, HIDDEN = 2, 2, 4, 16, 12


class Stream:
    """Feeds chunks to a store and keeps the oracle: every K/V by (sequence, position)."""

    def __init__(self, store: SlotStore, batch: int, seed: int = 0):
        self.store, self.batch = store, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.written: list[dict[int, torch.Tensor]] = [{} for _ in range(batch)]  # position -> [L, 2, H, D]
        self.seen = [0] * batch

    def random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def chunk(self, num_tokens: int, padding: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """One chunk (``padding[b]`` leading padding tokens in sequence ``b``); returns each layer's output."""
        store, B, T = self.store, self.batch, num_tokens
        mask = torch.ones(B, T, dtype=torch.long)
        for b, pad in enumerate(padding):
            mask[b, :pad] = 0
        positions = store.next_positions(B, T, mask)
        store.begin_chunk(positions)
        outputs = []
        for layer in range(LAYERS):
            key, value = self.random(B, HEADS, T, DIM), self.random(B, HEADS, T, DIM)
            query = self.random(B, QUERY_HEADS, T, DIM)
            expected = self.expected_attention(layer, query, key, value, positions)
            keys, values = store.write(layer, key, value)
            outputs.append(store.attend(layer, query, keys, values, scale=None, window=None))
            torch.testing.assert_close(outputs[-1], expected, msg=f"layer {layer} attends over other keys")
            self.remember(layer, key, value, positions)
            store.observe_hidden(layer, self.random(B, T, HIDDEN))
        store.end_chunk()
        self.seen = [s + int(n) for s, n in zip(self.seen, mask.sum(dim=1))]
        return outputs

    def remember(self, layer, key, value, positions) -> None:
        for b in range(self.batch):
            for t, p in enumerate(positions[b].tolist()):
                if p >= 0:
                    entry = self.written[b].setdefault(p, torch.empty(LAYERS, 2, HEADS, DIM))
                    entry[layer, 0], entry[layer, 1] = key[b, :, t], value[b, :, t]

    def expected_attention(self, layer, query, key, value, positions) -> torch.Tensor:
        """The twin over the kept keys (from the oracle, in position order) followed by the new ones."""
        kept = self.store.kept_positions()
        width = max(len(row) for row in kept)
        B, T = positions.shape
        k = torch.zeros(B, HEADS, width + T, DIM)
        v = torch.zeros_like(k)
        pos = torch.full((B, width + T), -1, dtype=torch.int64)
        for b, row in enumerate(kept):
            for slot, p in enumerate(row):
                k[b, :, slot], v[b, :, slot] = self.written[b][p][layer]
            pos[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
        k[:, :, width:], v[:, :, width:], pos[:, width:] = key, value, positions
        return ops.naive.slot_attention(query, k, v, pos, with_deltas=False).out


def streaming_store(**settings) -> SlotStore:
    config = EpiKVConfig(method="streaming", **{"budget": 12, "sink": 2, "recent": 3, "keep_prompt": False, **settings})
    return SlotStore(config, LAYERS)


@pytest.mark.parametrize("evict_every", [1, 3])
def test_streaming_keeps_the_sink_and_the_newest_and_attends_over_them(evict_every):
    store = streaming_store(evict_every=evict_every)
    stream = Stream(store, batch=2)
    stream.chunk(9, padding=(0, 4))  # a prompt, the second sequence left-padded
    for _ in range(20):
        stream.chunk(1)
        stats = store.stats()
        assert stats.slots_used <= 12 + evict_every - 1
        for b, row in enumerate(store.kept_positions()):
            seen = stream.seen[b]
            # Everything until the first eviction; then the sink and the newest tokens.
            expected = list(range(seen)) if len(row) == seen else [0, 1] + list(range(seen - len(row) + 2, seen))
            assert row == expected
            assert len(row) >= min(seen, 12)  # an eviction keeps the whole budget
    sequences = store.stats().sequences
    assert [s.tokens_seen for s in sequences] == [29, 25]
    # Hole filling moves at most the slots it frees: evicted tokens, and the padding slots of sequence 1.
    assert sequences[0].slots_moved <= sequences[0].tokens_evicted
    assert sequences[1].slots_moved <= sequences[1].tokens_evicted + 4
    assert store.stream_length == 29  # padding included


@pytest.mark.parametrize("method", ["epikv", "knorm", "h2o", "random"])
def test_every_eviction_keeps_budget_slots_and_attention_stays_exact(method):
    """Scored methods: whatever they keep, the store attends over exactly the kept keys (checked per layer)."""
    bands = ([0], [1]) if EpiKVConfig(method=method).uses_bands else None  # the store's model has 2 layers
    config = EpiKVConfig(method=method, budget=10, recent=2, keep_prompt=False, bands=bands)
    store = SlotStore(config, LAYERS)
    stream = Stream(store, batch=2, seed=1)
    stream.chunk(6)
    for _ in range(12):
        stream.chunk(2)
        assert all(len(row) <= 10 for row in store.kept_positions())
    assert store.stats().eviction_passes > 0


def test_a_value_reserve_keeps_the_tokens_with_the_largest_values():
    """``streaming`` drops positions 3 and 5; with a reserve of 2 they stay, because one layer's value at one
    head is far larger there than anywhere else, and attention stays exact over what was kept."""
    store = streaming_store(value_reserve=2)
    stream = Stream(store, batch=1, seed=2)
    stream.chunk(9)  # slots 0..8 hold positions 0..8: nothing is evicted below the budget of 12
    for position, layer, head in ((3, 0, 1), (5, 1, 0)):
        store.buffers.kv[1, layer, 0, head, position] *= 50
        stream.written[0][position][layer, 1, head] *= 50
    for _ in range(16):
        stream.chunk(1)
    seen = stream.seen[0]
    assert store.kept_positions()[0] == [0, 1, 3, 5] + list(range(seen - 8, seen))


def test_a_chunk_longer_than_planned_grows_the_buffers_once_to_what_it_needs():
    store = streaming_store()
    stream = Stream(store, batch=1)
    stream.chunk(4)
    assert store.stats().capacity == 12 + 1
    stream.chunk(20)
    assert store.stats().capacity == 4 + 20  # below the budget nothing is evicted: exactly the fill plus the chunk
    stream.chunk(20)
    assert store.stats().capacity == 12 + 20  # after the eviction to the budget: the budget plus the chunk
    stream.chunk(20)
    assert store.stats().capacity == 12 + 20  # now it fits


def test_keep_prompt_refuses_a_prompt_that_leaves_no_room_before_any_state_changes():
    store = SlotStore(EpiKVConfig(method="streaming", budget=8, recent=4), LAYERS)
    with pytest.raises(ValueError, match="longest prompt \\(6 tokens\\) plus the recent window \\(4\\)"):
        store.begin_chunk(torch.arange(6)[None])
    assert not store.chunk_open and store.stats().capacity == 0
    Stream(store, batch=1).chunk(4)  # a prompt that fits still runs


def test_a_chunk_left_open_refuses_the_next_until_reset():
    store = streaming_store()
    store.begin_chunk(torch.arange(3)[None])
    with pytest.raises(RuntimeError, match="raised midway"):
        store.begin_chunk(torch.arange(3, 4)[None])
    store.reset()
    Stream(store, batch=1).chunk(3)
    assert store.kept_positions() == [[0, 1, 2]]


def test_misuse_is_refused_with_what_to_do():
    store = streaming_store()
    with pytest.raises(RuntimeError, match="call begin_chunk"):
        store.write(0, torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM))
    Stream(store, batch=2).chunk(2)
    with pytest.raises(ValueError, match="this cache holds 2 sequences; the chunk has 1"):
        store.begin_chunk(torch.arange(2, 3)[None])
    empty = SlotStore(EpiKVConfig(method="streaming"), LAYERS)
    assert empty.stats().capacity == 0 and empty.kept_positions() == []


@pytest.mark.parametrize("value_reserve", [0, 2])
def test_a_compiled_decode_step_over_the_store_equals_the_eager_one(value_reserve):
    """The same store interface under ``torch.compile``: device counters, one graph, the eager result."""
    config = EpiKVConfig(
        method="knorm", budget=8, recent=2, keep_prompt=False, evict_every=2, value_reserve=value_reserve
    )
    generator = torch.Generator().manual_seed(3)
    steps = [[torch.randn(1, HEADS, 1, DIM, generator=generator) for _ in range(3 * LAYERS)] for _ in range(14)]
    prompt = [torch.randn(1, HEADS, 5, DIM, generator=generator) for _ in range(3 * LAYERS)]

    def step(store, tensors, positions):
        store.begin_chunk(positions)
        outputs = []
        for layer in range(LAYERS):
            key, value, query = tensors[3 * layer : 3 * layer + 3]
            keys, values = store.write(layer, key, value)
            outputs.append(store.attend(layer, query.repeat(1, 2, 1, 1), keys, values, scale=None, window=None))
        store.end_chunk()
        return torch.stack(outputs)

    def run(step_function):
        store = SlotStore(config, LAYERS)
        step(store, prompt, torch.arange(5)[None])
        outputs = [step_function(store, tensors, torch.tensor([[5 + i]])) for i, tensors in enumerate(steps)]
        return torch.stack(outputs), store

    torch._dynamo.reset()  # the other parametrisation compiled `step` under another config
    with torch.no_grad():
        expected, eager = run(step)
        with torch._dynamo.config.patch(error_on_recompile=True):
            actual, compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
        assert compiled.counters.host_stale
    torch.testing.assert_close(actual, expected)
    assert compiled.kept_positions() == eager.kept_positions()
    assert compiled.stats() == eager.stats()
