"""A hand-written forward loop over ``new_cache`` evicts between chunks exactly as ``generate`` does."""

from __future__ import annotations

import weakref

import pytest
import torch

import epikv_triton
import epikv_triton.store.buffers

from .models import cached, greedy, patched_copy, prompts, tiny_model

BUDGET, RECENT, NEW_TOKENS = 32, 8, 60


def forward_loop(model, inputs: dict, chunk: int, new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Read the prompt ``chunk`` tokens at a time, then decode greedily; returns tokens and buffer capacities."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = epikv_triton.new_cache(model, prompt_length=mask.sum(dim=1).tolist())
    capacities = []
    for start in range(0, ids.shape[1], chunk):
        end = start + chunk
        out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], **cached(cache), use_cache=True)
        capacities.append(cache.stats().capacity)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[-1], attention_mask=mask, **cached(cache), use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        capacities.append(cache.stats().capacity)
    return torch.cat(tokens, dim=1), capacities


@pytest.mark.parametrize("chunk", [1, 16])
def test_loop_matches_generate_with_prompt_kept(chunk):
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT)
    inputs = prompts(2, length=20)
    expected = greedy(model, inputs, NEW_TOKENS)[:, 20:]
    tokens, capacities = forward_loop(model, inputs, chunk, NEW_TOKENS)
    assert torch.equal(tokens, expected)
    # The declared prompt is longer than the first chunk: room for one more chunk beside the budget, allocated once.
    assert capacities == [BUDGET + chunk] * len(capacities)


@pytest.mark.parametrize("chunk", [1, 16])
def test_prompt_longer_than_budget_is_read_with_bounded_memory(chunk):
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, keep_prompt=False)
    inputs = prompts(2, length=90)
    expected = greedy(model, inputs, NEW_TOKENS, prefill_chunk_size=chunk)[:, 90:]
    tokens, capacities = forward_loop(model, inputs, chunk, NEW_TOKENS)
    assert torch.equal(tokens, expected)
    assert max(capacities) <= BUDGET + chunk


class KVAllocations:
    """Every K/V buffer the slot cache allocates (``torch.zeros`` of ``[2, L, B, H, slots, D]``), tracked weakly:
    ``peak_live_slots`` is the most slots of K/V alive at once, counted at each allocation."""

    def __init__(self, monkeypatch, num_layers: int):
        self.num_layers = num_layers
        self.live: list[weakref.ref] = []
        self.peak_live_slots = 0
        self.count = 0
        zeros = torch.zeros

        def tracking_zeros(*shape, **kwargs):
            out = zeros(*shape, **kwargs)
            if out.ndim == 6 and out.shape[:2] == (2, num_layers):
                self._allocated(out)
            return out

        monkeypatch.setattr(epikv_triton.store.buffers.torch, "zeros", tracking_zeros)

    def _allocated(self, kv: torch.Tensor) -> None:
        self.count += 1
        self.live = [ref for ref in self.live if ref() is not None] + [weakref.ref(kv)]
        self.peak_live_slots = max(self.peak_live_slots, sum(ref().shape[4] for ref in self.live))


CHUNKED_BUDGET, CHUNK, LONG_PROMPT = 256, 128, 2000


def read_in_chunks(model, ids: torch.Tensor, chunk: int) -> None:
    """A loop that names only its chunk length: no prompt length, so the first chunk is the prompt."""
    cache = epikv_triton.new_cache(model, chunk_size=chunk)
    for start in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, start : start + chunk], **cached(cache), use_cache=True)


@pytest.mark.parametrize("reader", ["generate", "new_cache loop", "new_cache loop, chunk_size only"])
def test_chunked_read_never_holds_more_than_budget_plus_chunk(monkeypatch, reader):
    model = patched_copy(tiny_model("llama"), budget=CHUNKED_BUDGET, keep_prompt=False)
    allocations = KVAllocations(monkeypatch, num_layers=3)
    inputs = prompts(1, length=LONG_PROMPT)
    if reader == "generate":
        greedy(model, inputs, 4, prefill_chunk_size=CHUNK)
    elif reader == "new_cache loop":
        forward_loop(model, inputs, CHUNK, 4)
    else:
        read_in_chunks(model, inputs["input_ids"], CHUNK)
    assert allocations.count == 1, "the K/V buffer was allocated more than once"
    assert allocations.peak_live_slots <= CHUNKED_BUDGET + CHUNK


def test_chunk_size_must_be_positive():
    model = patched_copy(tiny_model("llama"), budget=CHUNKED_BUDGET)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        epikv_triton.new_cache(model, chunk_size=0)
