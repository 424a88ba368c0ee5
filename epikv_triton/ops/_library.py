"""The kernel-backed ops as torch custom ops (namespace ``epikv_triton``), and the backend choice.

``torch.compile`` traces a custom op as one node: its fake implementation
gives the output shapes and dtypes without touching data, and the declared
mutations let functionalization reorder nothing across an in-place update.
So a compiled caller sees no graph break on either backend.

Why ``torch.library.custom_op`` whose implementation calls the existing
launchers, and not ``triton_op`` + ``wrap_triton``: the launchers pick their
kernel, config and split-K grid from the shape and the GPU, autotune, run a
second merge kernel, and fall back to the twin (head dim > 256, zero-size
planes); the backend itself is chosen at run time from ``EPIKV_BACKEND`` and
``TRITON_INTERPRET``. ``wrap_triton`` would need all of that to be traceable,
and Inductor does not fuse user kernels anyway, so an opaque node loses
nothing on the kernel side. The implementation carries no device key, so one
registration serves CPU (twin or interpreter) and CUDA.

Only the ops with a kernel are registered. ``select_slots`` and
``compaction_plan`` are compositions of aten ops on both backends, which the
compiler already traces and Inductor can fuse; hiding them behind an opaque
node would make them less visible, not more.

Validation is not here: it stays in the public wrappers of
:mod:`epikv_triton.ops`, which read only shapes, dtypes and Python values, so
it runs at trace time and costs nothing in the compiled graph. Those wrappers
call the ``*_op`` custom ops while compiling, or when autograd would record the
call, and the plain implementations below otherwise (see ``_routed`` there).

The ops are inference-only: the kernels have no backward. Through the custom
ops autograd records a node whose backward raises (:func:`_inference_only` for
the functional ops; PyTorch's own "no autograd formula" error for the in-place
ones, which cannot take a formula), so a gradient is never silently dropped.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import _triton_support, naive

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


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """``x``'s GPU made current for a launch: Triton launches on the current device and stream, and
    under ``device_map="auto"`` a layer's tensors may sit on another GPU. Nothing on CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _inference_only(ctx, *grads):
    raise RuntimeError(
        "epikv_triton ops are inference-only (the kernels have no backward): call them under torch.no_grad() "
        "or torch.inference_mode(), or detach their inputs"
    )


def _absent(like: torch.Tensor) -> torch.Tensor:
    """What the attention op returns for a member the caller did not ask for: an empty float32 tensor
    (a custom op returns a fixed tuple of tensors; the public wrapper turns it back into ``None``)."""
    return like.new_empty((0,), dtype=torch.float32)


def slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    query_slots: torch.Tensor | None,
    scale: float | None,
    window: int | None,
    prev_k: torch.Tensor | None,
    prev_v: torch.Tensor | None,
    with_deltas: bool,
    return_lse: bool,
    num_splits: int | None,
    slot_count: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, dk, dv, lse)``; ``dk``/``dv`` (without ``with_deltas``) and ``lse`` (without
    ``return_lse``) are empty. Inputs are validated by :func:`epikv_triton.ops.slot_attention`."""
    kwargs = dict(
        query_slots=query_slots, scale=scale, window=window, prev_k=prev_k, prev_v=prev_v,
        with_deltas=with_deltas, return_lse=return_lse, num_splits=num_splits, slot_count=slot_count,
    )
    if backend_for(q) == "triton" and q.shape[-1] <= MAX_TRITON_HEAD_DIM:
        from .attention import slot_attention as launch

        with _on_device(q):
            result = launch(q, k, v, pos, **kwargs)
    else:
        result = naive.slot_attention(q, k, v, pos, **kwargs)
    return tuple(member if member is not None else _absent(q) for member in result)


slot_attention_op = torch.library.custom_op("epikv_triton::slot_attention", slot_attention, mutates_args=())
slot_attention_op.register_autograd(_inference_only)


@slot_attention_op.register_fake
def _(q, k, v, pos, query_slots, scale, window, prev_k, prev_v, with_deltas, return_lse, num_splits, slot_count):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    out = q.new_empty((B, Hq, T, D))
    dk = q.new_empty((B, Hkv, T), dtype=torch.float32) if with_deltas else _absent(q)
    dv = q.new_empty((B, Hkv, T), dtype=torch.float32) if with_deltas else _absent(q)
    lse = q.new_empty((B, Hq, T), dtype=torch.float32) if return_lse else _absent(q)
    return out, dk, dv, lse


def attention_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    lse: torch.Tensor,
    query_slots: torch.Tensor | None,
    scale: float | None,
    window: int | None,
    slot_count: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, Hkv, S]`` float32 H2O column sums; inputs validated by :func:`epikv_triton.ops.attention_column_sums`."""
    kwargs = dict(query_slots=query_slots, scale=scale, window=window, slot_count=slot_count)
    if backend_for(q) == "triton" and q.shape[-1] <= MAX_TRITON_HEAD_DIM:
        from .h2o import attention_column_sums as launch

        with _on_device(q):
            return launch(q, k, pos, lse, **kwargs)
    return naive.attention_column_sums(q, k, pos, lse, **kwargs)


attention_column_sums_op = torch.library.custom_op(
    "epikv_triton::attention_column_sums", attention_column_sums, mutates_args=()
)
attention_column_sums_op.register_autograd(_inference_only)


@attention_column_sums_op.register_fake
def _(q, k, pos, lse, query_slots, scale, window, slot_count):
    B, Hkv, S = k.shape[:3]
    return q.new_empty((B, Hkv, S), dtype=torch.float32)


def rolling_zscore(
    values: torch.Tensor, ring: torch.Tensor, count: torch.Tensor, weights: torch.Tensor, eps: float
) -> torch.Tensor:
    """``score [B, T]`` float32; ``ring``/``count`` updated in place. Inputs validated by
    :func:`epikv_triton.ops.rolling_zscore`."""
    if backend_for(values) == "triton":
        from .zscore import rolling_zscore as launch

        with _on_device(values):
            return launch(values, ring, count, weights, eps=eps)
    return naive.rolling_zscore(values, ring, count, weights, eps=eps)


rolling_zscore_op = torch.library.custom_op(
    "epikv_triton::rolling_zscore", rolling_zscore, mutates_args=("ring", "count")
)


@rolling_zscore_op.register_fake
def _(values, ring, count, weights, eps):
    B, _, T = values.shape
    return values.new_empty((B, T), dtype=torch.float32)


def compact_slots_(kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor) -> None:
    """Moves the kept slots at or above the new fill into ``destination``, in place; inputs validated by
    :func:`epikv_triton.ops.compact_slots_`."""
    if backend_for(kv) == "triton":
        from .compaction import compact_slots_ as launch

        with _on_device(kv):
            launch(kv, pos, scores, destination)
    else:
        naive.compact_slots_(kv, pos, scores, destination)


compact_slots_op = torch.library.custom_op(
    "epikv_triton::compact_slots_", compact_slots_, mutates_args=("kv", "pos", "scores")
)


@compact_slots_op.register_fake
def _(kv, pos, scores, destination):
    return None
