"""Per-token importance scores from forward-pass signals (the methods: ``docs/method.md``).

Transformers-free. ``base``: the ``Scorer`` protocol and the records a scorer
sees; ``registry``: every method declared once; one module per family of
scorers (``bands``, ``lag_kv``, ``baselines``, ``h2o``, ``key_similarity``,
``observation_window``); ``ranks``: the tensor-parallel ranks a stream is
split over, and the one exchange that makes them keep the same tokens.
Importing this package registers the built-in methods (``builtin``).
"""

from __future__ import annotations

from . import builtin  # noqa: F401 - registers the built-in methods
from .base import AttentionView, ChunkInfo, Scorer, fold_slot_scores
from .ranks import RankGroup
from .registry import (
    DEFAULT_METHOD,
    Method,
    evicting_methods,
    lookup,
    make_scorer,
    method_names,
    readme_table,
    register,
)

__all__ = [
    "DEFAULT_METHOD", "AttentionView", "ChunkInfo", "Method", "RankGroup", "Scorer", "evicting_methods", "lookup",
    "make_scorer", "method_names", "readme_table", "register", "fold_slot_scores",
]
