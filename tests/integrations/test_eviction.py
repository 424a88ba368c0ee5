"""Generation past the budget: bounded memory, tokens seen, and attention that only drops what was evicted."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import epikv_triton

from .models import CACHE, cached, greedy, patched_copy, prompts, stories_model, tiny_model

BUDGET = 32
NEW_TOKENS = 200


def record_steps(model: torch.nn.Module) -> list[dict]:
    """After every forward of ``model``: what its cache holds and how big its buffer is."""
    steps: list[dict] = []

    def hook(module, args, output):
        cache = getattr(output, CACHE)
        steps.append(
            dict(
                kept=cache.kept_positions(),
                seq_length=cache.get_seq_length(),
                slots_used=cache.slots.fill,
                capacity=cache.slots.kv.shape[4],
                seen=[s.tokens_seen for s in cache.stats().sequences],
            )
        )

    model.register_forward_hook(hook)
    return steps


def masked_reference(model: torch.nn.Module, inputs: dict, kept_after_step: list, new_tokens: int) -> torch.Tensor:
    """Greedy tokens of the unpatched model keeping every token but hiding the ones the patched run evicted.

    Stream slot ``j`` of sequence ``b`` holds position ``j - pad[b]``; before
    forward ``i`` the patched cache held ``kept_after_step[i - 1]`` plus the new token.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, P = ids.shape
    pad = (mask == 0).sum(dim=1)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), **cached(cache))
    tokens = [out.logits[:, -1].argmax(-1)]
    for step in range(1, new_tokens):
        length = P + step
        visible = torch.zeros(B, length, dtype=torch.bool)
        for b in range(B):
            visible[b, [int(pad[b]) + p for p in kept_after_step[step - 1][b]]] = True
        visible[:, -1] = True
        additive = torch.zeros(B, 1, 1, length).masked_fill(~visible[:, None, None], torch.finfo(torch.float32).min)
        position = (P - pad + step - 1)[:, None]
        out = model(
            input_ids=tokens[-1][:, None], attention_mask=additive, position_ids=position, **cached(cache)
        )
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize(
    "family, batch, settings",
    [
        ("llama", 1, dict(method="epikv")),
        ("llama", 2, dict(method="epikv")),
        ("llama", 2, dict(method="kv", evict_every=8)),
        ("qwen3", 2, dict(method="lag_kv", lag_chunk=16, keep_prompt=False)),
        ("llama", 2, dict(method="h2o")),
    ],
    ids=["llama-epikv-b1", "llama-epikv-b2", "llama-kv-every8-b2", "qwen3-lagkv-b2", "llama-h2o-b2"],
)
def test_eviction_is_bounded_and_equals_masking_reference(family, batch, settings):
    model = tiny_model(family)
    inputs = prompts(batch)
    patched = patched_copy(model, budget=BUDGET, **settings)
    steps = record_steps(patched)
    generated = greedy(patched, inputs, NEW_TOKENS)[:, inputs["input_ids"].shape[1] :]

    every = settings.get("evict_every", 1)
    prompt_length = inputs["input_ids"].shape[1]
    real_prompt = inputs["attention_mask"].sum(dim=1).tolist()
    assert len(steps) == NEW_TOKENS
    for i, step in enumerate(steps):
        assert step["capacity"] == BUDGET + every, "the buffer was reallocated"
        assert step["slots_used"] <= BUDGET + every - 1
        assert step["seq_length"] == prompt_length + i
        assert step["seen"] == [n + i for n in real_prompt]
        for b in range(batch):
            assert len(step["kept"][b]) <= BUDGET + every - 1
            assert step["kept"][b][-1] == real_prompt[b] + i - 1  # the newest token is always kept
    assert all(BUDGET <= len(kept) < BUDGET + every for kept in steps[-1]["kept"])

    model.set_attn_implementation("eager")
    reference = masked_reference(model, inputs, [s["kept"] for s in steps], NEW_TOKENS)
    assert torch.equal(generated, reference)


def test_stats_report_seen_kept_evicted_and_bytes():
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=8)
    inputs = prompts(2)
    cache = epikv_triton.new_cache(model)
    model(**inputs, **cached(cache), use_cache=True)
    stats = cache.stats()
    assert [s.tokens_seen for s in stats.sequences] == [12, 7]
    assert [s.tokens_kept for s in stats.sequences] == [12, 7]
    token = torch.tensor([[5], [6]])
    mask = inputs["attention_mask"]
    for _ in range(40):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        model(input_ids=token, attention_mask=mask, **cached(cache), use_cache=True)
    stats = cache.stats()
    assert [s.tokens_seen for s in stats.sequences] == [52, 47]
    assert [s.tokens_kept for s in stats.sequences] == [BUDGET, BUDGET]
    assert [s.tokens_evicted for s in stats.sequences] == [52 - BUDGET, 47 - BUDGET]
    bytes_per_token = 2 * 3 * 2 * 16 * 4  # K and V, 3 layers, 2 KV heads, head_dim 16, fp32
    assert [s.kv_bytes for s in stats.sequences] == [BUDGET * bytes_per_token] * 2
    assert stats.capacity == BUDGET + 1 and stats.peak_slots_used <= BUDGET + 1
    assert cache.get_seq_length() == 52
    cache.reset()
    model(**inputs, **cached(cache), use_cache=True)
    assert [s.tokens_seen for s in cache.stats().sequences] == [12, 7]
    assert cache.get_seq_length() == 12


def test_one_declared_prompt_length_covers_the_batch():
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=8)
    cache = epikv_triton.new_cache(model, prompt_length=10)
    model(**prompts(2), **cached(cache), use_cache=True)
    assert cache.slots.prompt_lengths == [10, 10]
    with pytest.raises(ValueError, match="3 prompt lengths were declared for a batch of 2"):
        model(**prompts(2), **cached(epikv_triton.new_cache(model, prompt_length=[4, 5, 6])), use_cache=True)


def test_full_method_never_evicts():
    model = patched_copy(tiny_model("llama"), budget=8, method="full")
    steps = record_steps(model)
    greedy(model, prompts(1), 40)
    assert [len(s["kept"][0]) for s in steps] == [12 + i for i in range(40)]


def test_streaming_keeps_sink_and_most_recent():
    model = patched_copy(tiny_model("llama"), budget=16, method="streaming", keep_prompt=False, sink=4, recent=4)
    steps = record_steps(model)
    greedy(model, prompts(1), 30)
    last = steps[-1]["kept"][0]
    newest = 12 + 30 - 2
    assert last == [0, 1, 2, 3] + list(range(newest - 11, newest + 1))


def test_real_model_with_eviction_matches_masking_reference():
    model, tokenizer = stories_model("stories260k")
    inputs = dict(tokenizer(["Once upon a time, there was a little girl named"], return_tensors="pt"))
    inputs.pop("token_type_ids", None)
    patched = patched_copy(model, budget=BUDGET)
    steps = record_steps(patched)
    generated = greedy(patched, inputs, 120)[:, inputs["input_ids"].shape[1] :]
    assert all(s["capacity"] == BUDGET + 1 for s in steps)
    model.set_attn_implementation("eager")
    assert torch.equal(generated, masked_reference(model, inputs, [s["kept"] for s in steps], 120))
