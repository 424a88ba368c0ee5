"""End-to-end decoding perf: ``pytest perf/test_end_to_end.py --benchmark``.

A Llama-shaped model with **random weights** built from ``LlamaConfig``: speed
and memory do not depend on the weights, and generation quality is not
measured here (``python -m epikv_triton compare`` does that on real models).

* GPU: 16 layers, hidden 2048, 32 query / 8 KV heads of 128, vocab 128256,
  bf16, batch 4, the Triton kernels.
* CPU: 6 layers, hidden 256, 8 query / 4 KV heads of 64, vocab 1024, fp32,
  batch 1, the ops' PyTorch twins (``EPIKV_BACKEND=torch`` is forced so
  Triton's interpreter never runs here). Absolute CPU numbers mean little;
  read the ratios.

Cache policies, each fed the same random tokens:

* ``full``: the unpatched model with transformers' ``DynamicCache`` and SDPA,
  what a user has without this library. The anchor of every ratio.
* ``epikv`` / ``h2o`` at a budget: the model patched by ``epikv_triton.patch``
  with ``keep_prompt=False`` (a context longer than the budget is read in
  chunks with bounded memory). ``evict_every > 1`` amortises the compaction.
  ``h2o`` on the CPU path materialises each call's attention probabilities
  (the eager H2O); on a GPU it is the fused two-pass column sums.
* ``per-step gather``: :class:`PerStepGatherCache` below, the memory-traffic
  pattern of the research code (concatenate, then index, every step).

Groups:

* ``decode step``: time of one greedy decode step once a context of N tokens
  has been read (chunks of 512 tokens), the median of 5 rounds of
  ``STEPS_PER_ROUND`` steps (a round is long enough for ``evict_every`` to
  include its compaction). ``vs_full`` = full step time / step time.
* ``decode vs generated length``: one greedy generation from a 16-token prompt
  per policy; at each checkpoint the KV bytes held and the tokens/s of the
  segment since the previous checkpoint (and, on a GPU, the allocator's peak).
  ``EPIKV_PERF_GENERATED`` sets the longest generated length (default 4096
  on CPU, 8192 on GPU; the GPU target is measured with 32768).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

import epikv_triton
from epikv_triton.integrations.transformers_cache import EpiKVCache
from perf import measure

DEV = measure.device()
ON_GPU = DEV.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
MiB = 2**20

BATCH = 4 if ON_GPU else 1
READ_CHUNK = 512  # tokens per forward when a context is read (chunked prefill)
STEPS_PER_ROUND = 32 if ON_GPU else 16
MEASURED_ROUNDS = 5
# Decode steps one measure_step_seconds call takes: a warm-up round, then the measured rounds.
STEPS_PER_MEASUREMENT = (1 + MEASURED_ROUNDS) * STEPS_PER_ROUND
PROMPT_TOKENS = 16
MAX_GENERATED = int(os.environ.get("EPIKV_PERF_GENERATED", 8192 if ON_GPU else 4096))
CHECKPOINTS = [MAX_GENERATED >> 3, MAX_GENERATED >> 2, MAX_GENERATED >> 1, MAX_GENERATED]


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def label(self) -> str:
        return (
            f"Llama L{self.layers} d{self.hidden} H{self.q_heads}/{self.kv_heads}x{self.head_dim} "
            f"V{self.vocab}, random weights"
        )

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.q_heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=1 << 17,
            rope_theta=500000.0,
            attn_implementation="sdpa",
        )


if ON_GPU:
    # Llama-3.2-1B-like widths with 128-wide heads (the kernels' performance target).
    MODEL_SHAPE = ModelShape(16, 2048, 8192, 32, 8, 128, 128256)
else:
    # 6 layers: the shallowest depth whose default EpiKV bands are disjoint.
    MODEL_SHAPE = ModelShape(6, 256, 688, 8, 4, 64, 1024)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(DEV):
        built = LlamaForCausalLM(MODEL_SHAPE.config())
    return built.to(DTYPE).eval()


def random_tokens(length: int, seed: int, batch: int = BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODEL_SHAPE.vocab, (batch, length), generator=generator).to(DEV)


# --------------------------------------------------------------------------- #
# The per-step gather policy (a model of the research code, not a shipped method)
# --------------------------------------------------------------------------- #


class PerStepGatherLayer(DynamicLayer):
    """One layer of :class:`PerStepGatherCache`: ``DynamicLayer``'s ``torch.cat``, then a gather to the kept set."""

    def __init__(self, owner: "PerStepGatherCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.layer_idx == 0:
            self.owner.choose_kept(key_states)
        keys, values = super().update(key_states, value_states)  # fresh [B, H, kept + T, D] tensors
        keep = self.owner.keep
        if keep is not None:
            index = keep[:, None, :, None].expand(keys.shape[0], keys.shape[1], keep.shape[1], keys.shape[3])
            self.keys, self.values = keys.gather(2, index), values.gather(2, index)  # fresh again, every step
        if self.layer_idx == self.owner.num_layers - 1:
            self.owner.seen += key_states.shape[2]
        # This step's queries attend over everything, the new tokens included; eviction applies from the next step.
        return keys, values

    def get_seq_length(self) -> int:
        return self.owner.seen  # tokens seen, so transformers derives true positions (RoPE) from it

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Kept tokens are all in the past of every new query; the offset makes the new ones causal among themselves.
        kept = super().get_seq_length()
        return kept + query_length, self.owner.seen - kept


class PerStepGatherCache(Cache):
    """Bounded cache with the per-step gather of the research code (cat + index every step).

    What it models: the per-step gather of the authors' research code (their
    own notes call it its main throughput bottleneck): the cache kept as plain
    tensors, each step's keys/values appended with ``torch.cat``, then the cache indexed down to
    the kept tokens, so every layer copies its whole kept cache twice per step
    (one fresh tensor from the cat, one from the gather), where the slot cache
    writes the new token in place and compacts in place.
    Only this memory traffic is modelled; which tokens stay barely changes it:
    ``sink`` first and ``recent`` last tokens, the rest by the lowest mean key
    norm of layer 0 (a cheap score, KnormPress-like), one decision per token
    for every layer, re-ranked every step. Its generation quality is not
    measured. Positions stay true: ``get_seq_length`` counts tokens seen.
    """

    def __init__(self, num_layers: int, budget: int, sink: int = 4, recent: int | None = None):
        self.num_layers = num_layers
        self.budget = budget
        self.sink = sink
        self.recent = min(128, budget // 4) if recent is None else recent
        self.seen = 0
        self.scores: torch.Tensor | None = None  # [B, kept] of the kept tokens, in stream order
        self.keep: torch.Tensor | None = None  # [B, budget] indices into this step's concatenated cache
        super().__init__(layers=[PerStepGatherLayer(self, i) for i in range(num_layers)])

    def choose_kept(self, new_keys: torch.Tensor) -> None:
        new_scores = -torch.linalg.vector_norm(new_keys.float(), dim=-1).mean(dim=1)  # [B, T]
        scores = new_scores if self.scores is None else torch.cat([self.scores, new_scores], dim=1)
        length = scores.shape[1]
        if length <= self.budget:
            self.scores, self.keep = scores, None
            return
        device = scores.device
        batch = scores.shape[0]
        middle = scores[:, self.sink : length - self.recent]
        best = middle.topk(self.budget - self.sink - self.recent, dim=1).indices.sort(dim=1).values + self.sink
        sink = torch.arange(self.sink, device=device).expand(batch, -1)
        recent = torch.arange(length - self.recent, length, device=device).expand(batch, -1)
        self.keep = torch.cat([sink, best, recent], dim=1)
        self.scores = scores.gather(1, self.keep)


# --------------------------------------------------------------------------- #
# Policies and the decode loop
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Policy:
    kind: str  # "full", "gather", or an EpiKV method ("epikv", "h2o")
    budget: int | None = None
    evict_every: int = 1

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full (DynamicCache, sdpa)"
        name = "per-step gather (cat + index)" if self.kind == "gather" else self.kind
        if self.kind == "h2o" and not ON_GPU:
            name = "h2o (eager probabilities)"
        cadence = f", evict_every {self.evict_every}" if self.evict_every > 1 else ""
        return f"{name} @ {self.budget}{cadence}"


@contextlib.contextmanager
def fresh_cache(model: LlamaForCausalLM, policy: Policy) -> Iterator[Cache]:
    """A new cache for ``policy``; the EpiKV methods patch the model for the duration and unpatch after."""
    if policy.kind == "full":
        yield DynamicCache(config=model.config)
    elif policy.kind == "gather":
        yield PerStepGatherCache(model.config.num_hidden_layers, policy.budget)
    else:
        epikv_triton.patch(
            model, method=policy.kind, budget=policy.budget, evict_every=policy.evict_every, keep_prompt=False
        )
        try:
            yield epikv_triton.new_cache(model)
        finally:
            epikv_triton.unpatch(model)


def kv_bytes(cache: Cache) -> int:
    """Physical bytes of the cache: the slot buffers for ours, every layer's K/V tensors otherwise."""
    if isinstance(cache, EpiKVCache):
        return cache.stats().allocated_bytes
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
        if layer.is_initialized
    )


class GreedyDecoder:
    """Feeds ``model`` through one cache: a context in chunks, then greedy decode steps."""

    def __init__(self, model: LlamaForCausalLM, cache: Cache):
        self.model = model
        self.cache_kwargs = {epikv_triton.cache_keyword(model): cache}
        self.next_token: torch.Tensor | None = None

    def _forward(self, input_ids: torch.Tensor) -> None:
        # logits_to_keep=1: only the last position's logits, as generate computes them.
        out = self.model(input_ids=input_ids, **self.cache_kwargs, use_cache=True, logits_to_keep=1)
        self.next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)

    def read(self, tokens: torch.Tensor, chunk: int = READ_CHUNK) -> None:
        for start in range(0, tokens.shape[1], chunk):
            self._forward(tokens[:, start : start + chunk])

    def steps(self, count: int) -> None:
        for _ in range(count):
            self._forward(self.next_token)


