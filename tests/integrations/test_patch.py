"""patch / unpatch bookkeeping, isolation between models, and every unsupported use raising clearly."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import epikv_triton

from .models import cached, greedy, patched_copy, prompts, tiny_model


def test_unpatch_restores_original_outputs_exactly():
    model = tiny_model("qwen2-sliding")
    inputs = prompts(2)
    logits = model(**inputs).logits
    tokens = greedy(model, inputs, 30)
    epikv_triton.patch(model, budget=16, recent=4)
    assert not torch.equal(greedy(model, inputs, 30), tokens)  # eviction changed the continuation
    epikv_triton.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in vars(model)
    assert not model.model._forward_hooks and not model.model._forward_pre_hooks
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(greedy(model, inputs, 30), tokens)
    with pytest.raises(ValueError, match="not patched"):
        epikv_triton.unpatch(model)


def test_patching_leaves_other_models_alone():
    bystander = tiny_model("llama", seed=3)
    inputs = prompts(1)
    logits, tokens = bystander(**inputs).logits, greedy(bystander, inputs, 30)
    patched_copy(tiny_model("llama"), budget=16, recent=4)
    patched_copy(bystander, budget=16, recent=4)  # even a copy of this very model
    assert bystander.config._attn_implementation == "sdpa"
    assert torch.equal(bystander(**inputs).logits, logits)
    assert torch.equal(greedy(bystander, inputs, 30), tokens)


def test_patching_twice():
    model = patched_copy(tiny_model("llama"), budget=16)
    hooks = len(model.model._forward_pre_hooks)
    assert epikv_triton.patch(model, budget=16) is model
    assert len(model.model._forward_pre_hooks) == hooks
    with pytest.raises(ValueError, match="already patched.*unpatch"):
        epikv_triton.patch(model, budget=32)


def test_unsupported_model_type_lists_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="llama, qwen2, qwen3.*'gpt2'"):
        epikv_triton.patch(gpt2)


def test_model_too_shallow_for_default_bands_names_the_fix():
    shallow = tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match=r"overlap.*bands=\(\[\.\.\.\], \[\.\.\.\]\)"):
        epikv_triton.patch(shallow, method="epikv")
    assert shallow.config._attn_implementation == "sdpa"  # a failed patch leaves the model untouched
    model = epikv_triton.patch(tiny_model("llama", num_layers=4), method="epikv", bands=([1], [3]))
    assert greedy(model, prompts(1), 3).shape == (1, 15)


@pytest.mark.parametrize(
    "generate_kwargs, match",
    [
        (dict(num_beams=2), "beam search"),
        (dict(num_beams=2, do_sample=True), "beam sample"),
        (dict(prompt_lookup_num_tokens=3), "assisted generation"),
        (dict(cache_implementation="static"), "cache_implementation='static'"),
    ],
)
def test_unsupported_generation_modes_raise(generate_kwargs, match):
    model = patched_copy(tiny_model("llama"), budget=16)
    with pytest.raises(NotImplementedError, match=match):
        model.generate(**prompts(1), max_new_tokens=5, pad_token_id=0, **generate_kwargs)


def test_assistant_model_raises():
    model = patched_copy(tiny_model("llama"), budget=16)
    with pytest.raises(NotImplementedError, match="assisted generation"):
        greedy(model, prompts(1), 5, assistant_model=tiny_model("llama", seed=1))


def test_cache_rollback_and_reorder_raise():
    model = patched_copy(tiny_model("llama"), budget=16)
    cache = epikv_triton.new_cache(model)
    model(**prompts(1), **cached(cache), use_cache=True)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="batch"):
        cache.batch_repeat_interleave(2)


def test_budget_smaller_than_protected_tokens():
    with pytest.raises(ValueError, match=r"budget \(8\) is smaller than the protected tokens \(sink 4 \+ recent 8"):
        epikv_triton.patch(tiny_model("llama"), budget=8, recent=8, keep_prompt=False)


def test_keep_prompt_with_prompt_over_budget():
    model = patched_copy(tiny_model("llama"), budget=32, recent=8)
    long_prompt = prompts(1, length=40)
    with pytest.raises(ValueError, match=r"longest prompt \(40 tokens\).*keep_prompt=False"):
        greedy(model, long_prompt, 5)
    with pytest.raises(ValueError, match=r"longest prompt \(40 tokens\)"):
        model(**long_prompt, **cached(epikv_triton.new_cache(model)), use_cache=True)
    relaxed = patched_copy(tiny_model("llama"), budget=32, recent=8, keep_prompt=False)
    assert greedy(relaxed, long_prompt, 5).shape == (1, 45)


def test_foreign_cache_and_4d_mask_raise():
    model = patched_copy(tiny_model("llama"), budget=16)
    inputs = prompts(1)
    with pytest.raises(TypeError, match="needs an EpiKVCache"):
        model(**inputs, **cached(DynamicCache()), use_cache=True)
    with pytest.raises(ValueError, match="2D padding mask"):
        model(input_ids=inputs["input_ids"], attention_mask=torch.ones(1, 1, 12, 12))


def test_new_cache_needs_a_patched_model():
    with pytest.raises(ValueError, match="patched"):
        epikv_triton.new_cache(tiny_model("llama"))


def test_compiled_prefill_raises_and_default_compile_stays_correct():
    """The first chunk sizes the buffers, so it must run eagerly (compiled decode steps:
    ``test_compiled_decode.py``)."""
    model = patched_copy(tiny_model("llama"), budget=16)
    inputs = prompts(1)
    with pytest.raises(Exception, match="first chunk .* must run eagerly"):
        torch.compile(model, backend="eager", fullgraph=True)(**inputs)
    torch._dynamo.reset()
    # Without fullgraph, Dynamo runs the frame that touches the cache eagerly: same result as no compile.
    torch.testing.assert_close(torch.compile(model, backend="eager")(**inputs).logits, model(**inputs).logits)
    torch._dynamo.reset()


def test_deepcopy_of_a_patched_model_runs_and_unpatches_on_its_own():
    model = tiny_model("llama")
    patched = patched_copy(model, budget=16, recent=4)
    inputs = prompts(2)
    expected = greedy(patched, inputs, 30)
    twin = copy.deepcopy(patched)
    assert torch.equal(greedy(twin, inputs, 30), expected)
    epikv_triton.unpatch(twin)
    assert torch.equal(greedy(twin, inputs, 30), greedy(model, inputs, 30))
    assert torch.equal(greedy(patched, inputs, 30), expected)  # the original is still patched


def test_two_threads_share_one_patched_model():
    """Thread B's whole forward runs while thread A is inside its layers: each reads its own cache."""
    model = patched_copy(tiny_model("llama"), budget=64)
    ids_a, ids_b = prompts(1, seed=1)["input_ids"], prompts(1, seed=2)["input_ids"][:, :5]
    expected_a, expected_b = model(input_ids=ids_a).logits, model(input_ids=ids_b).logits
    a_inside, b_done = threading.Event(), threading.Event()

    def pause_thread_a(module, args, output):
        if threading.current_thread().name == "A":
            a_inside.set()
            b_done.wait(timeout=60)

    model.model.layers[1].register_forward_hook(pause_thread_a)
    results = {}

    def run(name, ids):
        try:
            results[name] = model(input_ids=ids).logits
        except Exception as error:  # reported below, with the other thread's result
            results[name] = error
        finally:
            b_done.set() if name == "B" else None

    thread_a = threading.Thread(target=run, args=("A", ids_a), name="A")
    thread_b = threading.Thread(target=lambda: (a_inside.wait(timeout=60), run("B", ids_b)), name="B")
    for thread in (thread_a, thread_b):
        thread.start()
    for thread in (thread_a, thread_b):
        thread.join()
    torch.testing.assert_close(results["A"], expected_a)
    torch.testing.assert_close(results["B"], expected_b)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["error", "interrupt"])
