"""What every Triton kernel here shares: interpreter awareness and autotuning.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot benchmark, so an
autotuned kernel gets a single config there; tests still launch every GPU
config explicitly through each launcher's ``config=`` argument. The
interpreter also computes bf16 arithmetic on raw bits, so kernels upcast
right after each load when ``UPCAST`` (a constexpr, free on a GPU) is set.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune(
    configs: Sequence[triton.Config],
    key: list[str],
    interpret_config: triton.Config | None = None,
    restore_value: list[str] | None = None,
) -> Callable:
    """``triton.autotune`` over ``configs`` on a GPU; one config under the interpreter.

    ``restore_value`` names the arguments an in-place kernel overwrites: while
    tuning, Triton runs every config on the real arguments, so it must save and
    restore them around each trial or the caller's data gets transformed
    several times.
    """
    chosen = [interpret_config or configs[0]] if INTERPRET else list(configs)
    return triton.autotune(configs=chosen, key=key, restore_value=restore_value)


def launch_options(config: triton.Config | None) -> dict:
    """Keyword arguments that launch a plain ``@triton.jit`` kernel with ``config``."""
    if config is None:
        return {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
