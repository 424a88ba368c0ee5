"""A patched model's decode step under ``torch.compile(fullgraph=True)``: compiled once for the whole
stream (recompiling is an error here), eviction inside the graph, the same tokens, kept positions and
statistics as the eager loop; and ``generate(compile_config=...)``, transformers' own compiled path.

The prompt runs eagerly (it sizes the cache), then every decode step runs compiled, past the budget.
Compilation uses ``aot_eager`` (Dynamo + functionalization of every in-place cache update) and, once,
Inductor: what users run.
"""

import pytest
import torch
from transformers import CompileConfig

import epikv_triton

from .models import cached, patched_copy, prompts, tiny_model

BUDGET = 16
STEPS_PAST_BUDGET = 100


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def decode_stream(model, step, prompt, num_steps, eager_tail=0):
    """Greedy tokens ``[B, num_steps + eager_tail]`` and the cache: the prompt eagerly, ``num_steps`` steps
    through ``step``, then ``eager_tail`` more through the uncompiled model (the host reads back the
    counters the compiled steps kept on the device)."""
    cache = epikv_triton.new_cache(model)
    logits = model(**prompt, use_cache=True, **cached(cache)).logits
    tokens = []
    for index in range(num_steps + eager_tail):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(token)
        forward = step if index < num_steps else model
        # The padding mask of the new tokens only (the cache keeps the rest): a fixed shape.
        logits = forward(input_ids=token, attention_mask=torch.ones_like(token), use_cache=True, **cached(cache)).logits
    return torch.cat(tokens, dim=1), cache


def compiled_step(model, backend):
    return torch.compile(model, backend=backend, fullgraph=True)


@pytest.mark.parametrize(
    "family, method, evict_every, backend",
    [
        ("llama", "epikv", 1, "aot_eager"),
        ("qwen2-sliding", "epikv", 1, "aot_eager"),
        ("qwen3", "epikv_flat", 1, "aot_eager"),
        ("llama", "kv", 4, "aot_eager"),
        ("qwen2-sliding", "h2o", 3, "aot_eager"),
        ("llama", "lag_kv", 1, "aot_eager"),
        ("llama", "random", 2, "aot_eager"),
        ("llama", "keydiff", 1, "aot_eager"),
        ("qwen3", "tova", 2, "aot_eager"),
        ("qwen2-sliding", "snapkv", 1, "aot_eager"),
        ("llama", "rkv", 3, "aot_eager"),
        ("llama", "epikv", 1, "inductor"),
    ],
)
def test_compiled_decode_compiles_once_and_matches_eager(family, method, evict_every, backend):
    model = patched_copy(tiny_model(family), budget=BUDGET, method=method, evict_every=evict_every)
    prompt = prompts(2)  # the second sequence is left-padded
    num_steps = BUDGET + STEPS_PAST_BUDGET  # even a sequence with no real prompt token runs 100 past it
    with torch.no_grad():
        expected, eager_cache = decode_stream(model, model, prompt, num_steps, eager_tail=3)
        with torch._dynamo.config.patch(error_on_recompile=True):
            actual, cache = decode_stream(model, compiled_step(model, backend), prompt, num_steps, eager_tail=3)

    stats = cache.stats()
    assert min(s.tokens_evicted for s in stats.sequences) >= STEPS_PAST_BUDGET, "must run past the budget"
    assert torch.equal(actual, expected)
    assert cache.kept_positions() == eager_cache.kept_positions()
    assert stats == eager_cache.stats()


