"""Marking long-lived state for compiled steps; transformers-free."""

from __future__ import annotations

import torch


def static_address(tensor: torch.Tensor) -> torch.Tensor:
    """Mark state that lives as long as its cache and changes only in place, so a CUDA-graph capture of
    a compiled step (``mode="reduce-overhead"``) reads and updates it where it is instead of copying it
    in and out of the graph's own buffers. Unguarded: a new cache does not force a recompile. (State
    allocated while tracing, which only a partly compiled first chunk does, is the graph's own.)"""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor, guard=False)
    return tensor
