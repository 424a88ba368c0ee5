"""transformers' continuous batching (``generate_batch``) on a patched model: the engine evicts, request by request,
exactly as ``generate`` does for each prompt alone; what it cannot serve exactly is refused before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import epikv_triton
from epikv_triton.integrations import continuous_batching
from epikv_triton.integrations.request_streams import RequestStream
from epikv_triton.integrations.state import state_of

from .models import patched_copy, tiny_model

NEW_TOKENS = 24
BUDGET, RECENT, PAGE = 16, 4, 4
PROMPT_LENGTHS = (5, 9, 12, 7, 10)
POOL_PAGES = 16  # a request holds up to 5 pages: three at a time, and unbounded ones would need up to 9 each


def requests() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def generation_config(new_tokens: int = NEW_TOKENS) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)


def engine_config(max_batch_tokens: int = 16, **settings) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(
        page_size=PAGE, num_blocks=POOL_PAGES, max_batch_tokens=max_batch_tokens, **settings
    )


def generate_alone(model, prompt: list[int]) -> tuple[list[int], list[int]]:
    """``generate`` on one prompt: its new tokens and the positions its cache kept at the end."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True,
    )
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.sequences[0, len(prompt) :].tolist(), cache.kept_positions()[0]


@pytest.mark.parametrize(
    "family, settings, max_batch_tokens",
    [
        ("llama", dict(method="epikv"), 6),  # chunked prefill: the 12-token prompt is read in pieces
        ("qwen2", dict(method="kv", evict_every=4), 16),  # key/value deltas; eviction every 4 tokens
        ("qwen3", dict(method="lag_kv", lag_chunk=16), 6),
        ("llama", dict(method="knorm"), 16),
        ("qwen2", dict(method="streaming"), 16),
        ("qwen3", dict(method="random"), 6),
        ("llama", dict(method="full"), 16),
        # The default, and the methods that rescore every held slot from the engine's attention calls.
        ("llama", dict(method="tova"), 6),
        ("qwen2", dict(method="tova", evict_every=4), 16),
        ("qwen3", dict(method="tova"), 6),
        ("qwen3", dict(method="snapkv"), 6),
        ("llama", dict(method="rkv"), 16),
        ("qwen2", dict(method="keydiff"), 6),
        ("llama", dict(method="h2o"), 6),  # accumulates: the prompt's chunks add up to the whole prompt's mass
    ],
    ids=[
        "llama-epikv-chunked", "qwen2-kv-every4", "qwen3-lagkv-chunked", "llama-knorm", "qwen2-streaming",
        "qwen3-random-chunked", "llama-full", "llama-tova-chunked", "qwen2-tova-every4", "qwen3-tova-chunked",
        "qwen3-snapkv-chunked", "llama-rkv", "qwen2-keydiff-chunked", "llama-h2o-chunked",
    ],
)
def test_generate_batch_matches_generate_request_by_request(family, settings, max_batch_tokens):
    """More requests than the pool holds at once, of different lengths: each one's tokens and kept positions are
    those of ``generate`` on its prompt alone; no two requests ever share a page; the pages come back."""
    model = patched_copy(tiny_model(family), budget=BUDGET, recent=RECENT, **settings)
    prompts = requests()
    outputs = model.generate_batch(
        inputs=prompts, generation_config=generation_config(),
        continuous_batching_config=engine_config(max_batch_tokens),
    )
    session = state_of(model).engine_session
    stats = session.stats
    assert model.config._attn_implementation == "epikv"  # generate runs bounded again afterwards
    for index, prompt in enumerate(prompts):
        request = f"req_{index}"
        tokens, kept = generate_alone(model, prompt)
        assert outputs[request].generated_tokens == tokens, request
        if settings["method"] != "full":
            assert stats.kept_positions[request] == kept, request
    assert stats.shared_page_forwards == 0
    assert stats.pages_in_use_after == 0  # every page went back to the pool
    assert session.allocator is None and not session.streams  # nothing of the engine outlives the run
    assert stats.peak_pages_in_use <= session.pool_pages
    if settings["method"] == "full":
        assert stats.eviction_passes == 0
        return
    assert stats.eviction_passes > 0 and stats.tokens_evicted > 0
    bound = -(-(BUDGET + settings.get("evict_every", 1)) // PAGE)
    assert stats.peak_pages <= bound < -(-(max(PROMPT_LENGTHS) + NEW_TOKENS) // PAGE)
    assert session.pool_pages < len(prompts) * bound  # the requests could not all run at once


def test_long_request_stays_bounded():
    """One request far past the budget holds the same few pages from its first eviction to its end."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, method="epikv")
    model.generate_batch(
        inputs=[requests()[0]], generation_config=generation_config(80), continuous_batching_config=engine_config()
    )
    stats = epikv_triton.batch_stats(model)
    assert stats is state_of(model).engine_session.stats
    assert stats.tokens_evicted == PROMPT_LENGTHS[0] + 80 - 1 - BUDGET  # the last token is never written
    assert stats.peak_pages == -(-(BUDGET + 1) // PAGE)
    assert len(stats.kept_positions["req_0"]) == BUDGET


@pytest.mark.parametrize(
    "family, settings, engine_settings, match",
    [
        ("llama", dict(method="epikv", keep_prompt=False), {}, "keep_prompt=False"),
        ("llama", dict(method="epikv", value_reserve=2), {}, "value_reserve"),
        ("qwen2-sliding", dict(method="epikv"), {}, "sliding-window"),
        ("llama", dict(method="epikv"), dict(use_async_batching=True), "use_async_batching"),
        ("llama", dict(method="epikv"), dict(use_cuda_graph=True), "use_cuda_graph"),
    ],
    ids=["keep-prompt-false", "value-reserve", "sliding-window", "async", "cuda-graph"],
)
def test_unsupported_settings_are_refused_before_any_work(family, settings, engine_settings, match):
    model = patched_copy(tiny_model(family), budget=BUDGET, recent=RECENT, **settings)
    with pytest.raises(NotImplementedError, match=match):
        model.generate_batch(
            inputs=requests(), generation_config=generation_config(),
            continuous_batching_config=engine_config(**engine_settings),
        )
    assert model.config._attn_implementation == "epikv"


def test_method_not_checked_against_the_engine_is_refused(monkeypatch):
    """A method missing from ``SUPPORTED_METHODS`` (one registered later, say) is refused before any work."""
    monkeypatch.setattr(continuous_batching, "SUPPORTED_METHODS", ("epikv",))
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, method="tova")
    with pytest.raises(NotImplementedError, match="method='tova' is not supported.*Use one of epikv"):
        model.generate_batch(inputs=requests(), generation_config=generation_config())
    assert model.config._attn_implementation == "epikv"


def test_attention_calls_the_session_did_not_see_fail_loudly():
    """Were the engine's attention function replaced after the session wrapped it, a rescoring method's scores
    would go stale: the request fails instead of evicting on them."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, method="tova")
    stream = RequestStream(state_of(model).config, 3, 5, 40, torch.device("cpu"))
    stream.begin_chunk(5)
    with pytest.raises(RuntimeError, match="0 of 3 layers were observed"):
        stream.end_chunk()


def test_prompt_longer_than_keep_prompt_allows_is_refused_up_front():
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, method="epikv")
    with pytest.raises(ValueError, match="keep_prompt=True keeps the whole prompt"):
        model.generate_batch(inputs=[list(range(3, 3 + BUDGET))], generation_config=generation_config())
    assert model.config._attn_implementation == "epikv"


def test_unpatch_restores_continuous_batching():
    model = tiny_model("llama")
    originals = model.init_continuous_batching, model.generate_batch
    epikv_triton.patch(model, budget=8, method="epikv")
    assert "init_continuous_batching" in vars(model) and "generate_batch" in vars(model)
    epikv_triton.unpatch(model)
    assert "init_continuous_batching" not in vars(model) and "generate_batch" not in vars(model)
    assert (model.init_continuous_batching, model.generate_batch) == originals


def test_instance_entry_points_survive_patch_and_unpatch():
    """An ``init_continuous_batching`` the instance already had stays in the call chain, and unpatch puts it back."""
    model = tiny_model("llama")
    calls = []

    def own(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("own entry point")

    model.init_continuous_batching = own
    epikv_triton.patch(model, budget=8, method="epikv")
    with pytest.raises(RuntimeError, match="own entry point"):
        model.init_continuous_batching()
    generation, engine_settings = calls[0][:2]
    assert generation is None and engine_settings.allow_block_sharing is False  # no shared page to evict
    assert model.config._attn_implementation == "epikv"  # switched for the engine, and back when it failed
    epikv_triton.unpatch(model)
    assert model.init_continuous_batching is own


def test_persistent_manager_serves_again_and_requests_end_at_eos():
    """A kept manager serves a second batch (its processor and hooks are reused); a request that meets EOS ends
    there, as with generate."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET, recent=RECENT, method="epikv")
    prompts = requests()[:3]
    expected = [generate_alone(model, prompt)[0] for prompt in prompts]
    eos = expected[1][10]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in expected]
    try:
        for _ in range(2):
            outputs = model.generate_batch(
                inputs=prompts, generation_config=config, continuous_batching_config=engine_config(),
                persistent_manager=True,
            )
            ordered = sorted(outputs.values(), key=lambda output: int(output.request_id.split("_")[1]))
            assert [output.generated_tokens for output in ordered] == expected
            assert model.config._attn_implementation == "epikv"
    finally:
        model.destroy_cached_continuous_batching_manager()
    assert state_of(model).engine_session.stats.eviction_passes > 0


def test_batch_stats_needs_a_patched_model_that_ran_an_engine():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not patched"):
        epikv_triton.batch_stats(model)
    epikv_triton.patch(model, budget=BUDGET, recent=RECENT, method="epikv")
    with pytest.raises(RuntimeError, match="no continuous-batching engine yet"):
        epikv_triton.batch_stats(model)
