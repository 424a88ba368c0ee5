"""epikv_triton: bounded KV-cache generation by the EpiKV epiphany score.

``from epikv_triton import ops`` gives the kernel set and imports no
transformers module; ``patch``/``unpatch``/``new_cache``/``calibrate`` load the
Hugging Face integration on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": ("epikv_triton.ops", None),
    "EpiKVConfig": ("epikv_triton.config", "EpiKVConfig"),
    "Calibration": ("epikv_triton.calibration", "Calibration"),
    "calibrate": ("epikv_triton.integrations.calibration", "calibrate"),
    "patch": ("epikv_triton.integrations.patching", "patch"),
    "unpatch": ("epikv_triton.integrations.patching", "unpatch"),
    "new_cache": ("epikv_triton.integrations.patching", "new_cache"),
    "cache_keyword": ("epikv_triton.integrations.keywords", "cache_keyword"),
    "batch_stats": ("epikv_triton.integrations.continuous_batching", "batch_stats"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'epikv_triton' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Calibration", "EpiKVConfig", "__version__", "batch_stats", "cache_keyword", "calibrate", "new_cache", "ops",
    "patch", "unpatch",
]