def test_compiled_decode_runs_on_device_counters_without_host_reads():
    """The compiled step leaves the host counters stale (it never reads them) until something asks."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET)
    prompt = prompts(1)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        _, cache = decode_stream(model, compiled_step(model, "aot_eager"), prompt, num_steps=30)
        counters = cache.store.counters
        # The host copy still holds what the eager prompt left (read without syncing).
        assert counters.host_stale and counters._host[1] == prompt["input_ids"].shape[1]
        assert cache.get_seq_length() == prompt["input_ids"].shape[1] + 30
        assert not counters.host_stale and counters.fill == BUDGET


def test_generate_compile_config_compiles_the_decode_step():
    """transformers compiles the decode step over the cache when asked (``compile_config``; on a CPU
    only with its ``_compile_all_devices`` testing flag), and the tokens are the eager ones."""
    model = patched_copy(tiny_model("qwen2-sliding"), budget=BUDGET)
    inputs = prompts(2)
    settings = dict(max_new_tokens=STEPS_PAST_BUDGET, do_sample=False)
    expected = model.generate(**inputs, **settings)
    assert not hasattr(model, "_compiled_call"), "without compile_config, generate must stay eager"
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = model.generate(**inputs, **settings, compile_config=compile_config)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(actual, expected)


def test_generate_refuses_compile_config_with_prefill_chunks_before_any_work():
    """transformers would run every prompt chunk through the compiled call; an EpiKV cache reads its first
    chunk eagerly, so the combination is refused up front, and what the message suggests still runs."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True
    settings = dict(max_new_tokens=5, do_sample=False, compile_config=compile_config)
    with pytest.raises(ValueError, match="prefill_chunk_size.*compile_config.*disable_compile=True"):
        model.generate(**prompts(2), **settings, prefill_chunk_size=4)
    assert not hasattr(model, "_compiled_call")
    expected = model.generate(**prompts(2), max_new_tokens=5, do_sample=False, prefill_chunk_size=4)
    assert torch.equal(model.generate(**prompts(2), **settings, prefill_chunk_size=4, disable_compile=True), expected)


@pytest.mark.parametrize("evict_every", [1, 3])
def test_compiled_chunks_of_several_tokens_match_eager(evict_every):
    """Chunks of 4 tokens compile too, given the room the refusal below names (``chunk_size``)."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET, evict_every=evict_every)
    chunk_tokens = 4

    def stream(step):
        cache = epikv_triton.new_cache(model, chunk_size=chunk_tokens + evict_every - 1)
        logits = model(**prompts(2), use_cache=True, **cached(cache)).logits
        tokens = []
        for _ in range(BUDGET):
            token = logits[:, -1:].argmax(dim=-1)
            tokens.append(token)
            chunk = token.repeat(1, chunk_tokens)
            logits = step(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=True, **cached(cache))
            logits = logits.logits
        return torch.cat(tokens, dim=1), cache

    with torch.no_grad():
        expected, eager_cache = stream(model)
        with torch._dynamo.config.patch(error_on_recompile=True):
            actual, cache = stream(compiled_step(model, "aot_eager"))
    assert min(s.tokens_evicted for s in cache.stats().sequences) > BUDGET
    assert torch.equal(actual, expected)
    assert cache.stats() == eager_cache.stats()


@pytest.mark.parametrize(
    "method, new_tokens, message",
    [
        ("epikv", 2, "compiled chunk holds at most 1 tokens"),  # one spare slot: budget + evict_every 1
        ("full", 1, "method='full' cannot run under torch.compile"),
    ],
)
def test_compiled_chunk_the_cache_cannot_serve_raises(method, new_tokens, message):
    model = patched_copy(tiny_model("llama"), budget=BUDGET, method=method)
    cache = epikv_triton.new_cache(model)
    prompt = prompts(1)
    with torch.no_grad():
        model(**prompt, use_cache=True, **cached(cache))
        with pytest.raises(Exception, match=message):
            step = compiled_step(model, "eager")
            step(input_ids=prompt["input_ids"][:, :new_tokens], use_cache=True, **cached(cache))


def test_compiled_decode_on_the_kernels(monkeypatch):
    """The same, through the Triton kernels (the interpreter without a GPU): attention over the whole
    buffer bounded by the device ``slot_count``, the z-score and the compaction kernels in the graph."""
    monkeypatch.setenv("EPIKV_BACKEND", "triton")
    model = patched_copy(tiny_model("qwen2-sliding"), budget=BUDGET, evict_every=2)
    prompt = prompts(2)
    num_steps = 14  # past the budget for both sequences (12 and 7 real prompt tokens)
    with torch.no_grad():
        expected, eager_cache = decode_stream(model, model, prompt, num_steps)
        with torch._dynamo.config.patch(error_on_recompile=True):
            actual, cache = decode_stream(model, compiled_step(model, "aot_eager"), prompt, num_steps)
    assert min(s.tokens_evicted for s in cache.stats().sequences) > 2
    assert torch.equal(actual, expected)
    assert cache.kept_positions() == eager_cache.kept_positions()


def cache_tensors(root) -> dict[str, torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes, lists, tuples and dicts, by path."""
    found, seen = {}, set()

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            found.setdefault(path, value)
        elif id(value) in seen or isinstance(value, (str, int, float, bool, type(None), torch.nn.Module)):
            return
        elif isinstance(value, (list, tuple)):
            seen.add(id(value))
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")
        elif isinstance(value, dict):
            seen.add(id(value))
            for key, item in value.items():
                walk(item, f"{path}[{key!r}]")
        elif hasattr(value, "__dict__"):
            seen.add(id(value))
            for name, item in vars(value).items():
                walk(item, f"{path}.{name}")

    walk(root, "store")
    return found


