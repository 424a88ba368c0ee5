"""Triton kernel: exact H2O attention column sums without the attention matrix.

Pass 2 of the two-pass H2O score. Pass 1 is the attention forward itself,
:func:`epikv_triton.ops.slot_attention` with ``return_lse=True``, which yields
each query row's natural-log normaliser ``lse``. With it every probability is
known in closed form, ``p_ij = exp(scale · q_i · k_j − lse_i)``, so this pass
recomputes the score tiles and sums them over queries, one key block at a time.
One pass cannot do it: inside a FlashAttention loop the probabilities are only
known relative to a running maximum that later keys may still raise.

Same contract as :func:`epikv_triton.ops.attention_column_sums`:

* ``q``: ``[B, Hq, T, D]``; ``k``: ``[B, Hkv, S, D]``; one dtype among fp16,
  bf16, fp32; ``Hq = G · Hkv``; any strides.
* ``pos``: ``[B, S]`` int32/int64, ``-1`` = empty/padding slot; slot order
  carries no meaning. ``query_slots``: ``[B, T]`` int32/int64, the slot of
  query ``t``'s own key (``None``: the last ``T`` slots), so query ``t`` has
  position ``pos[:, query_slots[:, t]]``. Visibility is the library's one rule
  (:func:`~epikv_triton.ops.slots.visibility_mask`; in kernels
  :func:`~epikv_triton.ops._triton_support.visible_pairs`), and a tile whose
  positions prove every pair visible skips the mask.
* ``lse``: ``[B, Hq, T]`` float32, any strides (what ``slot_attention`` returns);
  a row with ``lse = −inf`` saw no key and contributes nothing.
* ``slot_count``: optional ``[B]`` int32/int64 on the device, the slots in use:
  slots ``>= slot_count`` are empty as keys and as query slots; a key block
  past it loads no key and walks no row (its sums are 0).
* Returns ``[B, Hkv, S]`` float32, contiguous: for every key slot the summed
  probability over the ``T`` queries and the ``G`` query heads of its group.

How the work is cut (the transpose of the forward kernel, like a FlashAttention
backward's dK/dV pass):

* Grid ``(cdiv(S, BLOCK_N), B · Hkv)``: a program owns ``BLOCK_N`` key slots of
  one (batch, kv head), keeps their K tile in registers and walks the packed
  query rows ``r = t · G + g`` (new token ``t``, head ``g`` of the group) in
  blocks of ``BLOCK_M``, so every K tile serves all ``G`` heads and each column
  sum is owned by exactly one program (no atomics, deterministic).
* Causal skip, by position (slot order means nothing): a program first scans
  the ``T`` query positions (``SCAN_BLOCK`` at a time, int loads only) for the
  first and last token whose position can see some key of its block: at or
  after the block's oldest real position and, with a window, before its
  newest plus ``window``. The row walk covers those tokens only; with the new
  tokens last and in order this is the classic causal (and window) bound, and
  a block with no real key walks nothing.
* Scores are formed exactly as the forward kernel forms them (same ``tl.dot``
  precision, base-2 exponent with ``log2(e)`` folded into the scale), so the
  probabilities agree with the ``lse`` they are normalised by.

Cost per (batch, kv head): ``2 · T · G · S · D`` FLOPs of ``QKᵀ`` (half the
forward's, halved again by the causal skip for a square prefill) and ``T · G · S``
exponentials; minimal bytes ``(S + T · G) · D · itemsize + 4 · (T · G + S)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import (
    INTERPRET,
    LOG2_E,
    LOG2_E_JIT,
    autotune,
    autotune_bucket,
    dot_precision,
    launch_options,
    locate_slots,
    query_positions,
    require_int32_plane_offsets,
    sequence_base,
    slot_offsets,
    slots_in_use_end,
    tile_fully_visible,
    visible_pairs,
)
from .pages import PageTable, kernel_paging
from .slots import resolve_query_slots

# GPU tuning space. BLOCK_N is the resident key tile (like the K/V tile of a
# FlashAttention backward), BLOCK_M the streamed query-row tile. Prefill is
# compute bound (QKᵀ plus one exponential per element), so large tiles with
# pipelined Q loads; decode has only G rows per (batch, kv head) and is bound by
# reading K once, so BLOCK_M = 16 (the smallest tile tl.dot takes) with long key
# tiles. Configs that do not fit a head dim (D = 256 with 128×128 tiles) fail to
# compile and are skipped by the autotuner.
COLUMN_SUM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 256}, num_warps=8, num_stages=2),
]

# The interpreter runs one config; big tiles mean fewer interpreted iterations.
COLUMN_SUM_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=1)

# Query tokens per strip of the causal-skip scan (one strip for any decode step or short chunk).
SCAN_BLOCK = 1024

# Tile-relevant sizes and the (batch, kv head) count that multiplies the key blocks into programs.
AUTOTUNE_KEY = ["BLOCK_D", "G", "ROWS_BUCKET", "KEYS_BUCKET", "PROGRAMS_BUCKET", "HAS_WINDOW", "PAGED", "PAGE_SIZE"]


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #


@triton.jit
def _column_sums_kernel(
    Q, K, POS, QUERY_SLOTS, SLOT_COUNT, LSE, OUT, BLOCK_TABLE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_pb, stride_ps,
    stride_sb, stride_st, stride_cb,
    stride_lb, stride_lh, stride_lt,
    stride_tb, stride_tp, num_pages,
    T, S, D, G, Hkv,
    qk_scale, window,
    ROWS_BUCKET, KEYS_BUCKET, PROGRAMS_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SLOT_COUNT: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit bases: batch * batch-stride overflows int32 for long caches.
    b = (pid_bh // Hkv).to(tl.int64)
    kv_head = (pid_bh % Hkv).to(tl.int64)
    num_rows = T * G

    # Slots in use: [0, slot_end), read from device memory (see the module docstring).
    slot_end = S
    if HAS_SLOT_COUNT:
        slot_end = slots_in_use_end(SLOT_COUNT + b * stride_cb, S)
    block_start = pid_n * BLOCK_N
    keys = block_start + tl.arange(0, BLOCK_N)
    key_stored = keys < S
    key_valid = keys < slot_end
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < D

    # Slot s of this sequence: row b of K and POS (dense), or page BLOCK_TABLE[b, s // PAGE_SIZE] of their
    # pools (paged); _triton_support's "slot addressing" helpers translate.
    pos_base = sequence_base(POS, b, stride_pb, PAGED)
    table_row = BLOCK_TABLE  # None on a dense launch
    if PAGED:
        table_row = BLOCK_TABLE + b * stride_tb
    page, in_page, key_valid = locate_slots(keys, key_valid, table_row, stride_tp, num_pages, PAGE_SIZE, PAGED)
    # Positions are held as int32. Slots past those in use (or in no page) read -1: never visible (and past
    # S, never stored).
    pos_k = tl.load(
        pos_base + slot_offsets(page, in_page, stride_pb, stride_ps, PAGED), mask=key_valid, other=-1
    ).to(tl.int32)

    # Tokens that can see any key of this block (see the module docstring).
    slot_row = QUERY_SLOTS + b * stride_sb
    oldest_key = tl.min(tl.where(pos_k >= 0, pos_k, 2147483647), axis=0)
    if HAS_WINDOW:
        # Saturated at the largest int32: newest + window - 1 wraps negative for a
        # huge window (2**31 - 1 as "no window"), and then no token would see the block.
        newest_key = tl.max(pos_k, axis=0)
        latest_seeing = newest_key + tl.minimum(window - 1, 2147483647 - tl.maximum(newest_key, 0))
    else:
        latest_seeing = 2147483647
    token_lo, token_hi = _seeing_token_range(
        pos_base, stride_pb, stride_ps, slot_row, stride_st, T, slot_end, oldest_key, latest_seeing,
        table_row, stride_tp, num_pages, SCAN_BLOCK, PAGE_SIZE, PAGED,
    )

    # Loaded after the scan, so its registers are not live during it; transposed
    # ([D, N]) so each score tile is a plain q @ k_t.
    k_t = tl.load(
        sequence_base(K, b, stride_kb, PAGED) + kv_head * stride_kh
        + slot_offsets(page[None, :], in_page[None, :], stride_kb, stride_ks, PAGED) + dims[:, None] * stride_kd,
        mask=key_valid[None, :] & dim_valid[:, None], other=0.0,
    )
    if UPCAST:
        k_t = k_t.to(tl.float32)

    q_base = Q + b * stride_qb
    lse_base = LSE + b * stride_lb
    column_sums = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(token_lo * G, token_hi * G, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < num_rows
        token = rows // G
        q_head = kv_head * G + rows % G
        # A query's position is its own slot's. Rows past the end (and query
        # slots outside the slots in use) read position -1 and lse -inf: they see nothing.
        query_slot = tl.load(slot_row + token * stride_st, mask=row_valid, other=0).to(tl.int32)
        pos_q = query_positions(
            pos_base, stride_pb, stride_ps, query_slot, row_valid, slot_end, table_row, stride_tp, num_pages,
            PAGE_SIZE, PAGED,
        )
        lse = tl.load(lse_base + q_head * stride_lh + token * stride_lt, mask=row_valid, other=float("-inf"))
        q = tl.load(
            q_base + q_head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :] * stride_qd,
            mask=row_valid[:, None] & dim_valid[None, :], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)

        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        # A blind row (lse = -inf) gets +inf as its normaliser: exp2(s - inf) = 0,
        # never inf or NaN, before the mask even applies.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2_E_JIT)
        logits = scores - lse2[:, None]
        # Positions are the only truth; a tile they prove fully visible skips the
        # mask. Otherwise it applies before the exponent: a hidden pair may score
        # far above lse.
        pos_q_min = tl.min(tl.where(row_valid, pos_q, 2147483647), axis=0)
        if not tile_fully_visible(pos_q_min, tl.max(pos_q, axis=0), pos_k, window, HAS_WINDOW):
            logits = tl.where(visible_pairs(pos_q, pos_k, window, HAS_WINDOW), logits, float("-inf"))
        column_sums += tl.sum(tl.exp2(logits), axis=0)

    # Every slot of the block is written, 0 where nothing looked at it.
    tl.store(OUT + pid_bh.to(tl.int64) * S + keys, column_sums, mask=key_stored)


@triton.jit
def _seeing_token_range(
    pos_base, stride_pb, stride_ps, slot_row, stride_st, T, slot_end, oldest, latest, table_row, stride_tp,
    num_pages, SCAN_BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
):
    """``(lo, hi)``: every token whose position lies in ``[oldest, latest]`` is in ``[lo, hi)``; ``lo >= hi``
    when none is. A token's position is its query slot's (none past ``slot_end``)."""
    lo = T
    last = -1
    for start in range(0, T, SCAN_BLOCK):
        tokens = start + tl.arange(0, SCAN_BLOCK)
        valid = tokens < T
        query_slot = tl.load(slot_row + tokens * stride_st, mask=valid, other=0).to(tl.int32)
        pos_q = query_positions(
            pos_base, stride_pb, stride_ps, query_slot, valid, slot_end, table_row, stride_tp, num_pages,
            PAGE_SIZE, PAGED,
        )
        seeing = (pos_q >= oldest) & (pos_q <= latest)
        lo = tl.minimum(lo, tl.min(tl.where(seeing, tokens, T), axis=0))
        last = tl.maximum(last, tl.max(tl.where(seeing, tokens, -1), axis=0))
    return lo, last + 1


_column_sums_autotuned = autotune(COLUMN_SUM_CONFIGS, AUTOTUNE_KEY, COLUMN_SUM_INTERPRET_CONFIG)(_column_sums_kernel)


# --------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------- #


def attention_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    lse: torch.Tensor,
    *,
    query_slots: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    slot_count: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launch :func:`epikv_triton.ops.attention_column_sums` on the kernel (inputs already validated).

    Returns ``[B, Hkv, S]`` float32. ``config`` launches that config instead of
    autotuning (tests use it to run every config of :data:`COLUMN_SUM_CONFIGS`).
    """
    return _launch(q, k, pos, lse, None, resolve_query_slots(query_slots, q, k), scale, window, slot_count, config)


