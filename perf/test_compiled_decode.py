"""Compiled decoding: ``pytest perf/test_compiled_decode.py --benchmark``.

At small batch an eager decode step is hundreds of kernel launches driven
from Python, so serving stacks compile it (and, on a GPU, replay it as a CUDA
graph). This group times one greedy decode step, after a context of N tokens
has been read, for:

* ``full, static cache + compile``: the unpatched model with transformers'
  ``StaticCache`` (sized for the context and the measured steps) under
  ``torch.compile(fullgraph=True)``: what a user without this library runs
  for speed. The anchor of ``vs_static_compiled``.
* ``full, DynamicCache``: the unpatched model, eager.
* ``epikv @ budget``, eager and compiled (``evict_every`` 1 and 16): the
  patched model; compiled, the whole step (eviction included) is one graph.

The model, sizes and the eager policies are those of ``test_end_to_end.py``
(random-weight Llama shape; the ops' PyTorch twins on a CPU). Compiled steps
use Inductor, with ``mode="reduce-overhead"`` (CUDA graphs) on a GPU. Each
compiled step gets the new token's position as a device tensor advanced in
place, as a compiled loop must (a Python int would be a new constant each
step). The patched model reads its context in chunks of 16 tokens, so its
buffer holds ``budget + 16`` slots: the compiled step attends over the whole
buffer (the GPU kernels skip the key tiles past the fill; the CPU twin
computes them, masked), the eager step over the slots in use.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pytest
import torch
from transformers import StaticCache

from perf import measure
from perf.test_end_to_end import (  # noqa: F401  (model is a fixture)
    DEV,
    MEASURED_ROUNDS,
    MODEL_SHAPE,
    ON_GPU,
    READ_CHUNK,
    STEPS_PER_MEASUREMENT,
    STEPS_PER_ROUND,
    GreedyDecoder,
    Policy,
    fresh_cache,
    model,
    random_tokens,
)

GROUP = "compiled decode"
EPIKV_READ_CHUNK = 16

if ON_GPU:
    CONTEXTS, BATCHES, BUDGET = [8192, 32768], [1, 16], 4096
else:
    CONTEXTS, BATCHES, BUDGET = [4096], [1], 512

# (test id, label, cache policy or None for transformers' StaticCache, compiled). The ids avoid the word
# "static", so `-k static` selects the static compile report alone.
RUNS = [
    ("hf-compiled", "full, static cache + compile", None, True),
    ("full", "full, DynamicCache", Policy("full"), False),
    ("epikv", f"epikv @ {BUDGET}", Policy("epikv", BUDGET), False),
    ("epikv-compiled", f"epikv @ {BUDGET}, compiled", Policy("epikv", BUDGET), True),
    ("epikv-e16", f"epikv @ {BUDGET}, evict_every 16", Policy("epikv", BUDGET, evict_every=16), False),
    (
        "epikv-e16-compiled", f"epikv @ {BUDGET}, evict_every 16, compiled",
        Policy("epikv", BUDGET, evict_every=16), True,
    ),
]

# The static-cache step time per (context, batch), measured first.
_ANCHOR_SECONDS: dict[tuple[int, int], float] = {}


class PositionedDecoder(GreedyDecoder):
    """Reads the context through the eager model, then decodes through ``step`` with explicit
    ``position_ids``, a device tensor advanced in place after each step."""

    def __init__(self, model, cache, step: Callable, batch: int, context: int):
        super().__init__(model, cache)
        self.step = step
        self.position = torch.full((batch, 1), context, dtype=torch.int64, device=DEV)

    def steps(self, count: int) -> None:
        for _ in range(count):
            out = self.step(
                input_ids=self.next_token, position_ids=self.position, **self.cache_kwargs, use_cache=True,
                logits_to_keep=1,
            )
            self.next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            self.position += 1


@contextlib.contextmanager
def run_cache(model, policy: Policy | None, context: int) -> Iterator:
    if policy is None:
        yield StaticCache(config=model.config, max_cache_len=context + STEPS_PER_MEASUREMENT)
    else:
        with fresh_cache(model, policy) as cache:
            yield cache


def step_seconds(model, policy: Policy | None, compiled: bool, context: int, batch: int, benchmark) -> float:
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, mode="reduce-overhead" if ON_GPU else None) if compiled else model
    read_chunk = READ_CHUNK if policy is None or policy.kind == "full" else EPIKV_READ_CHUNK
    with torch.inference_mode(), run_cache(model, policy, context) as cache:
        decoder = PositionedDecoder(model, cache, step, batch, context)
        decoder.read(random_tokens(context, seed=context, batch=batch), chunk=read_chunk)
        measure.synchronize(DEV)
        # The first round (warm-up, not timed) compiles and, with CUDA graphs, records.
        seconds = measure.bench(benchmark, lambda: decoder.steps(STEPS_PER_ROUND), DEV, rounds=MEASURED_ROUNDS)
    torch._dynamo.reset()
    return seconds / STEPS_PER_ROUND


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize(
    "context, batch, run",
    [pytest.param(n, b, r[1:], id=f"N{n}-B{b}-{r[0]}") for n in CONTEXTS for b in BATCHES for r in RUNS],
)
def test_compiled_decode(benchmark, record, model, context, batch, run):
    label, policy, compiled = run
    with torch._dynamo.config.patch(error_on_recompile=True):
        seconds = step_seconds(model, policy, compiled, context, batch, benchmark)
    if policy is None:
        _ANCHOR_SECONDS[(context, batch)] = seconds
    anchor = _ANCHOR_SECONDS.get((context, batch))
    record(
        GROUP,
        device=measure.device_name(DEV),
        model=MODEL_SHAPE.label,
        context=context,
        batch=batch,
        run=label,
        step_ms=seconds * 1e3,
        tokens_per_s=batch / seconds,
        vs_static_compiled="-" if anchor is None else anchor / seconds,
    )