@pytest.mark.parametrize("method", ["epikv", "kv", "h2o", "lag_kv", "rkv"])
def test_state_a_compiled_step_updates_in_place_is_marked_static(method):
    """CUDA-graph capture (``mode="reduce-overhead"``) skips a graph that mutates an input it does not
    know to be static: every cache tensor a compiled step updates in place must carry the mark."""
    model = patched_copy(tiny_model("llama"), budget=BUDGET, method=method)
    cache = epikv_triton.new_cache(model)
    prompt = prompts(2)
    step = compiled_step(model, "aot_eager")
    token = prompt["input_ids"][:, -1:]
    with torch.no_grad():
        model(**prompt, use_cache=True, **cached(cache))
        for _ in range(BUDGET):  # to the budget, so the measured step evicts
            step(input_ids=token, use_cache=True, **cached(cache))
        before = {path: (tensor, tensor._version) for path, tensor in cache_tensors(cache.store).items()}
        step(input_ids=token, use_cache=True, **cached(cache))
    updated = [path for path, (tensor, version) in before.items() if tensor._version != version]
    assert {"store.buffers.kv", "store.buffers.pos", "store.buffers.scores", "store.counters._device"} <= set(updated)
    unmarked = [path for path in updated if not hasattr(before[path][0], "_dynamo_static_input_type")]
    assert not unmarked, f"updated in place but not marked static: {unmarked}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("backend", ["cudagraphs", "inductor"])
def test_cuda_graph_replay_matches_eager(backend):
    """The decode step captured as a CUDA graph and replayed (``cudagraphs``: the eager kernels, captured;
    ``inductor`` with ``mode="reduce-overhead"``), 100 steps past the budget: no capture skipped, one
    compile, the eager tokens."""
    from torch._dynamo.utils import counters

    model = patched_copy(tiny_model("qwen2-sliding"), budget=BUDGET, evict_every=2).cuda()
    prompt = {name: tensor.cuda() for name, tensor in prompts(2).items()}
    num_steps = BUDGET + STEPS_PAST_BUDGET
    mode = "reduce-overhead" if backend == "inductor" else None
    counters.clear()
    with torch.no_grad():
        expected, eager_cache = decode_stream(model, model, prompt, num_steps)
        with torch._dynamo.config.patch(error_on_recompile=True):
            step = torch.compile(model, backend=backend, mode=mode, fullgraph=True)
            actual, cache = decode_stream(model, step, prompt, num_steps)
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA-graph capture was skipped"
    assert torch.equal(actual, expected)
    assert cache.kept_positions() == eager_cache.kept_positions()
