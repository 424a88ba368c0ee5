"""The kernel-backed ops as torch custom ops (namespace ``epikv_triton``), each bound to its implementations.

``torch.compile`` traces a custom op as one node: its fake implementation
gives the output shapes and dtypes without touching data, and the declared
mutations let functionalization reorder nothing across an in-place update.
So a compiled caller sees no graph break on either backend.

Why ``torch.library.custom_op`` run by the launchers, and not ``triton_op`` +
``wrap_triton``: the launchers pick their kernel, config and split-K grid from
the shape and the GPU, autotune and run a second merge kernel, and the backend
itself is chosen at run time (:mod:`._dispatch`). ``wrap_triton`` would need
all of that to be traceable, and Inductor does not fuse user kernels anyway,
so an opaque node loses nothing on the kernel side. The implementation carries
no device key, so one registration serves CPU (twin or interpreter) and CUDA.

Only the ops with a kernel are registered. ``select_slots`` and
``compaction_plan`` are compositions of aten ops on both backends, which the
compiler already traces and Inductor can fuse; hiding them behind an opaque
node would make them less visible, not more.

Each schema is inferred from its implementation's annotations (custom ops
take no keyword-only tensors, so the options stay positional in the schema).
Callers pass the options by keyword (:class:`._dispatch.KernelOp`); PyTorch
hands an implementation every argument by position, and it forwards the
options to the launcher or twin by keyword again. Inputs are validated by the public
ops in :mod:`epikv_triton.ops`, which read only shapes, dtypes and Python
values, so validation runs at trace time and costs nothing in the graph.

The ops are inference-only: the kernels have no backward. Autograd records a
node whose backward raises (:func:`_inference_only` for the functional ops;
PyTorch's own "no autograd formula" error for the in-place ones, which cannot
take a formula), so a gradient is never silently dropped.
"""

from __future__ import annotations

import torch

from . import attention, compaction, h2o, naive, zscore
from ._dispatch import KernelOp, fits_attention_kernels


def _inference_only(ctx, *grads):
    raise RuntimeError(
        "epikv_triton ops are inference-only (the kernels have no backward): call them under torch.no_grad() "
        "or torch.inference_mode(), or detach their inputs"
    )


def _absent(like: torch.Tensor) -> torch.Tensor:
    """What the attention op returns for a member the caller did not ask for: an empty float32 tensor
    (a custom op returns a fixed tuple of tensors; :func:`epikv_triton.ops.slot_attention` turns it
    back into ``None``)."""
    return like.new_empty((0,), dtype=torch.float32)


def _slot_attention(
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
    """``(out, dk, dv, lse)``; ``dk``/``dv`` (without ``with_deltas``) and ``lse`` (without ``return_lse``)
    are empty."""
    result = slot_attention.run(
        q, k, v, pos, query_slots=query_slots, scale=scale, window=window, prev_k=prev_k, prev_v=prev_v,
        with_deltas=with_deltas, return_lse=return_lse, num_splits=num_splits, slot_count=slot_count,
    )
    return tuple(_absent(q) if member is None else member for member in result)


slot_attention = KernelOp(
    torch.library.custom_op("epikv_triton::slot_attention", _slot_attention, mutates_args=()),
    naive.slot_attention, attention.slot_attention, covers=fits_attention_kernels,
)
slot_attention.custom_op.register_autograd(_inference_only)


def _attention_outputs(q: torch.Tensor, Hkv: int, with_deltas: bool, return_lse: bool) -> tuple:
    """The fake attention outputs for queries ``q`` over ``Hkv`` heads (shapes and dtypes, no data)."""
    B, Hq, T, D = q.shape
    dk = q.new_empty((B, Hkv, T), dtype=torch.float32) if with_deltas else _absent(q)
    lse = q.new_empty((B, Hq, T), dtype=torch.float32) if return_lse else _absent(q)
    return q.new_empty((B, Hq, T, D)), dk, torch.empty_like(dk), lse


@slot_attention.custom_op.register_fake
def _(q, k, v, pos, query_slots, scale, window, prev_k, prev_v, with_deltas, return_lse, num_splits, slot_count):
    return _attention_outputs(q, k.shape[1], with_deltas, return_lse)


def _paged_slot_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float | None,
    window: int | None,
    prev_k: torch.Tensor | None,
    prev_v: torch.Tensor | None,
    with_deltas: bool,
    return_lse: bool,
    num_splits: int | None,
    slot_count: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, dk, dv, lse)`` over paged K/V; absent members are empty, as for ``slot_attention``."""
    result = paged_slot_attention.run(
        q, k_pages, v_pages, pos_pages, block_table, query_slots=query_slots, scale=scale, window=window,
        prev_k=prev_k, prev_v=prev_v, with_deltas=with_deltas, return_lse=return_lse, num_splits=num_splits,
        slot_count=slot_count,
    )
    return tuple(_absent(q) if member is None else member for member in result)


paged_slot_attention = KernelOp(
    torch.library.custom_op("epikv_triton::paged_slot_attention", _paged_slot_attention, mutates_args=()),
    naive.paged_slot_attention, attention.paged_slot_attention, covers=fits_attention_kernels,
)
paged_slot_attention.custom_op.register_autograd(_inference_only)


@paged_slot_attention.custom_op.register_fake
def _(q, k_pages, v_pages, pos_pages, block_table, query_slots, scale, window, prev_k, prev_v, with_deltas,
      return_lse, num_splits, slot_count):
    return _attention_outputs(q, k_pages.shape[2], with_deltas, return_lse)


def _attention_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    lse: torch.Tensor,
    query_slots: torch.Tensor | None,
    scale: float | None,
    window: int | None,
    slot_count: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, Hkv, S]`` float32 H2O column sums."""
    return attention_column_sums.run(
        q, k, pos, lse, query_slots=query_slots, scale=scale, window=window, slot_count=slot_count
    )