# --------------------------------------------------------------------------- #
# Decode step at a fixed context
# --------------------------------------------------------------------------- #

if ON_GPU:
    CONTEXTS = [32768]
    STEP_POLICIES = [
        Policy("full"),
        Policy("epikv", 4096),
        Policy("epikv", 4096, evict_every=16),
        Policy("epikv", 512),
        Policy("h2o", 4096),
        Policy("gather", 4096),
    ]
else:
    CONTEXTS = [4096, 8192]
    STEP_POLICIES = [
        Policy("full"),
        Policy("epikv", 512),
        Policy("epikv", 512, evict_every=16),
        Policy("h2o", 512),
        Policy("gather", 512),
    ]

# Full-cache step time per context, measured first in each context's run.
_FULL_STEP_SECONDS: dict[int, float] = {}


def measure_step_seconds(
    model, policy: Policy, context: int, benchmark=None, batch: int = BATCH, read_chunk: int = READ_CHUNK
) -> tuple[float, int]:
    """Seconds per decode step after reading ``context`` tokens, and the cache bytes then held.

    The cache has then taken ``STEPS_PER_MEASUREMENT`` decode steps beyond the context.
    """
    with torch.inference_mode(), fresh_cache(model, policy) as cache:
        decoder = GreedyDecoder(model, cache)
        decoder.read(random_tokens(context, seed=context, batch=batch), chunk=read_chunk)
        measure.synchronize(DEV)
        if benchmark is None:
            seconds = measure.median_seconds(lambda: decoder.steps(STEPS_PER_ROUND), DEV, repeats=MEASURED_ROUNDS)
        else:
            seconds = measure.bench(benchmark, lambda: decoder.steps(STEPS_PER_ROUND), DEV, rounds=MEASURED_ROUNDS)
        return seconds / STEPS_PER_ROUND, kv_bytes(cache)


