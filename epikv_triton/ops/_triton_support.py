"""What every Triton kernel here shares: interpreter awareness, autotuning, the visibility rule.

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
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Kernels use exp2: log2(e) is folded into the softmax scale on the host, and a
# base-2 log-sum-exp becomes a natural one times ln(2). The _JIT twins are for
# @triton.jit bodies, which may only read constexpr globals.
LOG2_E = 1.4426950408889634
LOG2_E_JIT = tl.constexpr(LOG2_E)
LN_2_JIT = tl.constexpr(0.6931471805599453)


def autotune(
    configs: Sequence[triton.Config],
    key: list[str],
    interpret_config: triton.Config | None = None,
) -> Callable:
    """``triton.autotune`` over ``configs`` on a GPU; one config under the interpreter.

    Only for kernels that write fresh outputs: tuning runs every config on the
    caller's arguments, so an in-place kernel would need them saved and
    restored around each trial (a copy of the whole KV cache for compaction).
    The in-place kernels pick their config from the shape instead.
    """
    chosen = [interpret_config or configs[0]] if INTERPRET else list(configs)
    return triton.autotune(configs=chosen, key=key)


def launch_options(config: triton.Config | None) -> dict:
    """Keyword arguments that launch a plain ``@triton.jit`` kernel with ``config``."""
    if config is None:
        return {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def autotune_bucket(n: int) -> int:
    """Power-of-two bucket of a size for autotune keys, so decode does not retune every step."""
    return triton.next_power_of_2(max(n, 1))


def require_int32_plane_offsets(**tensors: torch.Tensor | None) -> None:
    """Refuse a tensor whose span inside one (batch, head) plane reaches 2**31 elements.

    The attention-shaped kernels add 64-bit (batch, head) bases to 32-bit
    in-plane offsets (``token * stride``, ``slot * stride``): 64-bit indices
    there cost up to 60 more registers a thread on sm_90, for spans no
    realistic chunk reaches (a 256k-token chunk of HF's ``[B, T, Hq, D]``
    view at 64 heads of 128). The leading axes are ``[B]`` for 2-D tensors
    and ``[B, H]`` otherwise.
    """
    # Runs at every launch (each layer of a decode step): plain int arithmetic, torch strides are never negative.
    for name, x in tensors.items():
        if x is None:
            continue
        shape, strides = x.shape, x.stride()
        span = 0
        for axis in range(1 if x.ndim == 2 else 2, x.ndim):
            if shape[axis]:
                span += (shape[axis] - 1) * strides[axis]
        if span >= 2**31:
            raise ValueError(
                f"{name} spans {span + 1} elements inside one (batch, head) plane, past the kernels' 32-bit "
                "in-plane offsets (2**31): feed the tokens in shorter chunks (e.g. generate(prefill_chunk_size=...)) "
                "or pass a contiguous tensor"
            )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact for fp32 inputs (and everything under the interpreter).

    Kernels that recompute each other's scores (attention's lse, H2O's column
    sums) must use the same one, or ``exp(s - lse)`` drifts.
    """
    return "ieee" if (dtype == torch.float32 or INTERPRET) else "tf32"


# --------------------------------------------------------------------------- #
# The visibility rule, for every kernel
# --------------------------------------------------------------------------- #
# Key j is visible to query i iff pos_k[j] >= 0, pos_k[j] <= pos_q[i] and, with
# a window, pos_q[i] - pos_k[j] < window (the torch copy is slots.visibility_mask).
# Kernels hold positions as int32 vectors: pos_q over a tile's rows and pos_k
# over its keys, -1 for empty slots, padding and out-of-range lanes.


@triton.jit
def visible_pairs(pos_q, pos_k, window, HAS_WINDOW: tl.constexpr):
    """``[M, N]`` bool: which (row, key) pairs of a tile the rule lets through."""
    visible = (pos_k[None, :] >= 0) & (pos_k[None, :] <= pos_q[:, None])
    if HAS_WINDOW:
        visible = visible & ((pos_q[:, None] - pos_k[None, :]) < window)
    return visible


@triton.jit
def tile_fully_visible(pos_q_min, pos_q_max, pos_k, window, HAS_WINDOW: tl.constexpr):
    """Scalar: every row of a tile sees every key of it, so the mask can be skipped.

    ``pos_q_min``/``pos_q_max`` bound the positions of the rows that matter
    (rows whose results are stored; a padding row's -1 keeps the mask on). With
    every key real (min >= 0) and no later than the earliest row, and, with a
    window, the latest row within ``window`` of the earliest key, the rule holds
    for every pair. Out-of-range keys carry -1, so a ragged tile is masked.
    """
    key_min = tl.min(pos_k, axis=0)
    visible = (key_min >= 0) & (tl.max(pos_k, axis=0) <= pos_q_min)
    if HAS_WINDOW:
        visible = visible & (pos_q_max - key_min < window)
    return visible


