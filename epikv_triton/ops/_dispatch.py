"""Which implementation runs a call of a kernel-backed op: the one place that decides.

* While ``torch.compile`` traces, or when autograd would record the call, the
  op's registered custom op (:mod:`._library`): one graph node with no break,
  or a node whose backward raises (the ops are inference-only).
* Otherwise the Triton launcher when :func:`backend_for` says ``"triton"`` and
  the kernel covers the inputs, else the PyTorch twin (:mod:`.naive`).

The custom op's implementation is that second choice, so a compiled graph
makes it at run time just as an eager call does. Eager calls skip the custom
op: PyTorch's dispatcher round trip costs 10 to 20 µs of host time a call, as
much as a kernel launch, and an eager decode step makes dozens of these calls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from . import _triton_support

# The attention-shaped kernels hold a head in one register tile of up to this many features.
MAX_TRITON_HEAD_DIM = 256


def backend_for(x: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation runs for tensors like ``x``."""
    forced = os.environ.get("EPIKV_BACKEND", "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"EPIKV_BACKEND must be 'triton' or 'torch', got {forced!r}")
    # The kernels were built for the interpreter or not when their modules were imported; a later
    # change of TRITON_INTERPRET must not route CPU tensors to kernels built without it.
    interpret = _triton_support.INTERPRET
    if forced == "triton" and not (x.is_cuda or interpret):
        raise ValueError("EPIKV_BACKEND=triton needs GPU tensors, or TRITON_INTERPRET=1 to run the kernels on CPU")
    if forced:
        return forced
    return "triton" if (x.is_cuda or interpret) else "torch"


def fits_attention_kernels(q: torch.Tensor) -> bool:
    """Whether the attention-shaped kernels cover queries ``q [..., D]``."""
    return q.shape[-1] <= MAX_TRITON_HEAD_DIM


class KernelOp:
    """A kernel-backed op's three implementations and the choice among them, made at every call.

    Called as the public op calls it: its tensors by position, every option by
    keyword (across the custom-op boundary too). The first argument decides
    the backend; ``covers(first)`` says whether the kernel handles such inputs
    (always, when ``None``).
    """

    def __init__(
        self,
        custom_op: torch.library.CustomOpDef,
        twin: Callable,
        launcher: Callable,
        covers: Callable[[torch.Tensor], bool] | None = None,
    ):
        self.custom_op = custom_op
        self.twin = twin
        self.launcher = launcher
        self.covers = covers

    def __call__(self, *tensors, **options):
        if torch.compiler.is_compiling() or _recorded_by_autograd(tensors, options):
            return self.custom_op(*tensors, **options)
        return self.run(*tensors, **options)

    def run(self, first: torch.Tensor, *tensors, **options):
        """The launcher or the twin, whichever runs inputs like ``first``; the custom op's implementation."""
        if backend_for(first) == "torch" or (self.covers is not None and not self.covers(first)):
            return self.twin(first, *tensors, **options)
        with _on_device(first):
            return self.launcher(first, *tensors, **options)


def _recorded_by_autograd(tensors: tuple, options: dict) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (*tensors, *options.values())
    )


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """``x``'s GPU made current for a launch: Triton launches on the current device and stream, and
    under ``device_map="auto"`` a layer's tensors may sit on another GPU. Nothing on CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