@pytest.mark.benchmark(group="decode step")
@pytest.mark.parametrize(
    "context, policy",
    [pytest.param(n, p, id=f"N{n}-{p.label}") for n in CONTEXTS for p in STEP_POLICIES],
)
def test_decode_step(benchmark, record, model, context, policy):
    """One greedy decode step (batch ``BATCH``) once ``context`` tokens have been read.

    Each round runs ``STEPS_PER_ROUND`` steps on the same cache, so the full
    cache grows by a few dozen tokens over the measurement (N is its size
    before the first round) while the bounded ones stay at their budget.
    """
    if policy.budget is not None and policy.budget >= context:
        pytest.skip("the budget holds the whole context: nothing is evicted")
    seconds, held = measure_step_seconds(model, policy, context, benchmark)
    if policy.kind == "full":
        _FULL_STEP_SECONDS[context] = seconds
    elif context not in _FULL_STEP_SECONDS:  # this variant was selected alone (-k): measure its anchor too
        _FULL_STEP_SECONDS[context] = measure_step_seconds(model, Policy("full"), context)[0]
    record(
        "decode step",
        device=measure.device_name(DEV),
        model=MODEL_SHAPE.label,
        batch=BATCH,
        context=context,
        policy=policy.label,
        step_ms=seconds * 1e3,
        tokens_per_s=BATCH / seconds,
        kv_MiB=held / MiB,
        vs_full=_FULL_STEP_SECONDS[context] / seconds,
    )