# --------------------------------------------------------------------------- #
# Slot addressing: dense buffers and paged pools, one translation
# --------------------------------------------------------------------------- #
# A kernel names a sequence's slots by logical index s in [0, S). Dense, slot s
# of sequence b is row b of the tensor at offset s (``b * stride_b + s *
# stride_s``). Paged, it lives in page ``table_row[s // PAGE_SIZE]`` of a pool
# shared by every sequence, at offset ``s % PAGE_SIZE`` in it (``page *
# stride_page + (s % PAGE_SIZE) * stride_slot``, 64-bit: a pool spans more
# than 2**31 elements). A page id outside [0, num_pages) (an unallocated entry
# of the block table, e.g. -1) makes its slots empty: nothing is read or written
# there. ``PAGED`` is a constexpr, so a dense launch compiles to the dense
# arithmetic alone.


@triton.jit
def sequence_base(ptr, b, stride_b, PAGED: tl.constexpr):
    """Where sequence ``b``'s slots are addressed from: its row of a dense tensor, or the whole pool."""
    if PAGED:
        base = ptr
    else:
        base = ptr + b * stride_b
    return base


@triton.jit
def locate_slots(slots, valid, table_row, stride_table, num_pages, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """``(page, in_page, valid)`` of a sequence's logical ``slots``: the page holding each (paged; unused
    dense), the offset in it, and ``valid`` narrowed to the slots whose page exists (paged)."""
    if PAGED:
        page = tl.load(table_row + (slots // PAGE_SIZE) * stride_table, mask=valid, other=-1).to(tl.int64)
        valid = valid & (page >= 0) & (page < num_pages)
        in_page = slots % PAGE_SIZE
    else:
        page = slots
        in_page = slots
    return page, in_page, valid


@triton.jit
def slot_offsets(page, in_page, stride_page, stride_slot, PAGED: tl.constexpr):
    """Element offsets from :func:`sequence_base` of slots located by :func:`locate_slots`."""
    if PAGED:
        offsets = page * stride_page + in_page * stride_slot
    else:
        offsets = in_page * stride_slot
    return offsets


@triton.jit
def load_positions(pos_base, stride_pp, stride_ps, slots, valid, table_row, stride_table, num_pages,
                   PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """int32 positions of ``slots``; -1 where not ``valid`` or (paged) in no page."""
    page, in_page, valid = locate_slots(slots, valid, table_row, stride_table, num_pages, PAGE_SIZE, PAGED)
    offsets = slot_offsets(page, in_page, stride_pp, stride_ps, PAGED)
    return tl.load(pos_base + offsets, mask=valid, other=-1).to(tl.int32)


@triton.jit
def slots_in_use_end(count_ptr, S):
    """int32 ``slot_count`` read from ``count_ptr``, clamped to ``[0, S]`` before the cast: an int64
    count of 2**31 or more means every slot, not a wrapped one."""
    return tl.maximum(tl.minimum(tl.load(count_ptr), S), 0).to(tl.int32)


@triton.jit
def query_positions(pos_base, stride_pp, stride_ps, query_slot, valid, slot_end, table_row, stride_table, num_pages,
                    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """int32 positions of ``query_slot``; -1 where not ``valid`` or outside ``[0, slot_end)``.

    Query slots are not checked on the host (a sync), so the bound also keeps a bad one from reading
    outside ``pos``.
    """
    used = valid & (query_slot >= 0) & (query_slot < slot_end)
    return load_positions(pos_base, stride_pp, stride_ps, query_slot, used, table_row, stride_table, num_pages,
                          PAGE_SIZE, PAGED)


@triton.jit
def visible_slot_range(pos_base, stride_pp, stride_ps, lo, hi, oldest, latest, table_row, stride_table, num_pages,
                       SCAN_BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """``(first, end)``: the slots of ``[lo, hi)`` holding a position in ``[oldest, latest]`` all lie in
    ``[first, end)``; ``first >= end`` when none does.

    ``oldest >= 0`` (empty slots, ``-1``, never count). Reads only positions,
    ``SCAN_BLOCK`` slots at a time: the causal skip of a tile loop, by position,
    whatever the slot order.
    """
    first = hi
    last = lo - 1
    for start in range(lo, hi, SCAN_BLOCK):
        slots = start + tl.arange(0, SCAN_BLOCK)
        pos = load_positions(pos_base, stride_pp, stride_ps, slots, slots < hi, table_row, stride_table, num_pages,
                             PAGE_SIZE, PAGED)
        seen = (pos >= oldest) & (pos <= latest)
        first = tl.minimum(first, tl.min(tl.where(seen, slots, hi), axis=0))
        last = tl.maximum(last, tl.max(tl.where(seen, slots, lo - 1), axis=0))
    return first, last + 1
