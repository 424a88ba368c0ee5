"""EpiKVConfig: every knob of the methods (``docs/method.md``), validated.

Transformers-free. The methods and their defaults come from the method
registry (``scoring.registry``). The layer bands depend on the model's depth,
so they are resolved per model with :meth:`EpiKVConfig.resolve_bands`. A config
is saved and loaded as versioned JSON (:meth:`EpiKVConfig.save`, :meth:`EpiKVConfig.load`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .scoring import registry


@dataclass(frozen=True)
class EpiKVConfig:
    """Settings of a bounded cache.

    * ``budget``: kept tokens per sequence (padding never counts).
    * ``method``: a registered method (``scoring.method_names()``; the README's
      method table says what each keeps); ``scoring.DEFAULT_METHOD`` (``tova``) by default.
    * ``window``: rolling z-score window ``W``.
    * ``bands``: ``(band_a_layers, band_b_layers)``; ``None`` = the method's default (fractions of depth).
      A band may be empty when its weight is 0 (a calibrated score over one band).
    * ``weights``: ``(w_A, w_B)``, any sign, not both 0; ``None`` = the method's default
      (``scoring.lookup(method).weights``).
    * ``sink``: first tokens always kept when ``keep_prompt=False`` (unused otherwise).
    * ``recent``: most recent tokens always kept; ``None`` = ``min(128, budget // 4)``.
    * ``keep_prompt``: keep the whole prompt (it must fit in the budget with ``recent`` when the stream
      can outgrow the budget).
    * ``evict_every``: compact once the cache holds ``budget + evict_every`` tokens.
    * ``lag_chunk``: chunk length ``C`` of ``lag_kv``.
    * ``seed``: seed of ``random``.
    * ``value_reserve``: slots per sequence kept, after the protected ones, for the tokens with the largest
      value vectors (the largest ``‖v‖`` over layers and KV heads); 0 = none. Taken from the budget.
    """

    budget: int = 4096
    method: str = registry.DEFAULT_METHOD
    window: int = 64
    bands: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    weights: tuple[float, float] | None = None
    sink: int = 4
    recent: int | None = None
    keep_prompt: bool = True
    evict_every: int = 1
    lag_chunk: int = 128
    seed: int = 0
    value_reserve: int = 0

    def __post_init__(self) -> None:
        method = registry.lookup(self.method)  # raises, listing the registered methods
        for name in ("budget", "window", "evict_every", "lag_chunk"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("sink", "seed", "value_reserve"):
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
                f"budget ({self.budget}) is smaller than the recent window ({self.recent}): "
                "raise the budget or lower recent"
            )
        if self.evicts and not self.keep_prompt and self.sink + self.recent > self.budget:
            raise ValueError(
                f"budget ({self.budget}) is smaller than the protected tokens (sink {self.sink} + recent "
                f"{self.recent} = {self.sink + self.recent}): raise the budget or lower sink/recent"
            )
        if self.value_reserve > self.budget:
            raise ValueError(
                f"value_reserve ({self.value_reserve}) is more than the budget ({self.budget}): lower it"
            )
        if not method.uses_bands and (self.bands is not None or self.weights not in (None, method.weights)):
            banded = ", ".join(name for name in registry.method_names() if registry.lookup(name).uses_bands)
            raise ValueError(
                f"bands and weights apply to the methods that score over layer bands ({banded}); method "
                f"{self.method!r} has none: pass method='epikv' (or another of those) with them, or drop them"
            )
        if self.weights is None:
            object.__setattr__(self, "weights", method.weights)
        # A NaN weight would make every score NaN, and eviction silently oldest-first.
        if len(self.weights) != 2 or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.weights
        ):
            raise ValueError(f"weights must be two finite numbers (w_A, w_B), got {self.weights!r}")
        object.__setattr__(self, "weights", (float(self.weights[0]), float(self.weights[1])))
        if self.weights == (0.0, 0.0):
            raise ValueError("weights must not both be 0: every token would score the same")
        if self.bands is not None:
            object.__setattr__(self, "bands", _normalise_bands(self.bands, self.weights))

    @property
    def evicts(self) -> bool:
        """False for a method that keeps every token (``full``)."""
        return registry.lookup(self.method).evicts

    @property
    def uses_bands(self) -> bool:
        """Whether the method scores over two layer bands (``bands`` and ``weights`` apply)."""
        return registry.lookup(self.method).uses_bands

    def resolve_bands(self, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The two layer bands for a model of ``num_layers`` decoder layers (0-based, inclusive).

        Explicit ``bands`` win; otherwise the method's default bands: fractions of depth
        (``docs/method.md`` section 1) for ``epikv``/``kv``, one layer per band (10 and 21 of 32)
        for ``epikv_flat``. Raises when a band is out of range or the bands overlap, and for a
        method without bands. An explicit band may be empty when its weight is 0 (checked on construction).
        """
        bands = self.bands if self.bands is not None else registry.lookup(self.method).default_bands(num_layers)
        source = "bands" if self.bands is not None else f"the default bands for {num_layers} layers"
        fix = "pass bands=([...], [...]) with two disjoint, non-empty lists of layer indices"
        for band in bands:
            if any(layer >= num_layers for layer in band):
                raise ValueError(f"{source} {bands} do not fit a {num_layers}-layer model: {fix}")
        if set(bands[0]) & set(bands[1]):
            raise ValueError(f"{source} {bands} overlap (the model is too shallow for them): {fix}")
        return bands

    def to_json(self) -> str:
        """This config as JSON text: every setting, under a format name and version that :meth:`from_json` checks."""
        # One setting per line with its value inline, so a long band stays one line.
        settings = ",\n".join(
            f"    {json.dumps(field.name)}: {json.dumps(getattr(self, field.name))}"
            for field in dataclasses.fields(self)
        )
        return f'{{\n  "format": "{JSON_FORMAT}",\n  "version": {JSON_VERSION},\n  "settings": {{\n{settings}\n  }}\n}}'


    @classmethod
    def from_json(cls, text: str) -> EpiKVConfig:
        """The config :meth:`to_json` wrote (equal to it); a ``ValueError`` saying what is wrong otherwise.

        A missing setting takes its default; an unknown one is refused, and every value is validated as
        in the constructor.
        """
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"an EpiKVConfig file must be JSON ({error})") from None
        if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
            raise ValueError(f'not an EpiKVConfig file: expected a JSON object with "format": "{JSON_FORMAT}"')
        version = document.get("version")
        if not _is_int(version) or not 1 <= version <= JSON_VERSION:
            raise ValueError(
                f"EpiKVConfig file version {version!r} is not supported: this epikv_triton reads versions 1 to "
                f"{JSON_VERSION} (a newer file needs a newer epikv_triton)"
            )
        settings = document.get("settings")
        if not isinstance(settings, dict):
            raise ValueError('an EpiKVConfig file needs a "settings" object')
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown EpiKVConfig settings {unknown}; the known ones are {sorted(known)}")
        return cls(**{name: _from_json_value(value) for name, value in settings.items()})

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EpiKVConfig:
        """The config :meth:`save` wrote to ``path``."""
        with open(path, encoding="utf-8") as file:
            return cls.from_json(file.read())


