"""Throughput at a fixed KV memory: ``pytest perf/test_throughput.py --benchmark``.

The way serving users buy memory: a fixed allowance of KV-cache bytes holds
as many sequences as fit in it. For each cache policy, the largest batch whose
cache fits ``ALLOWANCE_BYTES`` at a ``CONTEXT``-token stream, then the decode
tokens/s at that batch (batch / step time), each as a ratio to the full cache.
The model, the policies and the decode loop are those of
``perf/test_end_to_end.py`` (random-weight Llama shape, greedy steps).

What a sequence costs:

* ``full``: the unpatched model with transformers' ``DynamicCache`` holds every
  token: ``(CONTEXT + STEPS_PER_MEASUREMENT) × bytes per token``, the context
  plus the decode steps the measurement takes (bytes per token:
  ``2 · layers · kv_heads · head_dim · dtype bytes``).
* ``epikv`` at a budget: the slot cache allocates ``budget + evict_every``
  slots per sequence once, each with its K/V in every layer, an int64 position
  and a float32 score, whatever the stream length. The context is read in
  chunks of ``evict_every`` tokens so that the buffer never needs room for a
  longer chunk: it holds exactly what a long generation holds (a read in chunks
  of ``C`` tokens would allocate ``budget + C`` slots).

The arithmetic is checked against the real allocation: after the measurement
the cache's bytes (every ``DynamicCache`` layer's K/V tensors; the slot cache's
``stats().allocated_bytes``) must equal the predicted bytes for the batch and
fit the allowance, or the test fails. Outside the allowance, as outside a
serving system's KV pool: the weights, activations, and the transient copy of
one layer that ``DynamicCache``'s ``torch.cat`` makes each step.

The context is read rather than generated: step time depends on the cache's
size, not on the weights or on which tokens were kept, and reading is far
quicker than thousands of one-token steps.

Sizes, the GPU's chosen after the anchor (R-KV: 13.4× the batch and 9.2× the
tokens/s at 16k output tokens, budget 1024, A100), the CPU's a quarter of it
with the same context-to-budget ratios:

* GPU: 16 GiB, context 16384, budgets 4096 and 1024, the GPU model (bf16).
* CPU: 100 MiB, context 4096, budgets 1024 and 256, the CPU model (fp32),
  the ops' PyTorch twins. Absolute CPU numbers mean little; read the ratios.

Columns: ``batch_vs_full`` and ``tokens_per_s_vs_full`` divide the row's batch
and tokens/s by the full cache's.
"""

from __future__ import annotations

import pytest

from perf import measure
from perf.test_end_to_end import (  # noqa: F401  (model is a fixture)
    DEV,
    DTYPE,
    MODEL_SHAPE,
    ON_GPU,
    READ_CHUNK,
    STEPS_PER_MEASUREMENT,
    Policy,
    measure_step_seconds,
    model,
)

MiB = 2**20
GROUP = "throughput at fixed memory"
EVICT_EVERY = 16  # the amortised cadence; also the read's chunk length, see the module docstring

if ON_GPU:
    ALLOWANCE_BYTES = 16 * 2**30
    CONTEXT = 16384
    BUDGETS = [4096, 1024]
else:
    ALLOWANCE_BYTES = 100 * MiB
    CONTEXT = 4096
    BUDGETS = [1024, 256]

FULL = Policy("full")
POLICIES = [FULL] + [Policy("epikv", budget, evict_every=EVICT_EVERY) for budget in BUDGETS]

KV_BYTES_PER_TOKEN = 2 * MODEL_SHAPE.layers * MODEL_SHAPE.kv_heads * MODEL_SHAPE.head_dim * DTYPE.itemsize
SLOT_METADATA_BYTES = 8 + 4  # the slot cache's int64 position and float32 score of each slot


def bytes_per_sequence(policy: Policy) -> int:
    """KV bytes one sequence holds by the end of the measurement (see the module docstring)."""
    if policy.kind == "full":
        return (CONTEXT + STEPS_PER_MEASUREMENT) * KV_BYTES_PER_TOKEN
    return (policy.budget + policy.evict_every) * (KV_BYTES_PER_TOKEN + SLOT_METADATA_BYTES)


def largest_batch(policy: Policy) -> int:
    batch = ALLOWANCE_BYTES // bytes_per_sequence(policy)
    assert batch >= 1, f"{policy.label}: one sequence needs more than the allowance"
    return batch


# Step seconds and cache bytes per policy, measured once per session (the full cache's anchors the ratios).
_MEASURED: dict[Policy, tuple[float, int]] = {}


def measure_at_largest_batch(model, policy: Policy, benchmark=None) -> tuple[float, int]:
    """Seconds per decode step at the policy's largest batch, and the bytes its cache then held.

    Fails if those bytes are not the predicted ones or exceed the allowance: the
    batch would then not be the largest that fits, and the comparison would be void.
    """
    batch = largest_batch(policy)
    read_chunk = READ_CHUNK if policy.kind == "full" else policy.evict_every
    seconds, held = measure_step_seconds(model, policy, CONTEXT, benchmark, batch=batch, read_chunk=read_chunk)
    predicted = batch * bytes_per_sequence(policy)
    assert held == predicted, f"{policy.label}: the cache held {held} bytes, the arithmetic says {predicted}"
    assert held <= ALLOWANCE_BYTES
    _MEASURED[policy] = seconds, held
    return seconds, held


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("policy", [pytest.param(p, id=p.label) for p in POLICIES])
def test_throughput_at_fixed_memory(benchmark, record, model, policy):
    """Decode tokens/s of ``policy`` at the largest batch its cache fits in ``ALLOWANCE_BYTES``.

    pytest-benchmark times rounds of decode steps after the context is read
    (``measure_step_seconds`` of the end-to-end group); the full cache, first in
    the group, is measured here too when this policy was selected alone (-k).
    """
    seconds, held = measure_at_largest_batch(model, policy, benchmark)
    full_seconds, _ = _MEASURED.get(FULL) or measure_at_largest_batch(model, FULL)
    batch, full_batch = largest_batch(policy), largest_batch(FULL)
    tokens_per_s = batch / seconds
    record(
        GROUP,
        device=measure.device_name(DEV),
        model=MODEL_SHAPE.label,
        allowance_MiB=ALLOWANCE_BYTES // MiB,
        context=CONTEXT,
        method="full (DynamicCache, sdpa)" if policy.kind == "full" else f"{policy.kind}, evict_every {EVICT_EVERY}",
        budget=policy.budget or "-",
        max_batch=batch,
        kv_MiB_per_seq=bytes_per_sequence(policy) / MiB,
        kv_MiB_used=held / MiB,
        step_ms=seconds * 1e3,
        tokens_per_s=tokens_per_s,
        batch_vs_full=batch / full_batch,
        tokens_per_s_vs_full=tokens_per_s / (full_batch / full_seconds),
    )
