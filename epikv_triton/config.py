"""EpiKVConfig: every knob of the methods (``docs/method.md``), validated.

Transformers-free. The layer bands depend on the model's depth, so they are
resolved per model with :meth:`EpiKVConfig.resolve_bands`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: Methods that score tokens; ``full`` keeps everything.
METHODS = ("epikv", "epikv_flat", "kv", "lag_kv", "full", "streaming", "random", "knorm", "h2o")

#: Methods whose score is a weighted rolling z-score of two layer bands (2.1, 2.2).
BAND_METHODS = ("epikv", "epikv_flat", "kv")

# Reference bands of the 32-layer model, as fractions of depth (inclusive ranges).
_BAND_FRACTIONS = ((0.22, 0.41), (0.56, 0.78))
# EpiKV-Flat: layers 10 and 21 of 32.
_FLAT_FRACTIONS = (10 / 32, 21 / 32)
_DEFAULT_WEIGHTS = {"epikv": (1.29, 1.0), "epikv_flat": (1.0, 1.0), "kv": (1.29, 1.0)}


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the rounding of the default bands (``docs/method.md`` section 1; Python's ``round`` is banker's)."""
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class EpiKVConfig:
    """Settings of a bounded cache.

    * ``budget``: kept tokens per sequence (padding never counts).
    * ``method``: ``epikv`` (hidden-state bands, default), ``epikv_flat`` (one
      layer per band), ``kv`` (key/value delta bands), ``lag_kv`` (lag-normalised
      key/value spread), or a baseline: ``full`` (no eviction), ``streaming``
      (sink + most recent), ``random``, ``knorm`` (lowest key norm kept), ``h2o``
      (accumulated attention: needs the attention probabilities; a fused
      two-pass kernel on a GPU, the materialised matrix on the CPU path).
    * ``window``: rolling z-score window ``W``.
    * ``bands``: ``(band_a_layers, band_b_layers)``; ``None`` = fractions of depth.
    * ``weights``: ``(w_A, w_B)``; ``None`` = (1.29, 1.0), or (1, 1) for ``epikv_flat``.
    * ``sink``: first tokens always kept when ``keep_prompt=False`` (unused otherwise).
    * ``recent``: most recent tokens always kept; ``None`` = ``min(128, budget // 4)``.
    * ``keep_prompt``: keep the whole prompt (it must fit in the budget with ``recent`` when the stream
      can outgrow the budget).
    * ``evict_every``: compact once the cache holds ``budget + evict_every`` tokens.
    * ``lag_chunk``: chunk length ``C`` of ``lag_kv``.
    * ``seed``: seed of ``random``.
    """

    budget: int = 4096
    method: str = "epikv"
    window: int = 64
    bands: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    weights: tuple[float, float] | None = None
    sink: int = 4
    recent: int | None = None
    keep_prompt: bool = True
    evict_every: int = 1
    lag_chunk: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("budget", "window", "evict_every", "lag_chunk"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("sink", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.recent is None:
            object.__setattr__(self, "recent", min(128, self.budget // 4))
        if not _is_int(self.recent) or self.recent < 0:
            raise ValueError(f"recent must be a non-negative int or None, got {self.recent!r}")
        if not isinstance(self.keep_prompt, bool):
            raise ValueError(f"keep_prompt must be True or False, got {self.keep_prompt!r}")
        # keep_prompt protects the prompt instead of the sink (the prompt is checked when it arrives).
        if self.evicts and self.keep_prompt and self.recent > self.budget:
            raise ValueError(
                f"budget ({self.budget}) is smaller than the recent window ({self.recent}): raise the budget or lower recent"
            )
        if self.evicts and not self.keep_prompt and self.sink + self.recent > self.budget:
            raise ValueError(
                f"budget ({self.budget}) is smaller than the protected tokens (sink {self.sink} + recent "
                f"{self.recent} = {self.sink + self.recent}): raise the budget or lower sink/recent"
            )
        if self.bands is not None:
            object.__setattr__(self, "bands", _normalise_bands(self.bands))
        if self.weights is None:
            object.__setattr__(self, "weights", _DEFAULT_WEIGHTS.get(self.method, (1.0, 1.0)))
        # A NaN weight would make every score NaN, and eviction silently oldest-first.
        if len(self.weights) != 2 or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.weights
        ):
            raise ValueError(f"weights must be two finite numbers (w_A, w_B), got {self.weights!r}")
        object.__setattr__(self, "weights", (float(self.weights[0]), float(self.weights[1])))

    @property
    def evicts(self) -> bool:
        """False only for ``full``."""
        return self.method != "full"

    @property
    def uses_bands(self) -> bool:
        return self.method in BAND_METHODS

    def resolve_bands(self, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The two layer bands for a model of ``num_layers`` decoder layers (0-based, inclusive).

        Explicit ``bands`` win; otherwise ``epikv``/``kv`` use the fractions of
        depth of ``docs/method.md`` section 1 and ``epikv_flat`` one layer per band (10 and 21
        of 32). Raises when a band is empty, out of range, or the bands overlap.
        """
        if self.bands is not None:
            bands = self.bands
        elif self.method == "epikv_flat":
            bands = tuple((round_half_up(f * num_layers),) for f in _FLAT_FRACTIONS)
        else:
            bands = tuple(
                tuple(range(round_half_up(lo * num_layers), round_half_up(hi * num_layers) + 1))
                for lo, hi in _BAND_FRACTIONS
            )
        source = "bands" if self.bands is not None else f"the default bands for {num_layers} layers"
        fix = "pass bands=([...], [...]) with two disjoint, non-empty lists of layer indices"
        for band in bands:
            if not band or any(layer >= num_layers for layer in band):
                raise ValueError(f"{source} {bands} do not fit a {num_layers}-layer model: {fix}")
        if set(bands[0]) & set(bands[1]):
            raise ValueError(f"{source} {bands} overlap (the model is too shallow for them): {fix}")
        return bands


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise_bands(bands: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(bands) != 2:
        raise ValueError(f"bands must be two lists of layer indices (band A, band B), got {bands!r}")
    for band in bands:  # before sorting, which would raise a bare TypeError on a non-int entry
        if not band or any(not _is_int(layer) or layer < 0 for layer in band):
            raise ValueError(f"each band must be a non-empty list of non-negative layer indices, got {bands!r}")
    normalised = tuple(tuple(sorted(set(band))) for band in bands)
    if set(normalised[0]) & set(normalised[1]):
        raise ValueError(f"bands must be disjoint, got {bands!r}")
    return normalised  # type: ignore[return-value]
