"""With a budget that holds every token, a patched model generates exactly what the original does."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import pytest
import torch
from transformers import GenerationConfig

import epikv_triton
from epikv_triton.scoring import method_names
from tests.methods import settings

from .models import greedy, patched_copy, prompts, stories_model, tiny_model

FAMILIES = ("llama", "qwen2", "qwen2-sliding", "qwen3")
NEW_TOKENS = 20


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2-left-padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_large_budget_matches_unpatched_for_every_method(family, batch):
    check_large_budget_matches_unpatched(family, batch, method_names())


def check_large_budget_matches_unpatched(family: str, batch: int, methods: Sequence[str]) -> None:
    """The generic no-eviction check: with a budget that holds every token, each method (under its test settings)
    generates exactly what the unpatched model does."""
    model = tiny_model(family)
    inputs = prompts(batch)
    expected = greedy(model, inputs, NEW_TOKENS)
    for method in methods:
        patched = patched_copy(model, budget=64, **settings(method))
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



def test_generate_refuses_use_cache_false_and_overrides_a_model_default():
    """Without a cache generate re-reads the whole sequence every step, which a bounded cache cannot follow:
    refused when asked for, overridden (with a warning) when only the model's defaults say so."""
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    inputs = prompts(1)
    with pytest.raises(ValueError, match="use_cache=False"):
        greedy(model, inputs, 30, use_cache=False)
    config = GenerationConfig(use_cache=False, max_new_tokens=30, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(**inputs, generation_config=config)
    expected = greedy(model, inputs, 30)
    model.generation_config.use_cache = False  # as saved by a training run with gradient checkpointing
    with pytest.warns(UserWarning, match="runs with use_cache=True"):
        assert torch.equal(greedy(model, inputs, 30), expected)


def test_generate_from_inputs_embeds_matches_unpatched():
    model = tiny_model("llama")
    inputs = prompts(2)
    settings = dict(
        inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), attention_mask=inputs["attention_mask"],
        max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
    )
    patched = patched_copy(model, budget=64)
    # transformers takes inputs_embeds only when prepare_inputs_for_generation names it; tools read generate's too.
    assert inspect.signature(patched.generate) == inspect.signature(model.generate)
    assert torch.equal(patched.generate(**settings), model.generate(**settings))


@pytest.mark.parametrize("prefill_chunk_size", [None, 5])
def test_left_padded_batch_without_mask_matches_the_explicit_mask(prefill_chunk_size):
    """generate infers the padding from pad_token_id; the cache must protect the same real prompt tokens."""
    model = patched_copy(tiny_model("llama"), budget=24, recent=4)
    inputs = prompts(2)
    expected = greedy(model, inputs, 30, prefill_chunk_size=prefill_chunk_size)
    actual = greedy(model, {"input_ids": inputs["input_ids"]}, 30, prefill_chunk_size=prefill_chunk_size)
    assert torch.equal(actual, expected)


def test_positional_generation_config_is_checked_and_used():
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    inputs = prompts(2)
    forwards = []
    model.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    beams = GenerationConfig(num_beams=2, max_new_tokens=5, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(inputs["input_ids"], beams, attention_mask=inputs["attention_mask"])
    assert not forwards, "refused only after the prefill ran"
    sampling = GenerationConfig(do_sample=True, num_return_sequences=2, max_new_tokens=30, pad_token_id=0)
    torch.manual_seed(0)
    expected = model.generate(**inputs, generation_config=sampling)
    torch.manual_seed(0)
    actual = model.generate(inputs["input_ids"], sampling, attention_mask=inputs["attention_mask"])
    assert actual.shape == (4, 42) and torch.equal(actual, expected)


def test_an_instance_generate_wrapper_stays_in_the_chain():
    model = tiny_model("llama")
    reference = patched_copy(model, budget=16, recent=4)
    calls = []
    class_generate = model.generate

    def own_generate(*args, **kwargs):
        calls.append(1)
        return class_generate(*args, **kwargs)

    model.generate = own_generate
    epikv_triton.patch(model, budget=16, recent=4)
    inputs = prompts(2)
    assert torch.equal(greedy(model, inputs, 30), greedy(reference, inputs, 30))  # bounded, through own_generate
    assert calls == [1]
    epikv_triton.unpatch(model)
    assert model.generate is own_generate