#: The ``format`` and latest ``version`` of a saved config.
JSON_FORMAT = "epikv_triton.EpiKVConfig"
JSON_VERSION = 1


def _from_json_value(value: Any) -> Any:
    """JSON arrays back as the tuples the config holds (bands, weights); everything else as it is."""
    return tuple(_from_json_value(item) for item in value) if isinstance(value, list) else value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise_bands(
    bands: Sequence[Sequence[int]], weights: tuple[float, float]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(bands) != 2:
        raise ValueError(f"bands must be two lists of layer indices (band A, band B), got {bands!r}")
    for band, weight in zip(bands, weights):  # before sorting, which would raise a bare TypeError on a non-int entry
        if any(not _is_int(layer) or layer < 0 for layer in band):
            raise ValueError(f"each band must be a non-empty list of non-negative layer indices, got {bands!r}")
        if not band and weight != 0:
            raise ValueError(
                f"each band must be a non-empty list of non-negative layer indices, got {bands!r} "
                f"(a band may be empty only when its weight is 0; weights are {weights})"
            )
    normalised = tuple(tuple(sorted(set(band))) for band in bands)
    if set(normalised[0]) & set(normalised[1]):
        raise ValueError(f"bands must be disjoint, got {bands!r}")
    return normalised  # type: ignore[return-value]
