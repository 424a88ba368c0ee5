"""What keeping a budget costs: ``pytest perf/test_eviction.py --benchmark``.

Groups:

* ``eviction bytes``: bytes the eviction moves per decode step for the
  Llama-3-8B cache shape (32 layers, 8 KV heads of 128, bf16: 128 KiB of K/V
  per token) at budget 4096, **counted, not timed**: a synthetic cache with
  no K/V planes runs the real selection, plan and compaction of its slot
  metadata for ``DECODE_STEPS`` steps, and every slot the plan moves costs a
  read and a write of its 128 KiB (plus the plan and metadata bytes). Next to
  it, the attention's read of the same cache per step
  (``budget × 2 × 32 × 8 × 128 × 2`` bytes) and what the shifting compaction
  this replaced would have moved on the same kept sets (every kept slot after
  the first evicted one, in stream order). Score patterns: ``uniform``
  (random scores: the evicted token is anywhere), ``oldest`` (streaming: the
  oldest unprotected token, the worst case of a shifting compaction) and
  ``newest`` (the youngest token outside the recent window).
* ``eviction decode step``: the decode step of the end-to-end model
  (``perf/test_end_to_end.py``, whose machinery this reuses) at budget 512
  with ``evict_every=1`` and ``16`` against the full cache, at 4k and 8k
  context on a CPU (32k at budget 4096 on a GPU). ``vs_every16`` = the
  ``evict_every=16`` step time / this one: the goal is ``evict_every=1``
  within 10% of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from epikv_triton import ops
from perf import measure
from perf.test_end_to_end import (  # noqa: F401  (model is a fixture)
    BATCH,
    MODEL_SHAPE,
    ON_GPU,
    Policy,
    measure_step_seconds,
    model,
)

DEV = measure.device()

# --------------------------------------------------------------------------- #
# Bytes moved per decode step, counted
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class CacheShape:
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    itemsize: int = 2  # bf16

    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    @property
    def label(self) -> str:
        return f"L{self.layers} Hkv{self.kv_heads} D{self.head_dim} bf16"


LLAMA_3_8B = CacheShape()
BUDGET, SINK, RECENT = 4096, 4, 128
DECODE_STEPS = 256
# Slot metadata per released slot: destination read (8 B); per moved slot: position and score read and
# written (2 × 12 B); per released slot: position and score cleared (12 B).
PLAN_BYTES, MOVED_METADATA_BYTES, CLEARED_METADATA_BYTES = 8, 24, 12


def next_score(pattern: str, position: int, generator: torch.Generator) -> float:
    if pattern == "uniform":
        return float(torch.rand((), generator=generator))
    return float(position if pattern == "oldest" else -position)


def count_moves(pattern: str, every: int) -> dict:
    """Decode ``DECODE_STEPS`` tokens into a full synthetic cache; returns slots moved (hole-filling and
    shifting), slots released and evictions, summed over the steps."""
    generator = torch.Generator().manual_seed(0)
    capacity = BUDGET + every
    kv = torch.empty(0, 1, 1, capacity, 1)  # no K/V planes: the metadata carries the whole plan
    pos = torch.full((1, capacity), -1, dtype=torch.int64)
    scores = torch.full((1, capacity), float("nan"))
    fill = BUDGET
    pos[0, :fill] = torch.arange(fill)
    scores[0, :fill] = torch.tensor([next_score(pattern, p, generator) for p in range(fill)])
    totals = dict(moved=0, shifted=0, released=0, evictions=0)
    for step in range(DECODE_STEPS):
        position = BUDGET + step
        pos[0, fill], scores[0, fill] = position, next_score(pattern, position, generator)
        fill += 1
        if fill < BUDGET + every:
            continue
        keep = ops.select_slots(scores[:, :fill], pos[:, :fill], BUDGET, protect_prefix=SINK, recent=RECENT)
        destination = ops.compaction_plan(keep, BUDGET)
        totals["shifted"] += shifted_slots(pos[0, :fill], keep[0])
        ops.compact_slots_(kv[:, :, :, :fill], pos[:, :fill], scores[:, :fill], destination)
        totals["moved"] += int((destination >= 0).sum())
        totals["released"] += destination.shape[1]
        totals["evictions"] += 1
        fill = BUDGET
    return totals


def shifted_slots(pos: torch.Tensor, keep: torch.Tensor) -> int:
    """Slots a compaction that keeps stream order moves: every kept token younger than the oldest evicted one."""
    oldest_evicted = pos[~keep].min()
    return int((keep & (pos > oldest_evicted)).sum())


@pytest.mark.benchmark(group="eviction bytes")
@pytest.mark.parametrize("every", [1, 16])
@pytest.mark.parametrize("pattern", ["uniform", "oldest", "newest"])
def test_eviction_bytes_per_decode_step(record, pattern, every):
    totals = count_moves(pattern, every)
    slot = LLAMA_3_8B.bytes_per_slot
    moved_bytes = (
        2 * slot * totals["moved"]
        + (PLAN_BYTES + CLEARED_METADATA_BYTES) * totals["released"]
        + MOVED_METADATA_BYTES * totals["moved"]
    )
    attention_bytes = BUDGET * slot
    per_step = moved_bytes / DECODE_STEPS
    record(
        "eviction bytes",
        cache=LLAMA_3_8B.label,
        budget=BUDGET,
        scores=pattern,
        evict_every=every,
        slots_moved_per_step=totals["moved"] / DECODE_STEPS,
        eviction_MiB_per_step=per_step / 2**20,
        attention_read_MiB=attention_bytes / 2**20,
        eviction_vs_attention_pct=100 * per_step / attention_bytes,
        shifting_MiB_per_step=2 * slot * totals["shifted"] / DECODE_STEPS / 2**20,
    )
    assert totals["evictions"] == DECODE_STEPS // every


# --------------------------------------------------------------------------- #
# Decode step: evict_every 1 vs 16 vs the full cache
# --------------------------------------------------------------------------- #

if ON_GPU:
    CONTEXTS, STEP_BUDGET = [32768], 4096
else:
    CONTEXTS, STEP_BUDGET = [4096, 8192], 512
STEP_POLICIES = [Policy("full"), Policy("epikv", STEP_BUDGET, evict_every=16), Policy("epikv", STEP_BUDGET)]

_STEP_SECONDS: dict[tuple[int, str], float] = {}


@pytest.mark.benchmark(group="eviction decode step")
@pytest.mark.parametrize(
    "context, policy", [pytest.param(n, p, id=f"N{n}-{p.label}") for n in CONTEXTS for p in STEP_POLICIES]
)
def test_decode_step_by_eviction_cadence(benchmark, record, model, context, policy):  # noqa: F811
    seconds, held = measure_step_seconds(model, policy, context, benchmark)
    _STEP_SECONDS[(context, policy.label)] = seconds
    full = _STEP_SECONDS.get((context, STEP_POLICIES[0].label), float("nan"))
    every16 = _STEP_SECONDS.get((context, STEP_POLICIES[1].label), float("nan"))
    record(
        "eviction decode step",
        device=measure.device_name(DEV),
        model=MODEL_SHAPE.label,
        batch=BATCH,
        context=context,
        policy=policy.label,
        step_ms=seconds * 1e3,
        kv_MiB=held / 2**20,
        vs_every16=every16 / seconds,
        vs_full=full / seconds,
    )
