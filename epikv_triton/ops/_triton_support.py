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

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Kernels use exp2: log2(e) is folded into the softmax scale on the host.
LOG2_E = 1.4426950408889634


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


def autotune_bucket(n: int) -> int:
    """Power-of-two bucket of a size for autotune keys, so decode does not retune every step."""
    return triton.next_power_of_2(max(n, 1))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact for fp32 inputs (and everything under the interpreter).

    Kernels that recompute each other's scores (attention's lse, H2O's column
    sums) must use the same one, or ``exp(s - lse)`` drifts.
    """
    return "ieee" if (dtype == torch.float32 or INTERPRET) else "tf32"
