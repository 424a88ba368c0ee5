"""Generation past the budget: bounded memory, tokens seen, and attention that only drops what was evicted."""

from __future__ import annotations

import pytest
import torch

import epikv_triton
from epikv_triton.scoring import evicting_methods
from tests.methods import settings

from .models import cached, greedy, patched_copy, prompts, stories_model, tiny_model
from .reference import masked_reference, record_steps, sampling_choice

BUDGET = 32
NEW_TOKENS = 200


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
    assert cache.store.policy.prompt_lengths == [10, 10]
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


FAMILIES = ["llama", "qwen2", "qwen2-sliding", "qwen3"]
MATRIX_TOKENS = 90


def matrix_cases():
    """Every registered evicting method on every family, batch 1 and 2 (left-padded), evict_every 1 and 16;
    keep_prompt=False (sink only) rotates with the method."""
    for family in FAMILIES:
        for i, method in enumerate(evicting_methods()):
            keep_prompt = i % 4 != 3
            for batch in (1, 2):
                for every in (1, 16):
                    yield pytest.param(family, method, batch, every, keep_prompt,
                                       id=f"{family}-{method}-b{batch}-every{every}{'' if keep_prompt else '-sink'}")


@pytest.mark.parametrize("family, method, batch, every, keep_prompt", list(matrix_cases()))
def test_every_method_equals_masking_reference(family, method, batch, every, keep_prompt):
    check_equals_masking_reference(family, method, batch, every, keep_prompt)


def check_equals_masking_reference(family: str, method: str, batch: int, every: int, keep_prompt: bool) -> list[dict]:
    """The generic eviction check of one method (under its test settings): enough evictions happen, the budget
    holds, the newest token stays, and the tokens equal the masking reference's. Returns the recorded steps."""
    model = tiny_model(family)
    inputs = prompts(batch)
    patched = patched_copy(model, budget=BUDGET, evict_every=every, keep_prompt=keep_prompt, **settings(method))
    steps = record_steps(patched)
    generated = greedy(patched, inputs, MATRIX_TOKENS)[:, inputs["input_ids"].shape[1] :]
    assert steps[-1]["evictions"] >= (MATRIX_TOKENS + 12 - BUDGET) // every - 1, "too few evictions to prove anything"
    real_prompt = inputs["attention_mask"].sum(dim=1).tolist()
    for i, step in enumerate(steps):
        assert all(len(kept) < BUDGET + every for kept in step["kept"]), "the budget was overrun"
        assert [kept[-1] for kept in step["kept"]] == [n + i - 1 for n in real_prompt], "the newest token was evicted"
    model.set_attn_implementation("eager")
    reference = masked_reference(model, inputs, [s["kept"] for s in steps], MATRIX_TOKENS)
    assert torch.equal(generated, reference)
    return steps


@pytest.mark.parametrize("batch", [1, 2])
def test_sliding_window_layers_with_eviction_equal_masking_reference(batch):
    """Qwen2 with sliding-window layers (window 8 < budget 32 < context): eviction and the window
    both hide keys; the reference hides them by mask, per layer type."""
    model = tiny_model("qwen2-sliding")
    assert "sliding_attention" in model.config.layer_types
    inputs = prompts(batch)
    patched = patched_copy(model, budget=BUDGET, method="h2o")
    steps = record_steps(patched)
    generated = greedy(patched, inputs, NEW_TOKENS)[:, inputs["input_ids"].shape[1] :]
    model.set_attn_implementation("eager")
    assert torch.equal(generated, masked_reference(model, inputs, [s["kept"] for s in steps], NEW_TOKENS))
    # The window matters: without it the reference decodes something else.
    unwindowed = tiny_model("qwen2").eval()
    unwindowed.load_state_dict(model.state_dict())
    unwindowed.set_attn_implementation("eager")
    assert not torch.equal(generated, masked_reference(unwindowed, inputs, [s["kept"] for s in steps], NEW_TOKENS))


def test_sampling_with_eviction_equals_masking_reference_at_the_same_seed():
    """Two samples per prompt (generate repeats each prompt): same draws as the reference at the same seed."""
    model = tiny_model("llama")
    inputs = prompts(2)
    patched = patched_copy(model, budget=16, recent=4)
    steps = record_steps(patched)
    torch.manual_seed(3)
    sampled = patched.generate(
        **inputs, max_new_tokens=60, do_sample=True, top_k=0, temperature=0.7, pad_token_id=0, num_return_sequences=2
    )[:, inputs["input_ids"].shape[1] :]
    assert sampled.shape == (4, 60)
    model.set_attn_implementation("eager")
    repeated = {name: tensor.repeat_interleave(2, dim=0) for name, tensor in inputs.items()}
    torch.manual_seed(3)
    reference = masked_reference(model, repeated, [s["kept"] for s in steps], 60, choose=sampling_choice(0.7))
    assert torch.equal(sampled, reference)
    assert not torch.equal(sampled[0], sampled[1]), "two samples of one prompt agree: not sampling"


@pytest.mark.parametrize("method, every", [("epikv", 1), ("epikv", 16), ("streaming", 1), ("h2o", 16)])
def test_an_eviction_moves_at_most_the_slots_it_releases(method, every):
    """200 decode steps at budget 32: at most one moved slot per step and sequence at evict_every=1, at most 16
    per eviction at evict_every=16. Streaming evicts the oldest token, the worst case of a shifting compaction:
    here exactly one slot per step once the cache is full."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET, method=method, evict_every=every)
    steps = record_steps(model)
    greedy(model, prompts(2), NEW_TOKENS)
    for before, after in zip(steps, steps[1:]):
        moved = [b - a for a, b in zip(before["moved"], after["moved"])]
        assert after["evictions"] - before["evictions"] <= 1
        assert all(0 <= m <= every for m in moved), f"moved {moved} slots in one eviction"
    total_moved = steps[-1]["moved"]
    assert all(m > 0 for m in total_moved)
    assert all(m <= e + 5 for m, e in zip(total_moved, steps[-1]["evicted"])), "more moves than evictions (+ padding)"
    if method == "streaming":
        full = [s for s in steps if s["evictions"] > 0]
        per_step = [b["moved"][0] - a["moved"][0] for a, b in zip(full, full[1:])]
        assert per_step == [1] * len(per_step)
