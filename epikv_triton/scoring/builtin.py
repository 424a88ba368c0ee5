"""The built-in methods, registered in the order every listing shows them (``docs/method.md`` defines each)."""

from __future__ import annotations

from .bands import band_scorer
from .baselines import KeyNormScorer, PositionScorer, RandomScorer
from .h2o import AttentionMassScorer
from .key_similarity import KeyDiffScorer
from .lag_kv import LagKVScorer
from .observation_window import ObservationWindowScorer, RedundancyAwareScorer
from .registry import Method, register

# Reference bands of the 32-layer model, as fractions of depth (inclusive ranges).
EPIKV_BAND_FRACTIONS = ((0.22, 0.41), (0.56, 0.78))

register(Method(
    name="epikv",
    keeps="high `1.29·z(a) − z(b)`: causal rolling z-score (window 64) of the residual-stream change "
    "‖h_l[t] − h_l[t−1]‖, averaged over layer bands A (22–41 % of depth) and B (56–78 %)",
    signal="forward hooks",
    scorer=band_scorer("hidden"),
    band_fractions=EPIKV_BAND_FRACTIONS,
    weights=(1.29, 1.0),
))
register(Method(
    name="epikv_flat",
    keeps="the same with one layer per band (10 and 21 of 32, scaled to depth), weights 1 and 1",
    signal="forward hooks",
    scorer=band_scorer("hidden"),
    band_fractions=((10 / 32, 10 / 32), (21 / 32, 21 / 32)),
))
register(Method(
    name="kv",
    keeps="the same bands over per-key ‖Δk‖ + ‖Δv‖, emitted by the attention kernel",
    signal="attention kernel",
    scorer=band_scorer("kv"),
    band_fractions=EPIKV_BAND_FRACTIONS,
    weights=(1.29, 1.0),
))
register(Method(
    name="lag_kv",
    keeps="high spread of keys/values normalised by the previous 128-token chunk's range",
    signal="keys/values",
    scorer=lambda config, num_layers: LagKVScorer(num_layers, config.lag_chunk),
))
register(Method(
    name="full",
    keeps="everything (no eviction; baseline)",
    signal=None,
    scorer=lambda config, num_layers: PositionScorer(),  # the cheapest scorer: its scores never pick anything
    evicts=False,
))
register(Method(
    name="streaming",
    keeps="the first `sink` tokens and the most recent ones (StreamingLLM)",
    signal="positions",
    scorer=lambda config, num_layers: PositionScorer(),
))
register(Method(
    name="random",
    keeps="a random score, hashed from the seed, the sequence and the position",
    signal=None,
    scorer=lambda config, num_layers: RandomScorer(config.seed),
))
register(Method(
    name="knorm",
    keeps="low key norm (KnormPress rule)",
    signal="keys",
    scorer=lambda config, num_layers: KeyNormScorer(num_layers),
))
register(Method(
    name="h2o",
    keeps="high accumulated attention (Heavy-Hitter Oracle): needs attention probabilities — a fused two-pass "
    "kernel on a GPU (never the matrix), the materialised matrix on the CPU path",
    signal="attention probabilities",
    scorer=lambda config, num_layers: AttentionMassScorer(num_layers),
))
register(Method(
    name="keydiff",
    keeps="keys least similar to the mean unit key of the cache (KeyDiff), rescored at every chunk",
    signal="keys",
    scorer=lambda config, num_layers: KeyDiffScorer(num_layers),
))
register(Method(
    name="tova",
    keeps="high attention from the newest query (TOVA), rescored at every chunk",
    signal="attention probabilities",
    scorer=lambda config, num_layers: ObservationWindowScorer(num_layers, window=1, pool_kernel=1),
))
register(Method(
    name="snapkv",
    keeps="high attention from the chunk's last 32 queries, max-pooled over ±3 positions (SnapKV), rescored at "
    "every chunk",
    signal="attention probabilities",
    scorer=lambda config, num_layers: ObservationWindowScorer(num_layers, window=32, pool_kernel=7),
))
register(Method(
    name="rkv",
    keeps="high `0.1·importance − 0.9·redundancy` (R-KV): the last 8 queries' max-pooled attention, minus the "
    "softmax of each key's mean cosine similarity to the other keys; rescored at every chunk",
    signal="attention probabilities, keys",
    scorer=lambda config, num_layers: RedundancyAwareScorer(num_layers, window=8, pool_kernel=7, mix=0.1),
))