attention_column_sums = KernelOp(
    torch.library.custom_op("epikv_triton::attention_column_sums", _attention_column_sums, mutates_args=()),
    naive.attention_column_sums, h2o.attention_column_sums, covers=fits_attention_kernels,
)
attention_column_sums.custom_op.register_autograd(_inference_only)


@attention_column_sums.custom_op.register_fake
def _(q, k, pos, lse, query_slots, scale, window, slot_count):
    B, Hkv, S = k.shape[:3]
    return q.new_empty((B, Hkv, S), dtype=torch.float32)


def _paged_attention_column_sums(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    lse: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float | None,
    window: int | None,
    slot_count: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, Hkv, max_pages · page_size]`` float32 H2O column sums over paged keys."""
    return paged_attention_column_sums.run(
        q, k_pages, pos_pages, block_table, lse, query_slots=query_slots, scale=scale, window=window,
        slot_count=slot_count,
    )


paged_attention_column_sums = KernelOp(
    torch.library.custom_op(
        "epikv_triton::paged_attention_column_sums", _paged_attention_column_sums, mutates_args=()
    ),
    naive.paged_attention_column_sums, h2o.paged_attention_column_sums, covers=fits_attention_kernels,
)
paged_attention_column_sums.custom_op.register_autograd(_inference_only)


@paged_attention_column_sums.custom_op.register_fake
def _(q, k_pages, pos_pages, block_table, lse, query_slots, scale, window, slot_count):
    B, Hkv, S = q.shape[0], k_pages.shape[2], block_table.shape[1] * k_pages.shape[1]
    return q.new_empty((B, Hkv, S), dtype=torch.float32)


def _rolling_zscore(
    values: torch.Tensor, ring: torch.Tensor, count: torch.Tensor, weights: torch.Tensor, eps: float
) -> torch.Tensor:
    """``score [B, T]`` float32; ``ring``/``count`` updated in place."""
    return rolling_zscore.run(values, ring, count, weights, eps=eps)


rolling_zscore = KernelOp(
    torch.library.custom_op("epikv_triton::rolling_zscore", _rolling_zscore, mutates_args=("ring", "count")),
    naive.rolling_zscore, zscore.rolling_zscore,
)


@rolling_zscore.custom_op.register_fake
def _(values, ring, count, weights, eps):
    B, _, T = values.shape
    return values.new_empty((B, T), dtype=torch.float32)


def _compact_slots_(kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor) -> None:
    """Moves the kept slots at or above the new fill into ``destination``, in place."""
    compact_slots_.run(kv, pos, scores, destination)


compact_slots_ = KernelOp(
    torch.library.custom_op("epikv_triton::compact_slots_", _compact_slots_, mutates_args=("kv", "pos", "scores")),
    naive.compact_slots_, compaction.compact_slots_,
)


@compact_slots_.custom_op.register_fake
def _(kv, pos, scores, destination):
    return None


def _paged_compact_slots_(
    kv_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    scores_pages: torch.Tensor,
    block_table: torch.Tensor,
    destination: torch.Tensor,
) -> None:
    """Moves the kept slots at or above the new fill into ``destination``, in the pages, in place."""
    paged_compact_slots_.run(kv_pages, pos_pages, scores_pages, block_table, destination)


paged_compact_slots_ = KernelOp(
    torch.library.custom_op(
        "epikv_triton::paged_compact_slots_", _paged_compact_slots_,
        mutates_args=("kv_pages", "pos_pages", "scores_pages"),
    ),
    naive.paged_compact_slots_, compaction.paged_compact_slots_,
)


@paged_compact_slots_.custom_op.register_fake
def _(kv_pages, pos_pages, scores_pages, block_table, destination):
    return None
