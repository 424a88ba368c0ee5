"""The cache keyword: ``cache`` from transformers 5.24 on, ``past_key_values`` before; both are read, the
installed one is passed on, and results do not depend on which name the caller used."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import transformers
from packaging.version import Version

import epikv_triton
from epikv_triton.integrations.keywords import pop_cache

from .models import CACHE, cached, greedy, patched_copy, prompts, tiny_model

RENAMED = Version(transformers.__version__) >= Version("5.24.0")


def test_keyword_is_the_installed_transformers_name():
    assert CACHE == ("cache" if RENAMED else "past_key_values")
    assert epikv_triton.cache_keyword(tiny_model("qwen3")) == CACHE


def test_pop_cache_reads_either_name_and_prefers_cache():
    current, legacy = object(), object()
    both = {"cache": current, "past_key_values": legacy, "use_cache": True}
    assert pop_cache(both) is current and both == {"use_cache": True}
    assert pop_cache({"past_key_values": legacy}) is legacy
    assert pop_cache({"cache": None, "past_key_values": legacy}) is legacy
    assert pop_cache({}) is None


def legacy_deprecation() -> contextlib.AbstractContextManager:
    """On 5.24+ a forward given the legacy name warns (the warning this suite turns into an error for our own
    calls); ``generate`` of a patched model does not, since the wrapper passes the cache on under the new name."""
    if RENAMED:
        return pytest.warns(FutureWarning, match="past_key_values")
    return warnings.catch_warnings()


@pytest.mark.legacy_cache_keyword
def test_legacy_keyword_gives_the_same_tokens():
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    inputs = prompts(1)
    expected = greedy(model, inputs, 30)

    legacy = epikv_triton.new_cache(model)
    tokens = greedy(model, inputs, 30, past_key_values=legacy)
    assert torch.equal(tokens, expected)
    assert legacy.stats().sequences[0].tokens_seen == 12 + 29  # generate used the cache it was given

    loop_caches = [epikv_triton.new_cache(model), epikv_triton.new_cache(model)]
    with legacy_deprecation():
        old = model(**inputs, past_key_values=loop_caches[0], use_cache=True).logits
    new = model(**inputs, **cached(loop_caches[1]), use_cache=True).logits
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert loop_caches[0].kept_positions() == loop_caches[1].kept_positions() == [list(range(12))]


def test_generate_output_carries_our_cache_under_the_installed_name():
    model = patched_copy(tiny_model("qwen2"), budget=16, recent=4)
    output = model.generate(
        **prompts(1), max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    assert isinstance(getattr(output, CACHE), epikv_triton.integrations.transformers_cache.EpiKVCache)


def test_cache_surface_reports_tokens_seen_and_refuses_rollback():
    """What transformers reads off a cache, on every supported version, once eviction has happened:
    lengths are tokens seen (RoPE and the query offset), mask sizes are physical slots, nothing can be cropped."""
    model = patched_copy(tiny_model("llama"), budget=16, recent=4)
    output = model.generate(
        **prompts(1), max_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    cache = getattr(output, CACHE)
    seen = 12 + 29
    assert cache.stats().sequences[0].tokens_evicted > 0
    assert cache.get_seq_length() == seen
    assert cache.get_query_offset() == seen  # the mask's query offset: must not become the compacted length
    assert cache.get_mask_sizes(1, 0) == (cache.stats().slots_used + 1, 0)
    assert not cache.is_croppable
    assert not any(layer.is_compileable for layer in cache.layers)
