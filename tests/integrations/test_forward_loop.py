"""A hand-written forward loop over ``new_cache`` evicts between chunks exactly as ``generate`` does."""

from __future__ import annotations

import pytest
import torch

import epikv_triton

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
    assert max(capacities) == BUDGET + 1


@pytest.mark.parametrize("chunk", [1, 16])
def test_prompt_longer_than_budget_is_read_with_bounded_memory(chunk):
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, keep_prompt=False)
    inputs = prompts(2, length=90)
    expected = greedy(model, inputs, NEW_TOKENS, prefill_chunk_size=chunk)[:, 90:]
    tokens, capacities = forward_loop(model, inputs, chunk, NEW_TOKENS)
    assert torch.equal(tokens, expected)
    assert max(capacities) <= BUDGET + chunk
