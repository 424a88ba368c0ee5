"""The settings each method is tested under (as kvpress's ``default_presses``), and a scoped registration.

The generic per-method tests take their methods from the registry
(``scoring.method_names()``, ``scoring.evicting_methods()``): a registered
method is covered without editing any test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from epikv_triton.scoring import Method, registry

# What a method needs to show its behaviour on the tests' short streams (tens of tokens); the defaults otherwise.
_TEST_SETTINGS = {"lag_kv": {"lag_chunk": 16}}  # several lag chunks per run, so the lag normalisation runs


def settings(method: str) -> dict:
    """``patch``/``EpiKVConfig`` keywords that test ``method``: its name and what ``_TEST_SETTINGS`` adds."""
    return {"method": method, **_TEST_SETTINGS.get(method, {})}


@contextmanager
def registered(method: Method) -> Iterator[Method]:
    """``method`` registered inside the block, through the public ``register``; the registry is restored after."""
    saved = dict(registry._REGISTRY)
    try:
        yield registry.register(method)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