def test_a_forward_that_raises_midway_leaves_the_cache_refusing_until_reset(error):
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    inputs = prompts(1)
    fresh = model(**inputs, **cached(epikv_triton.new_cache(model)), use_cache=True).logits
    cache = epikv_triton.new_cache(model)

    def interrupt(module, args, output):
        raise error("cancelled")

    handle = model.model.layers[-1].register_forward_hook(interrupt)
    with pytest.raises(error, match="cancelled"):
        model(**inputs, **cached(cache), use_cache=True)
    handle.remove()
    with pytest.raises(RuntimeError, match="raised midway.*new_cache"):
        model(**inputs, **cached(cache), use_cache=True)
    cache.reset()
    assert torch.equal(model(**inputs, **cached(cache), use_cache=True).logits, fresh)


def test_a_prompt_too_long_is_refused_before_the_cache_changes():
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    cache = epikv_triton.new_cache(model)
    with pytest.raises(ValueError, match=r"longest prompt \(20 tokens\)"):
        model(**prompts(1, length=20), **cached(cache), use_cache=True)
    inputs = prompts(1)
    expected = model(**inputs, **cached(epikv_triton.new_cache(model)), use_cache=True).logits
    assert torch.equal(model(**inputs, **cached(cache), use_cache=True).logits, expected)


def test_keep_prompt_takes_any_prompt_when_the_budget_holds_the_stream():
    model = tiny_model("llama")
    patched = patched_copy(model, budget=16, recent=4)
    inputs = prompts(1, length=14)
    assert torch.equal(greedy(patched, inputs, 2), greedy(model, inputs, 2))  # 16 tokens: nothing is evicted
    with pytest.raises(ValueError, match=r"longest prompt \(14 tokens\)"):
        greedy(patched, inputs, 3)
    # A hand loop that promised 16 tokens is refused at the chunk that would pass the budget.
    cache = epikv_triton.new_cache(patched, expected_length=16)
    patched(**inputs, **cached(cache), use_cache=True)
    with pytest.raises(ValueError, match=r"longest prompt \(14 tokens\)"):
        patched(input_ids=inputs["input_ids"][:, :3], **cached(cache), use_cache=True)


def test_forward_without_a_cache_is_plain_attention():
    """use_cache=False (a loss pass): no cache, no scoring, no prompt to protect; the unpatched logits."""
    model = tiny_model("qwen2-sliding")
    inputs = prompts(2, length=40)
    expected = model(**inputs, use_cache=False).logits
    actual = patched_copy(model, budget=16, recent=4)(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_attention_weights_are_refused():
    model = patched_copy(tiny_model("llama"), budget=16)
    with pytest.raises(ValueError, match="output_attentions=True.*unpatch"):
        model(**prompts(1), output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions=True"):
        greedy(model, prompts(1), 3, output_attentions=True, return_dict_in_generate=True)


def test_a_cache_on_the_wrong_model_says_so():
    model = tiny_model("llama")
    patched = patched_copy(model, budget=16)
    with pytest.raises(RuntimeError, match="not patched"):
        model(**prompts(1), **cached(epikv_triton.new_cache(patched)), use_cache=True)
    deeper = patched_copy(tiny_model("llama", num_layers=5), budget=16)
    with pytest.raises(ValueError, match="another model"):
        deeper(**prompts(1), **cached(epikv_triton.new_cache(patched)), use_cache=True)
