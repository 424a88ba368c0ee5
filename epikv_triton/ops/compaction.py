"""Triton kernel: hole-filling compaction of every layer's K and V plus the slot metadata.

Same contract as :func:`epikv_triton.ops.compact_slots_`:

* ``kv``: ``[P, B, H, S, D]`` fp16, bf16 or fp32, any strides (P planes = every
  layer's K and V; typically a view ``buf[..., :S, :]`` of a larger cache).
* ``pos``: ``[B, S]`` int32/int64 and ``scores``: ``[B, S]`` float32, any strides.
* ``destination``: ``[B, W]`` int64, any strides (what
  :func:`~epikv_triton.ops.compaction_plan` returns): slot ``F + j``
  (``F = S - W``, the new fill) moves to slot ``destination[b, j] < F``, or is
  dropped (``-1``).

Slot order means nothing (visibility comes from ``pos``), so an eviction moves
only the kept slots at or above the new fill, into the freed slots below it:
at most ``W`` slots per sequence, ``W`` = the slots released, whatever the
budget.

Design — one launch, no host synchronisation, race-free by construction:

* Grid ``(P·B·H, cdiv(D, BLOCK_D))``. A program owns one ``(plane, b, h)`` row and
  one block of ``D``; no two programs touch the same K/V bytes.
* Sources lie in ``[F, S)`` and destinations in ``[0, F)``, all distinct: no
  store can hit a slot some program still has to read, in any order, so the
  K/V walk needs no barrier. A dropped slot's load and store are masked off.
* The metadata of sequence ``b`` is moved in the same launch by the program of
  plane 0, head 0, D-block 0; it then clears ``pos``/``scores`` of ``[F, S)``
  after a barrier (those slots were its sources).

Precondition (not checked: that would need a host sync): destinations are
distinct and below ``F``. One outside ``[0, F)`` drops its slot (a masked
store), so it never writes outside the view or onto a source slot.

Bytes moved: ``2 · P · H · D · itemsize`` per slot that moves (read and
write), plus ``destination`` and the ``[F, S)`` metadata; no flops. The tile
(slots × head-dim elements) and warps are picked from the shape
(:func:`pick_config`): tuning by trial would run the in-place kernel on the
caller's cache, which would then need saving and restoring around every trial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import naive
from ._triton_support import launch_options, locate_slots, sequence_base, slot_offsets
from .pages import PageTable, kernel_paging

# Every config gives each thread 16–32 elements per tile (2–4 16-byte vectors
# of fp16/bf16) so enough bytes are in flight per warp; BLOCK_D = 64 suits
# head_dim 64, 128 suits head_dim 128 (and 256 in two blocks); BLOCK_S follows
# the slots released per eviction (decode: 1–16, chunked prefill: the chunk).
COMPACTION_CONFIGS = [
    triton.Config({"BLOCK_S": 16, "BLOCK_D": 64}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_S": 32, "BLOCK_D": 64}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_S": 64, "BLOCK_D": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_S": 16, "BLOCK_D": 128}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_S": 32, "BLOCK_D": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_S": 64, "BLOCK_D": 128}, num_warps=8, num_stages=1),
]


def pick_config(width: int, head_dim: int) -> triton.Config:
    """The config for ``width`` released slots of ``head_dim``: the smallest tile that covers them."""
    block_d = 64 if head_dim <= 64 else 128
    fitting = [c for c in COMPACTION_CONFIGS if c.kwargs["BLOCK_D"] == block_d]
    for config in fitting:
        if config.kwargs["BLOCK_S"] >= width:
            return config
    return fitting[-1]


# ----------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------


@triton.jit
def _compact_slots_kernel(
    kv_ptr,
    pos_ptr,
    scores_ptr,
    destination_ptr,
    table_ptr,
    B,
    H,
    S,
    W,
    D,
    stride_kv_p,
    stride_kv_b,
    stride_kv_h,
    stride_kv_s,
    stride_kv_d,
    stride_pos_b,
    stride_pos_s,
    stride_scores_b,
    stride_scores_s,
    stride_destination_b,
    stride_destination_w,
    stride_table_b,
    stride_table_p,
    num_pages,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    # Copying needs no arithmetic on the data, so bf16 needs no interpreter upcast.
    row = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    head = row % H
    seq = (row // H) % B
    plane = row // (H * B)
    fill = S - W

    dims = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    # Slot s of this sequence: row seq of kv, pos and scores (dense), or page table[seq, s // PAGE_SIZE] of
    # their pools (paged); _triton_support's "slot addressing" helpers translate.
    kv_row = sequence_base(kv_ptr + plane * stride_kv_p + head * stride_kv_h, seq, stride_kv_b, PAGED)
    dim_offsets = dims.to(tl.int64)[None, :] * stride_kv_d
    destination_row = destination_ptr + seq * stride_destination_b
    pos_row = sequence_base(pos_ptr, seq, stride_pos_b, PAGED)
    scores_row = sequence_base(scores_ptr, seq, stride_scores_b, PAGED)
    table_row = table_ptr  # None on a dense launch
    if PAGED:
        table_row = table_ptr + seq * stride_table_b
    owns_metadata = (plane == 0) & (head == 0) & (d_block == 0)
    # Released slots whose metadata this program moves: all W for the owner, none for the rest.
    metadata_width = W * owns_metadata.to(tl.int32)

    for start in range(0, W, BLOCK_S):
        offset = start + tl.arange(0, BLOCK_S)
        in_range = offset < W
        dest = tl.load(destination_row + offset.to(tl.int64) * stride_destination_w, mask=in_range, other=-1)
        # Only destinations in [0, fill) move: the bound is free, and a bad one (unchecked: a host sync)
        # then drops its slot instead of writing outside the view or onto a slot still to be read.
        moves = (dest >= 0) & (dest < fill)
        src = (fill + offset).to(tl.int64)
        # Paged, a slot whose source or destination page does not exist does not move.
        src_page, src_in_page, moves = locate_slots(src, moves, table_row, stride_table_p, num_pages, PAGE_SIZE, PAGED)
        dest_page, dest_in_page, moves = locate_slots(
            dest, moves, table_row, stride_table_p, num_pages, PAGE_SIZE, PAGED
        )
        tile_mask = moves[:, None] & dim_ok[None, :]
        src_kv = slot_offsets(src_page[:, None], src_in_page[:, None], stride_kv_b, stride_kv_s, PAGED)
        dest_kv = slot_offsets(dest_page[:, None], dest_in_page[:, None], stride_kv_b, stride_kv_s, PAGED)
        tile = tl.load(kv_row + src_kv + dim_offsets, mask=tile_mask)
        tl.store(kv_row + dest_kv + dim_offsets, tile, mask=tile_mask)
        # Metadata rides along in one program per sequence (a masked access moves no bytes).
        meta_moves = moves & (offset < metadata_width)
        src_pos = slot_offsets(src_page, src_in_page, stride_pos_b, stride_pos_s, PAGED)
        dest_pos = slot_offsets(dest_page, dest_in_page, stride_pos_b, stride_pos_s, PAGED)
        src_score = slot_offsets(src_page, src_in_page, stride_scores_b, stride_scores_s, PAGED)
        dest_score = slot_offsets(dest_page, dest_in_page, stride_scores_b, stride_scores_s, PAGED)
        moved_pos = tl.load(pos_row + src_pos, mask=meta_moves)
        moved_score = tl.load(scores_row + src_score, mask=meta_moves)
        tl.store(pos_row + dest_pos, moved_pos, mask=meta_moves)
        tl.store(scores_row + dest_score, moved_score, mask=meta_moves)

    if owns_metadata:
        # The released slots were this program's sources: clear them only after every load.
        tl.debug_barrier()
        for start in range(0, W, BLOCK_S):
            slot = (fill + start + tl.arange(0, BLOCK_S)).to(tl.int64)
            page, in_page, in_range = locate_slots(
                slot, slot < S, table_row, stride_table_p, num_pages, PAGE_SIZE, PAGED
            )
            pos_at = pos_row + slot_offsets(page, in_page, stride_pos_b, stride_pos_s, PAGED)
            scores_at = scores_row + slot_offsets(page, in_page, stride_scores_b, stride_scores_s, PAGED)
            tl.store(pos_at, tl.full([BLOCK_S], -1, tl.int64), mask=in_range)
            tl.store(scores_at, tl.full([BLOCK_S], float("nan"), tl.float32), mask=in_range)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------


def compact_slots_(
    kv: torch.Tensor,
    pos: torch.Tensor,
    scores: torch.Tensor,
    destination: torch.Tensor,
    *,
    config: triton.Config | None = None,
) -> None:
    """Move slot ``S - W + j`` of every plane of ``kv`` and of ``pos``/``scores`` to ``destination[b, j]``, in place.

    Inputs are assumed validated by :func:`epikv_triton.ops.compact_slots_`.
    ``config`` launches that config instead of :func:`pick_config`'s (tests use
    it to cover every GPU config).
    """
    if 0 in (kv.shape[0], kv.shape[2], kv.shape[4]):
        # No K/V bytes to move, so no grid; the metadata still needs moving.
        naive.compact_slots_(kv, pos, scores, destination)
        return
    _launch(kv, pos, scores, destination, None, config)


def paged_compact_slots_(
    kv_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    scores_pages: torch.Tensor,
    block_table: torch.Tensor,
    destination: torch.Tensor,
    *,
    config: triton.Config | None = None,
) -> None:
    """Launch :func:`epikv_triton.ops.paged_compact_slots_` on the kernel (inputs already validated): the
    same moves over the pools ``kv_pages [P, num_pages, page_size, H, D]`` (seen as ``[P, num_pages, H,
    page_size, D]``), ``pos_pages``/``scores_pages [num_pages, page_size]``, slots located through
    ``block_table``."""
    if 0 in (kv_pages.shape[0], kv_pages.shape[3], kv_pages.shape[4]):
        naive.paged_compact_slots_(kv_pages, pos_pages, scores_pages, block_table, destination)
        return
    paging = PageTable(block_table, kv_pages.shape[2], kv_pages.shape[1])
    _launch(kv_pages.transpose(2, 3), pos_pages, scores_pages, destination, paging, config)


def _launch(
    kv: torch.Tensor,
    pos: torch.Tensor,
    scores: torch.Tensor,
    destination: torch.Tensor,
    paging: PageTable | None,
    config: triton.Config | None,
) -> None:
    """Both layouts' launch: ``kv`` is ``[P, B, H, S, D]`` (dense) or a ``[P, num_pages, H, page_size, D]``
    pool, ``pos``/``scores`` ``[B, S]`` or ``[num_pages, page_size]``, with ``paging`` naming the pages."""
    P, _, H, _, D = kv.shape
    B, W = destination.shape
    S = kv.shape[3] if paging is None else paging.slots
    if B == 0 or W == 0:
        return
    (table, *table_args), paging_constants = kernel_paging(paging)
    config = config or pick_config(W, D)
    grid = (P * B * H, triton.cdiv(D, config.kwargs["BLOCK_D"]))
    _compact_slots_kernel[grid](
        kv, pos, scores, destination, table,
        B, H, S, W, D,
        *kv.stride(),
        *pos.stride(),
        *scores.stride(),
        *destination.stride(),
        *table_args,
        **launch_options(config),
        **paging_constants,
    )


__all__ = ["COMPACTION_CONFIGS", "compact_slots_", "paged_compact_slots_", "pick_config"]
