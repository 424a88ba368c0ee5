"""transformers' continuous batching at a fixed page pool: ``pytest perf/test_continuous_batching.py --benchmark``.

A serving engine's KV memory is a pool of pages. ``model.generate_batch`` serves
``REQUESTS`` requests of ``PROMPT`` prompt tokens and ``NEW_TOKENS`` new tokens
each from a pool of ``POOL_PAGES`` pages of ``PAGE`` tokens, greedy, for:

* ``engine``: the unpatched model, transformers' engine as it ships (tokens/s
  only: nothing here watches its pages);
* ``full``: the model patched with ``method="full"``: the same engine, every
  token kept, the hooks only watching;
* ``epikv`` and ``tova`` (the default method) at ``BUDGET``: each request
  reserves ``ceil((budget + evict_every) / page)`` pages when admitted and
  never holds more (``tova`` also attends once more per layer, to score).

Per forward the hooks record the requests in it and the pages held; a row
reports the requests per forward (peak and mean), the pages held at the peak,
the forwards taken and the generated tokens per second of the whole call.
A second test serves one long request alone and reports the pool's free pages
at a quarter, half and the end of its generation: flat for a bounded request,
falling for the full cache.

The model is the end-to-end group's random-weight Llama shape
(``perf/test_end_to_end.py``). On a CPU the engine runs eagerly with the ops'
PyTorch twins; read the ratios, not the absolute tokens/s.
"""

from __future__ import annotations

import time

import pytest
from transformers import ContinuousBatchingConfig, GenerationConfig

import epikv_triton
from epikv_triton.integrations import continuous_batching, engine
from perf import measure
from perf.test_end_to_end import DEV, MODEL_SHAPE, ON_GPU, model  # noqa: F401  (model is a fixture)

GROUP = "continuous batching at a fixed page pool"
EVICT_EVERY = 16

if ON_GPU:
    PAGE, POOL_PAGES, MAX_BATCH_TOKENS = 64, 1024, 2048
    REQUESTS, PROMPT, NEW_TOKENS, BUDGET = 64, 512, 4096, 1024
    LONG_NEW_TOKENS = 16384
else:
    PAGE, POOL_PAGES, MAX_BATCH_TOKENS = 16, 64, 256
    REQUESTS, PROMPT, NEW_TOKENS, BUDGET = 16, 64, 256, 128
    LONG_NEW_TOKENS = 768  # 52 of the 64 pages for the full cache

POLICIES = ("engine", "full", "epikv", "tova")


def prompts(count: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, MODEL_SHAPE.vocab, (PROMPT,), generator=generator).tolist() for _ in range(count)]


class ForwardLog:
    """Requests and pages held at each forward of the engine, read where the hooks open a forward."""

    def __init__(self, monkeypatch):
        self.requests: list[int] = []
        self.pages: list[int] = []
        begin = continuous_batching.EngineSession.begin_forward
        log = self

        def logged(session, kwargs):
            begin(session, kwargs)
            log.requests.append(len(session.running))
            log.pages.append(engine.pages_in_use(session.allocator))

        monkeypatch.setattr(continuous_batching.EngineSession, "begin_forward", logged)


def serve(model, policy: str, requests: list[list[int]], new_tokens: int) -> tuple[float, dict]:
    """``generate_batch`` under ``policy``: seconds of the whole call and its outputs."""
    if policy != "engine":
        settings = dict(method="full") if policy == "full" else dict(method=policy, budget=BUDGET)
        epikv_triton.patch(model, evict_every=EVICT_EVERY, **settings)
    try:
        start = time.perf_counter()
        outputs = model.generate_batch(
            inputs=requests,
            generation_config=GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                               pad_token_id=0),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=PAGE, num_blocks=POOL_PAGES, max_batch_tokens=MAX_BATCH_TOKENS
            ),
            progress_bar=False, warmup=False,  # the same forwards for every policy: no dummy batches
        )
        measure.synchronize(DEV)
        return time.perf_counter() - start, outputs
    finally:
        if policy != "engine":
            epikv_triton.unpatch(model)


def setting_columns(policy: str, requests: int, new_tokens: int) -> dict:
    """The columns that say what a row ran."""
    return dict(
        device=measure.device_name(DEV),
        model=MODEL_SHAPE.label,
        pool=f"{POOL_PAGES} pages x {PAGE}",
        requests=f"{requests} x ({PROMPT} + {new_tokens})",
        policy="engine (unpatched)" if policy == "engine" else policy,
        budget="-" if policy in ("engine", "full") else BUDGET,
    )


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("policy", POLICIES)
def test_requests_in_flight_at_a_fixed_pool(benchmark, record, model, monkeypatch, policy):  # noqa: F811
    log = ForwardLog(monkeypatch)
    requests = prompts(REQUESTS)
    seconds, outputs = benchmark.pedantic(lambda: serve(model, policy, requests, NEW_TOKENS), rounds=1, iterations=1)
    generated = sum(len(output.generated_tokens) for output in outputs.values())
    assert generated == REQUESTS * NEW_TOKENS, "every request must run to max_new_tokens"
    watched = policy != "engine"
    record(
        GROUP,
        **setting_columns(policy, REQUESTS, NEW_TOKENS),
        peak_requests_per_forward=max(log.requests) if watched else "-",
        mean_requests_per_forward=sum(log.requests) / len(log.requests) if watched else "-",
        peak_pages_held=max(log.pages) if watched else "-",
        forwards=len(log.requests) if watched else "-",
        seconds=seconds,
        tokens_per_s=generated / seconds,
    )


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("policy", ("full", "epikv", "tova"))
def test_free_pages_over_one_long_request(benchmark, record, model, monkeypatch, policy):  # noqa: F811
    log = ForwardLog(monkeypatch)
    seconds, _ = benchmark.pedantic(
        lambda: serve(model, policy, prompts(1), LONG_NEW_TOKENS), rounds=1, iterations=1
    )
    free = [POOL_PAGES - held for held in log.pages]
    record(
        GROUP,
        **setting_columns(policy, 1, LONG_NEW_TOKENS),
        **{"free_pages_at_1/4": free[len(free) // 4], "free_pages_at_1/2": free[len(free) // 2]},
        free_pages_at_end=free[-1],
        min_free_pages=min(free),
        seconds=seconds,
    )
