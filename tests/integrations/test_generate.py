"""With a budget that holds every token, a patched model generates exactly what the original does."""

from __future__ import annotations

import pytest
import torch

from epikv_triton.config import METHODS

from .models import greedy, patched_copy, prompts, stories_model, tiny_model

FAMILIES = ("llama", "qwen2", "qwen2-sliding", "qwen3")
NEW_TOKENS = 20


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2-left-padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_large_budget_matches_unpatched_for_every_method(family, batch):
    model = tiny_model(family)
    inputs = prompts(batch)
    expected = greedy(model, inputs, NEW_TOKENS)
    for method in METHODS:
        patched = patched_copy(model, budget=64, method=method)
        assert torch.equal(greedy(patched, inputs, NEW_TOKENS), expected), method


def test_sliding_window_matters_in_the_qwen2_test_model():
    """Guards the sliding-window cases above: the window changes the tokens, so matching them proves it is applied."""
    sliding, full = tiny_model("qwen2-sliding"), tiny_model("qwen2")
    full.load_state_dict(sliding.state_dict())
    inputs = prompts(1)
    assert not torch.equal(greedy(sliding, inputs, NEW_TOKENS), greedy(full, inputs, NEW_TOKENS))


@pytest.mark.parametrize("name", ["stories260k", "stories260k-qwen2"])
def test_real_model_large_budget_matches_unpatched(name):
    model, tokenizer = stories_model(name)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    texts = ["Once upon a time, there was a little girl named", "One day, a big dog"]
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    inputs.pop("token_type_ids", None)
    expected = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    patched = patched_copy(model, budget=128)
    actual = patched.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(actual, expected)
    if name == "stories260k":
        story = tokenizer.decode(actual[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert story.strip().startswith("Lily. She loved to play outside in the park.")


def test_plain_forward_without_cache_matches_unpatched_logits():
    model = tiny_model("llama")
    inputs = prompts(2)
    expected = model(**inputs).logits
    actual = patched_copy(model, budget=64)(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_generate_does_not_share_caches_between_calls():
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    inputs = prompts(1)
    assert torch.equal(greedy(model, inputs, 30), greedy(model, inputs, 30))

