"""Triton kernel: in-place compaction of every layer's K and V plus the slot metadata.

Same contract as :func:`epikv_triton.ops.naive.compact_slots_`:

* ``kv``: ``[P, B, H, S, D]`` fp16, bf16 or fp32, any strides (P planes = every
  layer's K and V; typically a view ``buf[..., :S, :]`` of a larger cache).
* ``pos``: ``[B, S]`` int32/int64 and ``scores``: ``[B, S]`` float32, any strides.
* ``keep``: ``[B, K]`` int64, any strides: kept slot indices in ascending order,
  then ``-1`` padding (what :func:`~epikv_triton.ops.naive.select_slots` returns).

Afterwards slot ``i < K`` holds what slot ``keep[b, i]`` held; slots with
``keep = -1`` and all slots ``>= K`` get ``pos = -1``, ``score = NaN``, and their
K/V bytes are left untouched (they are masked out by ``pos``).

Design — one launch, no host synchronisation, race-free by construction:

* Grid ``(P·B·H, cdiv(D, BLOCK_D))``. A program owns one ``(plane, b, h)`` row and
  one block of ``D``; no two programs touch the same bytes.
* The program walks the destination slots ``0..K-1`` in blocks of ``BLOCK_S``, in
  increasing order, loading the whole block of sources before storing it (a
  barrier separates the two, so no warp stores while another still loads).
  Since ``keep`` is strictly ascending, ``keep[i] >= i``: every source a block
  reads lies at or after that block's first destination, so no earlier block
  has overwritten it, and the block's own stores wait for its loads.
* Where ``keep[i] == i`` the slot is already in place: its load and store are
  masked off, so the kept prefix and the untouched recent tail cost no bandwidth.
* The metadata of sequence ``b`` is compacted in the same launch by the programs
  of plane 0, head 0, D-block 0, with the same in-order walk (same argument), and
  the slots ``>= K`` are cleared after the walk (a barrier first: a slot ``>= K``
  may still be the source of a destination ``< K``).

Precondition (not checked: that would need a host sync): the non-negative
entries of each ``keep`` row are strictly increasing and sit before the ``-1``
padding, so that ``keep[i] >= i``.

Bytes moved: ``2 · P · B · H · D · itemsize`` per slot that actually moves, plus
``keep`` reads; no flops. The kernel is a strided copy, tuned over the tile
(slots × head-dim elements) and the warps that carry it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import naive
from ._triton_support import autotune, launch_options

# GPU tuning space. Every config gives each thread 16–32 elements per tile (2–4
# 16-byte vectors of fp16/bf16) so enough bytes are in flight per warp, across
# tile shapes that suit D = 64 and D = 128 and both short and long K walks.
COMPACTION_CONFIGS = [
    triton.Config({"BLOCK_S": 32, "BLOCK_D": 64}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_S": 64, "BLOCK_D": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_S": 16, "BLOCK_D": 128}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_S": 32, "BLOCK_D": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_S": 32, "BLOCK_D": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_S": 64, "BLOCK_D": 128}, num_warps=8, num_stages=1),
]
COMPACTION_INTERPRET_CONFIG = triton.Config({"BLOCK_S": 32, "BLOCK_D": 64}, num_warps=1, num_stages=1)


# ----------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------


@triton.jit
def _compact_slots_kernel(
    kv_ptr,
    pos_ptr,
    scores_ptr,
    keep_ptr,
    B,
    H,
    S,
    K,
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
    stride_keep_b,
    stride_keep_k,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Copying needs no arithmetic on the data, so bf16 needs no interpreter upcast.
    row = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    head = row % H
    seq = (row // H) % B
    plane = row // (H * B)

    dims = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    kv_row = kv_ptr + plane * stride_kv_p + seq * stride_kv_b + head * stride_kv_h
    dim_offsets = dims.to(tl.int64)[None, :] * stride_kv_d
    keep_row = keep_ptr + seq * stride_keep_b
    owns_metadata = (plane == 0) & (head == 0) & (d_block == 0)
    # Destinations below this bound get their metadata written: all K for the
    # owner programs, none for the rest.
    metadata_limit = K * owns_metadata.to(tl.int32)

    for start in range(0, K, BLOCK_S):
        dest = start + tl.arange(0, BLOCK_S)
        src = tl.load(keep_row + dest.to(tl.int64) * stride_keep_k, mask=dest < K, other=-1)
        # keep = -1 leaves the bytes as they are; keep[i] == i is already in place.
        moves = (src >= 0) & (src != dest)
        tile_mask = moves[:, None] & dim_ok[None, :]
        tile = tl.load(kv_row + src[:, None] * stride_kv_s + dim_offsets, mask=tile_mask)
        # Metadata rides along, masked off outside its owner programs (a masked
        # access moves no bytes; masks rather than a branch keep the loaded
        # values in scope for the stores after the barrier).
        meta_dest = dest < metadata_limit
        meta_src = meta_dest & (src >= 0)
        src_pos = tl.load(pos_ptr + seq * stride_pos_b + src * stride_pos_s, mask=meta_src, other=-1)
        src_score = tl.load(scores_ptr + seq * stride_scores_b + src * stride_scores_s, mask=meta_src, other=float("nan"))
        # Every warp has loaded its sources before any warp stores into a slot
        # another warp of this block may still be reading.
        tl.debug_barrier()
        tl.store(kv_row + dest.to(tl.int64)[:, None] * stride_kv_s + dim_offsets, tile, mask=tile_mask)
        dest_offsets = dest.to(tl.int64)
        tl.store(pos_ptr + seq * stride_pos_b + dest_offsets * stride_pos_s, src_pos, mask=meta_dest)
        tl.store(scores_ptr + seq * stride_scores_b + dest_offsets * stride_scores_s, src_score, mask=meta_dest)

    if owns_metadata:
        # Slots >= K may have been sources above: clear them only after every load.
        tl.debug_barrier()
        for start in range(K, S, BLOCK_S):
            slot = start + tl.arange(0, BLOCK_S)
            in_range = slot < S
            empty_pos = tl.full([BLOCK_S], -1, tl.int64)
            tl.store(pos_ptr + seq * stride_pos_b + slot.to(tl.int64) * stride_pos_s, empty_pos, mask=in_range)
            empty_score = tl.full([BLOCK_S], float("nan"), tl.float32)
            tl.store(scores_ptr + seq * stride_scores_b + slot.to(tl.int64) * stride_scores_s, empty_score, mask=in_range)


# Tuning reruns the kernel on the caller's cache, which must come out compacted
# once: the tensors it writes are saved and restored around every trial (a
# transient copy of kv, once per head_dim and dtype per process).
_compact_slots_autotuned = autotune(
    COMPACTION_CONFIGS,
    key=["D"],
    interpret_config=COMPACTION_INTERPRET_CONFIG,
    restore_value=["kv_ptr", "pos_ptr", "scores_ptr"],
)(_compact_slots_kernel)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------


def compact_slots_(
    kv: torch.Tensor,
    pos: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    *,
    config: triton.Config | None = None,
) -> None:
    """Gather ``keep`` to the front of every plane of ``kv`` and of ``pos``/``scores``, in place.

    Inputs are assumed validated by :func:`epikv_triton.ops.compact_slots_`.
    ``config`` launches that one config instead of autotuning (tests use it to
    cover the whole GPU space).
    """
    P, B, H, S, D = kv.shape
    K = keep.shape[1]
    if B == 0 or S == 0:
        return
    if P == 0 or H == 0 or D == 0:
        # No K/V bytes to move, so no grid; the metadata still needs compacting.
        naive.compact_slots_(kv, pos, scores, keep)
        return
    args = (
        kv, pos, scores, keep,
        B, H, S, K, D,
        *kv.stride(),
        *pos.stride(),
        *scores.stride(),
        *keep.stride(),
    )
    if config is None:
        grid = lambda meta: (P * B * H, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
        _compact_slots_autotuned[grid](*args)
    else:
        grid = (P * B * H, triton.cdiv(D, config.kwargs["BLOCK_D"]))
        _compact_slots_kernel[grid](*args, **launch_options(config))


__all__ = ["COMPACTION_CONFIGS", "compact_slots_"]
