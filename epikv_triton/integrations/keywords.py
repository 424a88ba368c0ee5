"""The one place that knows what transformers calls the cache argument.

transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache``
(attention, decoder layer, base model, ``*ForCausalLM``), made ``generate``
take ``cache`` (the old name is a deprecated alias) and renamed the output
field to ``.cache`` (``.past_key_values`` is a warning property). Earlier
versions use ``past_key_values`` everywhere. Rather than comparing version
numbers, the name is read off the model's own ``forward`` signature, so each
call uses exactly what the installed model declares.

Imports no transformers module: the CLI's evaluation code uses it too.
"""

from __future__ import annotations

import inspect
from typing import Any

CACHE = "cache"
LEGACY_CACHE = "past_key_values"


def cache_keyword(model: Any) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model``'s forward and ``generate`` take the cache
    under, which is also the name of the output field that carries it back."""
    parameters = inspect.signature(model.forward).parameters
    return CACHE if CACHE in parameters else LEGACY_CACHE


def pop_cache(kwargs: dict) -> Any:
    """Remove the cache from call keywords, whichever name carries it (``cache`` wins, as in transformers).

    Both names are removed, so re-inserting under one name never leaves a
    stale second one for transformers to complain about.
    """
    current = kwargs.pop(CACHE, None)
    legacy = kwargs.pop(LEGACY_CACHE, None)
    return current if current is not None else legacy


def output_cache(output: Any, model: Any) -> Any:
    """The cache a forward or ``generate`` output of ``model`` carries back (``None`` if it has none)."""
    return getattr(output, cache_keyword(model), None)
