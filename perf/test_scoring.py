"""Scorer cost per token: ``pytest perf/test_scoring.py --benchmark``.

Every method's scorer is fed one forward chunk of ``T`` new tokens the way the
slot cache feeds it (``begin_chunk``, then for every layer the hidden states
and the attention call's view, then ``finish_chunk``), on synthetic signals of
a model's shape: the time is the scoring alone, never the attention. A scorer
that is linear in the chunk costs the same per token at every ``T``;
``per_token_vs_1k`` is the per-token cost over the one at ``T = 1024``.

* GPU: Llama-3-8B-like (32 layers, hidden 4096, 32 query / 8 KV heads of
  128), bf16, the Triton kernels.
* CPU: the CPU model of ``perf/test_end_to_end.py`` (6 layers, hidden 256,
  8 query / 4 KV heads of 64), fp32, the ops' PyTorch twins. The z-score twin
  walks the chunk token by token in Python (the kernel is one program per
  band): its per-token cost is flat, just high.

``h2o`` scores with the attention each key receives from the chunk's queries,
an attention-shaped ``T × S`` pass, so its cost per token grows with ``T`` by
nature; on a CPU the twin materialises the probabilities, so it runs at
``T = 1024`` only.
"""

from __future__ import annotations

import pytest
import torch

from epikv_triton.config import EpiKVConfig
from epikv_triton.ops import AttentionResult
from epikv_triton.scoring import AttentionView, ChunkInfo, evicting_methods, make_scorer
from perf import measure

DEV = measure.device()
ON_GPU = DEV.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
LAYERS, HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM = (32, 4096, 32, 8, 128) if ON_GPU else (6, 256, 8, 4, 64)
SHAPE = f"L{LAYERS} d{HIDDEN} H{Q_HEADS}/{KV_HEADS}x{HEAD_DIM} B1"
CHUNK_LENGTHS = [1024, 4096, 16384]
H2O_MAX_CHUNK = 16384 if ON_GPU else 1024

_PER_TOKEN_AT_1K: dict[str, float] = {}


def chunk_signals(T: int):
    """One forward chunk's inputs to a scorer: the chunk (positions T..2T-1, after a first chunk), hidden
    states and an attention view over the chunk's own T keys (what a chunked prefill step shows it)."""
    g = torch.Generator(device=DEV).manual_seed(T)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEV).to(DTYPE)

    positions = torch.arange(T, 2 * T, device=DEV)[None]
    valid = torch.ones_like(positions, dtype=torch.bool)
    chunk = ChunkInfo(positions, valid, valid)
    hidden = randn(1, T, HIDDEN)
    query = randn(1, Q_HEADS, T, HEAD_DIM)
    keys, values = randn(1, KV_HEADS, T, HEAD_DIM), randn(1, KV_HEADS, T, HEAD_DIM)
    deltas = torch.rand(2, 1, KV_HEADS, T, generator=g, device=DEV)
    lse = torch.rand(1, Q_HEADS, T, generator=g, device=DEV) + 8.0
    result = AttentionResult(None, deltas[0], deltas[1], lse)
    view = AttentionView(query, keys, values, positions, torch.arange(T, device=DEV)[None], None, None, result)
    return chunk, hidden, view


def score_one_chunk(method: str, chunk: ChunkInfo, hidden: torch.Tensor, view: AttentionView) -> torch.Tensor | None:
    scorer = make_scorer(EpiKVConfig(method=method, budget=8192, recent=128), LAYERS)
    scorer.begin_chunk(chunk)
    for layer in range(LAYERS):
        if layer in scorer.hidden_layers:
            scorer.observe_hidden(layer, hidden)
        scorer.observe_attention(layer, view)
    return scorer.finish_chunk()


@pytest.mark.benchmark(group="scoring")
@pytest.mark.parametrize("T", CHUNK_LENGTHS)
@pytest.mark.parametrize("method", evicting_methods())  # full's scores pick nothing: it shares streaming's scorer
def test_scorer_cost_per_token(benchmark, record, method, T):
    if method == "h2o" and T > H2O_MAX_CHUNK:
        pytest.skip(f"the CPU h2o twin materialises T x T probabilities per layer; run up to T = {H2O_MAX_CHUNK}")
    signals = chunk_signals(T)
    with torch.inference_mode():
        seconds = measure.bench(benchmark, lambda: score_one_chunk(method, *signals), DEV, rounds=3)
    per_token = seconds / T
    if T == CHUNK_LENGTHS[0]:
        _PER_TOKEN_AT_1K[method] = per_token
    record(
        "scoring",
        device=measure.device_name(DEV),
        shape=SHAPE,
        method=method,
        T=T,
        chunk_ms=seconds * 1e3,
        us_per_token=per_token * 1e6,
        per_token_vs_1k=per_token / _PER_TOKEN_AT_1K[method] if method in _PER_TOKEN_AT_1K else float("nan"),
    )