# --------------------------------------------------------------------------- #
# Tokens/s and KV memory vs generated length
# --------------------------------------------------------------------------- #

if ON_GPU:
    LENGTH_POLICIES = [Policy("full"), Policy("epikv", 4096), Policy("epikv", 512), Policy("h2o", 4096),
                       Policy("gather", 4096)]
else:
    LENGTH_POLICIES = [
        Policy("full"),
        Policy("epikv", 512),
        Policy("epikv", 512, evict_every=16),
        Policy("h2o", 512),
        Policy("gather", 512),
    ]

# Full-cache tokens/s per checkpoint, from the full run (first in the group).
_FULL_TOKENS_PER_S: dict[int, float] = {}


@pytest.mark.benchmark(group="decode vs generated length")
@pytest.mark.parametrize("policy", [pytest.param(p, id=p.label) for p in LENGTH_POLICIES])
def test_generated_length(benchmark, record, model, policy):
    """Greedy generation of ``MAX_GENERATED`` tokens from a ``PROMPT_TOKENS`` prompt, one row per checkpoint.

    ``kv_MiB``: the cache's physical bytes after the checkpoint's step (for ours
    the slot buffers, which only ever grow, so this is also the peak held so
    far; for the others every layer's K/V tensors, also monotone here). The
    transient copies inside a step (``DynamicCache``'s cat, the gather) are
    not in it; on a GPU ``cuda_peak_GiB`` (the allocator's high-water mark
    since the model was built, weights included) has them.
    ``tokens_per_s``: batch × steps / seconds over the segment since the
    previous checkpoint; ``vs_full`` divides it by the full cache's at the same
    checkpoint (NaN when the full policy did not run in this session). The
    whole run is one pytest-benchmark round; the checkpoints are also in the
    JSON's ``extra_info``.
    """
    checkpoints: list[dict] = []

    def generate() -> None:
        checkpoints.clear()
        with torch.inference_mode(), fresh_cache(model, policy) as cache:
            decoder = GreedyDecoder(model, cache)
            decoder.read(random_tokens(PROMPT_TOKENS, seed=1))
            if ON_GPU:
                torch.cuda.reset_peak_memory_stats(DEV)
            generated = 0
            for checkpoint in CHECKPOINTS:
                measure.synchronize(DEV)
                start = time.perf_counter()
                decoder.steps(checkpoint - generated)
                measure.synchronize(DEV)
                seconds = time.perf_counter() - start
                row = dict(
                    generated=checkpoint,
                    kv_MiB=kv_bytes(cache) / MiB,
                    tokens_per_s=BATCH * (checkpoint - generated) / seconds,
                )
                if ON_GPU:
                    row["cuda_peak_GiB"] = torch.cuda.max_memory_allocated(DEV) / 2**30
                checkpoints.append(row)
                generated = checkpoint

    # Warm-up outside the measurement: first-call costs (kernel compilation, allocator growth).
    with torch.inference_mode(), fresh_cache(model, policy) as cache:
        warm = GreedyDecoder(model, cache)
        warm.read(random_tokens(PROMPT_TOKENS, seed=1))
        warm.steps(8)
    benchmark.pedantic(generate, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["checkpoints"] = checkpoints
    for row in checkpoints:
        if policy.kind == "full":
            _FULL_TOKENS_PER_S[row["generated"]] = row["tokens_per_s"]
        full_rate = _FULL_TOKENS_PER_S.get(row["generated"])
        record(
            "decode vs generated length",
            device=measure.device_name(DEV),
            model=MODEL_SHAPE.label,
            batch=BATCH,
            policy=policy.label,
            **row,
            vs_full=row["tokens_per_s"] / full_rate if full_rate else float("nan"),
        )