def paged_attention_column_sums(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    lse: torch.Tensor,
    *,
    query_slots: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    slot_count: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launch :func:`epikv_triton.ops.paged_attention_column_sums` on the kernel (inputs already validated):
    the same kernel over the pool ``[num_pages, page_size, Hkv, D]`` seen as ``[num_pages, Hkv, page_size, D]``.

    Returns ``[B, Hkv, max_pages · page_size]`` float32, one sum per logical slot.
    """
    paging = PageTable(block_table, k_pages.shape[1], k_pages.shape[0])
    return _launch(q, k_pages.transpose(1, 2), pos_pages, lse, paging, query_slots, scale, window, slot_count, config)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    lse: torch.Tensor,
    paging: PageTable | None,
    query_slots: torch.Tensor,
    scale: float | None,
    window: int | None,
    slot_count: torch.Tensor | None,
    config: triton.Config | None,
) -> torch.Tensor:
    """Both layouts' launch: ``k`` is ``[B, Hkv, S, D]`` (dense) or a ``[num_pages, Hkv, page_size, D]`` pool,
    ``pos`` ``[B, S]`` or ``[num_pages, page_size]``, with ``paging`` naming the pages."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = k.shape[2] if paging is None else paging.slots
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty((B, Hkv, S), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    require_int32_plane_offsets(q=q, k=k, pos=pos, query_slots=query_slots, lse=lse)

    (table, *table_args), paging_constants = kernel_paging(paging)
    args = (
        q, k, pos, query_slots, slot_count if slot_count is not None else pos, lse, out, table,
        *q.stride(), *k.stride(), *pos.stride(), *query_slots.stride(),
        slot_count.stride(0) if slot_count is not None else 0, *lse.stride(),
        *table_args,
        T, S, D, G, Hkv,
        scale * LOG2_E, window if window is not None else 0,
        autotune_bucket(T * G), autotune_bucket(S), autotune_bucket(B * Hkv),
    )
    constants = dict(
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_WINDOW=window is not None,
        HAS_SLOT_COUNT=slot_count is not None,
        SCAN_BLOCK=SCAN_BLOCK,
        UPCAST=INTERPRET,
        # Must match the forward kernel's scores, or exp(s − lse) drifts from
        # the probabilities lse normalised (tf32 only matters for fp32 inputs).
        DOT_PRECISION=dot_precision(q.dtype),
        **paging_constants,
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)

    if config is not None:
        _column_sums_kernel[grid](*args, **constants, **launch_options(config))
    else:
        _column_sums_autotuned[grid](*args, **constants)
    return out


__all__ = ["COLUMN_SUM_CONFIGS", "attention_column_sums", "paged_attention_column_sums"]
