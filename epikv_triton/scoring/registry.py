"""The method registry: each scoring method declared once, as a :class:`Method`.

``EpiKVConfig`` validates ``method`` and takes its defaults here; the CLI's
``--method``, the README's method table and the tests' "every evicting method"
are read from here, in registration order. Adding a method is one ``Scorer``
class and one :func:`register` call (the built-ins: ``builtin.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import EpiKVConfig
    from .base import Scorer

#: ``(config, num_layers) -> Scorer``: a method's scorer for a model of ``num_layers`` decoder layers.
ScorerFactory = Callable[["EpiKVConfig", int], "Scorer"]
#: Two bands of 0-based decoder layer indices (band A, band B).
Bands = tuple[tuple[int, ...], tuple[int, ...]]

#: The method of ``EpiKVConfig()``: the one the quality suite picks (never behind ``random`` or ``streaming``,
#: most often ahead, across its tasks at 25 % of the context on SmolLM2 and stories260k; ``docs/method.md``
#: section 9).
DEFAULT_METHOD = "tova"

README_TABLE_HEADER = "| method | keeps the tokens with… | signal |\n|---|---|---|\n"


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the rounding of the default bands (``docs/method.md`` section 1; Python's ``round`` is
    banker's)."""
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class Method:
    """One scoring method.

    * ``name``: the value of ``EpiKVConfig.method``.
    * ``keeps``: the tokens it keeps, one line of markdown (the README's method table).
    * ``signal``: the forward-pass signal its scorer reads, as the table names it; ``None`` for none.
    * ``scorer``: builds its scorer from the config and the model's depth.
    * ``evicts``: ``False`` for a method that keeps every token.
    * ``band_fractions``: for a two-band z-score method, each band's default layers as an inclusive range
      ``(lo, hi)`` of fractions of depth, rounded half up; ``None`` for a method without bands.
    * ``weights``: the default band weights ``(w_A, w_B)``.
    """

    name: str
    keeps: str
    signal: str | None
    scorer: ScorerFactory
    evicts: bool = True
    band_fractions: tuple[tuple[float, float], tuple[float, float]] | None = None
    weights: tuple[float, float] = (1.0, 1.0)

    @property
    def uses_bands(self) -> bool:
        """Whether it scores over two layer bands (``EpiKVConfig.bands`` and ``weights`` apply)."""
        return self.band_fractions is not None

    def default_bands(self, num_layers: int) -> Bands:
        """The bands of ``band_fractions`` for a model of ``num_layers`` decoder layers (not checked against it)."""
        if self.band_fractions is None:
            raise ValueError(f"method {self.name!r} scores without layer bands: it has no default bands")
        return tuple(  # type: ignore[return-value]
            tuple(range(round_half_up(lo * num_layers), round_half_up(hi * num_layers) + 1))
            for lo, hi in self.band_fractions
        )


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` under its name; a name is registered once."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def lookup(name: str) -> Method:
    """The method registered as ``name``; a ``ValueError`` listing the registered names otherwise."""
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"method must be one of {', '.join(method_names())}; got {name!r}")
    return method


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def evicting_methods() -> tuple[str, ...]:
    """Every registered method that evicts (all but ``full`` among the built-ins), in registration order."""
    return tuple(name for name, method in _REGISTRY.items() if method.evicts)


def make_scorer(config: EpiKVConfig, num_layers: int) -> Scorer:
    """The scorer of ``config.method`` for a model of ``num_layers`` decoder layers."""
    return lookup(config.method).scorer(config, num_layers)


def readme_table() -> str:
    """The README's method table, in markdown: one row per registered method."""
    rows = [
        f"| `{m.name}`{' (default)' if m.name == DEFAULT_METHOD else ''} | {m.keeps} | {m.signal or '—'} |\n"
        for m in _REGISTRY.values()
    ]
    return README_TABLE_HEADER + "".join(rows)
