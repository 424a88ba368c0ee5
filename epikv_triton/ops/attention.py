"""Fused slot attention in Triton: FlashAttention forward + per-new-key delta norms.

One kernel serves prefill (``S == T``), chunked prefill and decode (``T == 1``)
under the contract of :func:`epikv_triton.ops.slot_attention`.

Layouts and dtypes (any strides for the inputs; nothing big is copied):

* ``q``: ``[B, Hq, T, D]``; ``k``, ``v``: ``[B, Hkv, S, D]``; one dtype among
  fp16, bf16, fp32; ``Hq = G * Hkv``.
* ``pos``: ``[B, S]`` int32 or int64, ``-1`` = empty/padding slot; slot order
  carries no meaning.
* ``query_slots``: ``[B, T]`` int32 or int64, the slot of new token ``t``'s own
  key/value (each in ``[0, S)``, not checked here: one outside is a blind
  query whose K/V read as zeros, never memory outside the tensors); query
  ``t`` has position ``pos[:, query_slots[:, t]]``. ``None``: the last ``T`` slots.
* ``prev_k``, ``prev_v``: optional ``[B, Hkv, D]`` (any float dtype), the key and
  value of the token before the first new one.
* ``slot_count``: optional ``[B]`` int32 or int64 on the device, the slots in
  use: slots ``>= slot_count`` are empty as keys and as query slots, and no
  program loads a key tile (or scans a position) past it.
* Returns ``out [B, Hq, T, D]`` in ``q.dtype`` (fresh, contiguous),
  ``dk``/``dv [B, Hkv, T]`` float32 and ``lse [B, Hq, T]`` float32 (natural log).

How the work is cut:

* GQA is packed: a program owns one (batch, kv head) and ``BLOCK_M`` rows of the
  flattened index ``r = t * G + g`` over (new token ``t``, head ``g`` of the
  group), so every K/V tile it loads serves all ``G`` query heads.
* Softmax is online, in float32, in base 2 (``log2(e)`` is folded into the scale).
  A row that sees no key keeps a running max of ``-inf``; the kernel then uses 0
  as the subtraction point and writes ``out = 0``, ``lse = -inf``.
* Split-K: the grid's third axis cuts the key range into contiguous splits of
  ``keys_per_split`` keys (:func:`split_plan`; every launched split has keys),
  used whenever the row blocks alone leave SMs idle (:func:`choose_num_splits`).
  With more than one split each writes a partial (out, lse) to float32
  scratch and a second small kernel merges them.
* The mask costs a compare-and-select per score; a key tile whose positions
  prove every pair visible (two reductions per tile, see
  :func:`~epikv_triton.ops._triton_support.tile_fully_visible`) skips it.
* Causal skip, by position (slot order means nothing): outside the decode
  space a program first scans its split's positions (int loads only, in
  ``SCAN_BLOCK``-slot strips: 8 bytes a slot against 512 of bf16 K/V at
  D = 128, mostly L2 hits as every row block reads the same ones) for the
  first and last slot holding a position some row of its block can see, and
  runs the K/V loop over those tiles only. With the new tokens last and in
  order this is the classic causal bound, so a square prefill still does half
  the work; any other layout gets the bound its positions allow. Decode
  (at most 16 rows: one or a few tokens, nothing later to skip) does no scan.
* K/V tiles: fp16/bf16 on sm_90 and newer, outside the decode space, each is
  one TMA copy through a host tensor descriptor with a ``[1, 1, BLOCK_N,
  BLOCK_D]`` box (``USE_TMA``, :func:`uses_tensor_descriptors`), which wgmma
  reads from shared memory; elsewhere (sm_80, decode, fp32, the interpreter,
  K/V strides no descriptor can address) masked pointer loads.
* Delta norms are emitted by the split-0 program of each row block, before its
  K/V loop, for the tokens whose first row ``t * G`` lies in that block (each
  token exactly once): token ``t`` reads its query slot and token ``t - 1``'s
  (``prev`` for ``t = 0``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._triton_support import (
    INTERPRET,
    LN_2_JIT,
    LOG2_E,
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
    visible_slot_range,
)
from .pages import PageTable, kernel_paging
from .slots import AttentionResult, resolve_query_slots

# --------------------------------------------------------------------------- #
# Config spaces
# --------------------------------------------------------------------------- #


def _set_descriptor_blocks(nargs: dict) -> None:
    """Config pre-hook: the K/V descriptors' box is the config's key tile, ``[1, 1, BLOCK_N, BLOCK_D]``.

    The launcher builds the host descriptors before autotuning picks a config,
    and the box is part of both the descriptor and the kernel's signature. On
    the pointer path ``K_DESC``/``V_DESC`` are the plain tensors and stay as they are.
    """
    for name in ("K_DESC", "V_DESC"):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    """A config of the attention kernel (its pre-hook sizes the K/V descriptors' box)."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
        pre_hook=_set_descriptor_blocks,
    )


# Prefill / chunked prefill: compute bound (4·rows·S·D FLOPs per (batch, kv head)
# against 2·S·D·bytes of K/V), so big M tiles amortise each K/V tile over many
# rows; N and the pipeline depth trade registers/shared memory against latency
# hiding. Every config here compiles for sm_90 at D = 128 (bf16 and fp16, with
# Triton 3.6 and 3.9) with no register spills (`python -m epikv_triton.ops.static_report`):
# 128×128 tiles and 64×64 tiles on 4 warps spill (the fp32 accumulator, the
# score tile and Q's operand do not fit 255 registers per thread side by side)
# and are left out.
PREFILL_CONFIGS = [
    _config(128, 64, 8, 3),
    _config(128, 64, 8, 4),
    _config(128, 32, 8, 3),
    _config(64, 64, 8, 3),
    _config(64, 32, 4, 4),
    _config(64, 32, 4, 3),
]

# Decode: memory bound (each K/V byte is used by only G rows), so the smallest M
# tile tl.dot accepts and long N tiles with deep pipelines to keep HBM busy.
# 256-key tiles are left out: at 4 warps they spill (and need 272 KiB of shared
# memory at 3 stages, above an H100 block's 227 KiB), at 8 warps they spill
# with Triton 3.6 when splitting.
DECODE_CONFIGS = [
    _config(16, 64, 4, 3),
    _config(16, 64, 4, 4),
    _config(16, 128, 4, 3),
    _config(16, 128, 8, 2),
    _config(16, 128, 8, 3),
]

# The interpreter runs one config; big tiles mean fewer interpreted iterations.
INTERPRET_PREFILL_CONFIG = _config(128, 128, 4, 1)
INTERPRET_DECODE_CONFIG = _config(16, 128, 4, 1)

# Rows (T * G) up to this many use the decode space.
DECODE_MAX_ROWS = 16
# Split-K (GPU only): a launch whose row blocks give fewer than PROGRAMS_PER_SM
# programs per SM cuts its keys into splits of at least MIN_KEYS_PER_SPLIT keys.
# Split sizes are multiples of SPLIT_GRANULE keys, so with key tiles up to that
# size a split boundary never cuts a tile in two (a partial tile at each
# boundary would cost a whole tile's loads and dots).
PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 256
SPLIT_GRANULE = 64
MAX_SPLITS = 128
# Positions per strip of the causal-skip scan: few strips (each a dependent
# load's latency) for long caches, a handful of registers per thread.
SCAN_BLOCK = 1024
# Rows merged per program by the split combine kernel.
COMBINE_ROWS = 16 if INTERPRET else 4

# What changes the best config: tile-relevant sizes and the parallelism around
# them (a config tuned for 8 programs is not the one for 512).
AUTOTUNE_KEY = [
    "BLOCK_D", "G", "ROWS_BUCKET", "KEYS_BUCKET", "PROGRAMS_BUCKET", "SPLITS_BUCKET",
    "HAS_WINDOW", "WITH_DELTAS", "WRITE_LSE", "USE_TMA", "PAGED", "PAGE_SIZE",
]


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, K_DESC, V_DESC, POS, QUERY_SLOTS, SLOT_COUNT, OUT, LSE, DK, DV, PREV_K, PREV_V, BLOCK_TABLE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ps,
    stride_sb, stride_st, stride_cb,
    stride_ob, stride_oh, stride_ot, stride_od, stride_osplit,
    stride_lb, stride_lh, stride_lt, stride_lsplit,
    stride_pkb, stride_pkh, stride_pkd,
    stride_pvb, stride_pvh, stride_pvd,
    stride_tb, stride_tp, num_pages,
    T, S, D, G, Hkv,
    qk_scale, window, keys_per_split,
    ROWS_BUCKET, KEYS_BUCKET, PROGRAMS_BUCKET, SPLITS_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SLOT_COUNT: tl.constexpr, WRITE_LSE: tl.constexpr,
    WITH_DELTAS: tl.constexpr, HAS_PREV_K: tl.constexpr, HAS_PREV_V: tl.constexpr,
    SKIP_BY_POSITION: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    # 64-bit bases: batch * batch-stride overflows int32 for long caches.
    b = (pid_bh // Hkv).to(tl.int64)
    kv_head = (pid_bh % Hkv).to(tl.int64)
    num_rows = T * G

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    token = rows // G
    q_head = kv_head * G + rows % G
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < D
    row_dim_mask = row_valid[:, None] & dim_valid[None, :]

    # Slot s of this sequence: row b of K, V and POS (dense), or page BLOCK_TABLE[b, s // PAGE_SIZE] of
    # their pools (paged); _triton_support's "slot addressing" helpers translate.
    pos_base = sequence_base(POS, b, stride_pb, PAGED)
    table_row = BLOCK_TABLE  # None on a dense launch
    if PAGED:
        table_row = BLOCK_TABLE + b * stride_tb
    slot_row = QUERY_SLOTS + b * stride_sb
    # Slots in use: [0, slot_end). Read from device memory, so a static-shape
    # step over the whole buffer needs no host value to skip the empty tail.
    slot_end = S
    if HAS_SLOT_COUNT:
        slot_end = slots_in_use_end(SLOT_COUNT + b * stride_cb, S)
    # A query's position is its own slot's. Slots and positions are held as
    # int32 (half the registers of int64; S < 2**31). Rows past the end, and
    # query slots outside the slots in use, read -1: they see nothing.
    query_slot = tl.load(slot_row + token * stride_st, mask=row_valid, other=0).to(tl.int32)
    pos_q = query_positions(
        pos_base, stride_pb, stride_ps, query_slot, row_valid, slot_end, table_row, stride_tp, num_pages,
        PAGE_SIZE, PAGED,
    )
    k_base = sequence_base(K, b, stride_kb, PAGED) + kv_head * stride_kh
    v_base = sequence_base(V, b, stride_vb, PAGED) + kv_head * stride_vh

    if WITH_DELTAS:
        if split == 0:
            # Row t * G (head 0 of the group) carries token t's delta norms. They
            # need nothing from the softmax: done first, none of their values
            # stays live across the K/V loop.
            owner = row_valid & (rows % G == 0)
            has_before = token > 0
            before_slot = tl.load(slot_row + (token - 1) * stride_st, mask=owner & has_before, other=0).to(tl.int32)
            _store_delta_norms(
                k_base, stride_kb, stride_ks, stride_kd, PREV_K + b * stride_pkb + kv_head * stride_pkh, stride_pkd,
                DK + (b * Hkv + kv_head) * T + token, query_slot, before_slot, has_before, owner, S, dims, dim_valid,
                table_row, stride_tp, num_pages, HAS_PREV_K, PAGE_SIZE, PAGED,
            )
            _store_delta_norms(
                v_base, stride_vb, stride_vs, stride_vd, PREV_V + b * stride_pvb + kv_head * stride_pvh, stride_pvd,
                DV + (b * Hkv + kv_head) * T + token, query_slot, before_slot, has_before, owner, S, dims, dim_valid,
                table_row, stride_tp, num_pages, HAS_PREV_V, PAGE_SIZE, PAGED,
            )

    # Bounds over the stored rows, for the per-tile "no mask needed" proof.
    pos_q_min = tl.min(tl.where(row_valid, pos_q, 2147483647), axis=0)
    pos_q_max = tl.max(pos_q, axis=0)

    key_lo = split * keys_per_split
    # A split wholly past the slots in use gets an empty range (not a reversed one).
    key_hi = tl.maximum(tl.minimum(key_lo + keys_per_split, slot_end), key_lo)
    if SKIP_BY_POSITION:
        # Real rows see positions in [earliest - window + 1, latest]; the scan
        # bounds the slots holding any, aligned to this split's key tiles.
        latest = pos_q_max
        if HAS_WINDOW:
            earliest = tl.min(tl.where(pos_q >= 0, pos_q, 2147483647), axis=0)
            oldest_seen = tl.maximum(earliest - window + 1, 0)
        else:
            oldest_seen = 0
        first, end = visible_slot_range(
            pos_base, stride_pb, stride_ps, key_lo, key_hi, oldest_seen, latest, table_row, stride_tp, num_pages,
            SCAN_BLOCK, PAGE_SIZE, PAGED,
        )
        key_hi = end
        key_lo = key_lo + (first - key_lo) // BLOCK_N * BLOCK_N

    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_dim_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        page, in_page, key_valid = locate_slots(keys, keys < key_hi, table_row, stride_tp, num_pages, PAGE_SIZE, PAGED)
        pos_k = tl.load(
            pos_base + slot_offsets(page, in_page, stride_pb, stride_ps, PAGED), mask=key_valid, other=-1
        ).to(tl.int32)
        if USE_TMA:
            # One TMA copy per tile into shared memory, where wgmma reads it.
            # The [1, 1, BLOCK_N, BLOCK_D] box never leaves this (batch, head);
            # slots past S and dims past D come back as zeros. Keys in
            # [key_hi, S) of a ragged last tile are real slots (finite data,
            # as the twin also assumes of every slot): pos_k = -1 masks their
            # scores, so their probabilities are exactly 0.
            k_t = K_DESC.load([pid_bh // Hkv, pid_bh % Hkv, start, 0]).reshape(BLOCK_N, BLOCK_D).T
            v = V_DESC.load([pid_bh // Hkv, pid_bh % Hkv, start, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            # K is loaded transposed ([D, N]) so the score tile is a plain q @ k_t.
            k_t = tl.load(
                k_base + slot_offsets(page[None, :], in_page[None, :], stride_kb, stride_ks, PAGED)
                + dims[:, None] * stride_kd,
                mask=key_valid[None, :] & dim_valid[:, None], other=0.0,
            )
            v = tl.load(
                v_base + slot_offsets(page[:, None], in_page[:, None], stride_vb, stride_vs, PAGED)
                + dims[None, :] * stride_vd,
                mask=key_valid[:, None] & dim_valid[None, :], other=0.0,
            )
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)

        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        # Positions are the only truth; a tile they prove fully visible skips the mask.
        if not tile_fully_visible(pos_q_min, pos_q_max, pos_k, window, HAS_WINDOW):
            scores = tl.where(visible_pairs(pos_q, pos_k, window, HAS_WINDOW), scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row with nothing visible yet subtracts 0 instead of -inf (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # p is rounded to V's storage type as on a GPU, even when upcasting.
        p_v = p.to(V.dtype.element_ty)
        if UPCAST:
            p_v = p_v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    out_ptrs = (
        OUT + split * stride_osplit + b * stride_ob + q_head[:, None] * stride_oh
        + token[:, None] * stride_ot + dims[None, :] * stride_od
    )
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_dim_mask)
    if WRITE_LSE:
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN_2_JIT, float("-inf"))
        lse_ptrs = LSE + split * stride_lsplit + b * stride_lb + q_head * stride_lh + token * stride_lt
        tl.store(lse_ptrs, lse, mask=row_valid)


@triton.jit
def _store_delta_norms(
    base, stride_page, stride_s, stride_d, prev_base, stride_prev_d, out_ptrs, slot, before_slot, has_before, owner,
    S, dims, dim_valid, table_row, stride_table, num_pages, HAS_PREV: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
):
    """``‖x[slot] − x[before_slot]‖₂`` per row (``prev`` where not ``has_before``, NaN without it).

    Slots outside ``[0, S)`` (unchecked query slots), and paged slots in no page, read zeros rather than
    another head's memory.
    """
    current = _load_slot_rows(
        base, stride_page, stride_s, stride_d, slot, owner & (slot >= 0) & (slot < S), dims, dim_valid,
        table_row, stride_table, num_pages, PAGE_SIZE, PAGED,
    )
    before = _load_slot_rows(
        base, stride_page, stride_s, stride_d, before_slot, owner & has_before & (before_slot >= 0) & (before_slot < S),
        dims, dim_valid, table_row, stride_table, num_pages, PAGE_SIZE, PAGED,
    ).to(tl.float32)
    if HAS_PREV:
        # Same prev vector for every row; only token 0's row takes it.
        prev = tl.load(prev_base + dims * stride_prev_d, mask=dim_valid, other=0.0).to(tl.float32)
        before = tl.where(has_before[:, None], before, prev[None, :])
    diff = current.to(tl.float32) - before
    norm = tl.sqrt(tl.sum(diff * diff, axis=1))
    if not HAS_PREV:
        norm = tl.where(has_before, norm, float("nan"))
    tl.store(out_ptrs, norm, mask=owner)


@triton.jit
def _load_slot_rows(
    base, stride_page, stride_s, stride_d, slots, valid, dims, dim_valid, table_row, stride_table, num_pages,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
):
    """``[rows, BLOCK_D]`` of one head at ``slots`` (one slot a row); zeros where not ``valid`` or in no page."""
    page, in_page, valid = locate_slots(slots, valid, table_row, stride_table, num_pages, PAGE_SIZE, PAGED)
    offsets = slot_offsets(page[:, None], in_page[:, None], stride_page, stride_s, PAGED)
    return tl.load(
        base + offsets + dims[None, :] * stride_d, mask=valid[:, None] & dim_valid[None, :], other=0.0
    )


@triton.jit
def _combine_splits_kernel(
    PART_OUT, PART_LSE, OUT, LSE,
    num_rows, num_splits, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Merge split partials: ``out = Σ_s w_s·out_s / Σ_s w_s`` with ``w_s = exp(lse_s − max)``.

    Partials are float32 ``[num_splits, num_rows, D]`` / ``[num_splits, num_rows]``
    (contiguous); rows are the flattened ``(b, h, t)`` of the contiguous output.
    A split that saw no key has ``lse = -inf`` and weighs 0.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (dims < D)[None, :]
    rows64 = rows.to(tl.int64)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(PART_LSE + s * num_rows + rows64, mask=row_valid, other=float("-inf"))
        out_s = tl.load(PART_OUT + (s * num_rows + rows64)[:, None] * D + dims[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        weight = tl.exp(lse_s - m_safe)
        l_i = l_i * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * out_s
        m_i = m_new

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    tl.store(OUT + rows64[:, None] * D + dims[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    if WRITE_LSE:
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(LSE + rows64, lse, mask=row_valid)


_prefill_kernel = autotune(PREFILL_CONFIGS, AUTOTUNE_KEY, INTERPRET_PREFILL_CONFIG)(_attention_fwd_kernel)
_decode_kernel = autotune(DECODE_CONFIGS, AUTOTUNE_KEY, INTERPRET_DECODE_CONFIG)(_attention_fwd_kernel)


# --------------------------------------------------------------------------- #
# Heuristics
# --------------------------------------------------------------------------- #


def uses_decode_space(num_rows: int) -> bool:
    """Whether ``T * G`` rows per (batch, kv head) run with the decode config space."""
    return num_rows <= DECODE_MAX_ROWS


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch_kv_heads: int, num_rows: int, num_keys: int, multiprocessor_count: int) -> int:
    """Split-K factor wanted for a launch on a GPU with ``multiprocessor_count`` SMs (0: no GPU).

    Row blocks are counted with the config space's largest ``BLOCK_M`` (the
    fewest programs any config launches). When they and ``batch_kv_heads`` give
    fewer than ``PROGRAMS_PER_SM`` programs per SM, the keys are split to make
    up the difference, whatever ``T * G`` is, with at least
    ``MIN_KEYS_PER_SPLIT`` keys per split. :func:`split_plan` turns the
    factor into the launched splits.
    """
    space = DECODE_CONFIGS if uses_decode_space(num_rows) else PREFILL_CONFIGS
    largest_block_m = max(config.kwargs["BLOCK_M"] for config in space)
    programs = triton.cdiv(num_rows, largest_block_m) * batch_kv_heads
    target = PROGRAMS_PER_SM * multiprocessor_count
    if programs >= target:
        return 1
    wanted = triton.cdiv(target, programs)
    return max(1, min(wanted, num_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def split_plan(num_keys: int, num_splits: int) -> tuple[int, int]:
    """``(keys_per_split, launched_splits)`` for at most ``num_splits`` contiguous splits of the keys.

    Splits are whole ``SPLIT_GRANULE``-key granules and only as many are
    launched as the rounded size needs, so every launched split has keys.
    """
    keys_per_split = triton.cdiv(triton.cdiv(num_keys, num_splits), SPLIT_GRANULE) * SPLIT_GRANULE
    return keys_per_split, triton.cdiv(num_keys, keys_per_split)


def descriptor_layout_ok(*planes: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address each ``[B, H, S, D]`` plane as it is laid out.

    TMA needs the last dim contiguous, and the base address and every other
    stride in bytes multiples of 16 (views into a padded or odd-sized buffer
    may not be); a descriptor also has no empty dim.
    """
    return all(
        x.numel() > 0 and x.stride(-1) == 1 and x.data_ptr() % 16 == 0
        and all(stride * x.element_size() % 16 == 0 for stride in x.stride()[:-1])
        for x in planes
    )


def uses_tensor_descriptors(k: torch.Tensor, v: torch.Tensor, num_rows: int) -> bool:
    """Whether a launch of ``num_rows = T * G`` rows loads its K/V tiles through TMA descriptors.

    Yes for fp16/bf16 outside the decode space when Triton compiles for an
    NVIDIA GPU of compute capability 9.0 or newer (the current target, so the
    static report's stand-in sm_90 counts) and :func:`descriptor_layout_ok`;
    never under the interpreter. There the dots are wgmma, which reads K and
    V straight from the shared memory TMA fills. The rest keeps the pointer
    path, where descriptors only cost: decode (no wgmma at 16 rows; some of
    its configs spill 8 bytes with descriptors, a different one with Triton
    3.6 and 3.9) and fp32 (no wgmma either; the transposed K tile goes
    through registers and every prefill config spills 2-4.6 KiB at D = 128).
    """
    if INTERPRET or uses_decode_space(num_rows) or k.element_size() != 2:
        return False
    target = triton.runtime.driver.active.get_current_target()
    return target.backend == "cuda" and target.arch >= 90 and descriptor_layout_ok(k, v)


def _kv_operands(k: torch.Tensor, v: torch.Tensor, use_tma: bool, block_d: int, config: triton.Config | None) -> tuple:
    """``(K_DESC, V_DESC)``: host descriptors over the whole ``[B, Hkv, S, D]`` planes, or ``k``, ``v``.

    The box ``[1, 1, BLOCK_N, block_d]`` is one (batch, head)'s key tile, so a
    tile never reads another head's slots. An explicit ``config`` gives
    ``BLOCK_N``; an autotuned launch gets it from each config's pre-hook
    (:func:`_set_descriptor_blocks`), which overwrites the 16 set here.
    """
    if not use_tma:
        return k, v
    box = [1, 1, config.kwargs["BLOCK_N"] if config is not None else 16, block_d]
    return TensorDescriptor.from_tensor(k, box), TensorDescriptor.from_tensor(v, box)


# --------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------- #


def slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    *,
    query_slots: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    prev_k: torch.Tensor | None = None,
    prev_v: torch.Tensor | None = None,
    with_deltas: bool = True,
    return_lse: bool = False,
    num_splits: int | None = None,
    slot_count: torch.Tensor | None = None,
    config: triton.Config | None = None,
    use_tma: bool | None = None,
) -> AttentionResult:
    """Launch :func:`epikv_triton.ops.slot_attention` on the kernels (inputs already validated).

    ``config`` launches that config instead of autotuning (tests use it to run
    every config of :data:`PREFILL_CONFIGS` / :data:`DECODE_CONFIGS`).
    ``use_tma`` picks the K/V load path; ``None`` leaves it to
    :func:`uses_tensor_descriptors` (tests force ``True`` under the
    interpreter, which runs descriptors too; the layout must then allow one).
    """
    if use_tma is None:
        use_tma = uses_tensor_descriptors(k, v, q.shape[2] * (q.shape[1] // k.shape[1]))
    elif use_tma and not descriptor_layout_ok(k, v):
        raise ValueError("use_tma=True needs k and v with a contiguous last dim and 16-byte aligned strides")
    return _launch(
        q, k, v, pos, None, resolve_query_slots(query_slots, q, k), scale, window, prev_k, prev_v, with_deltas,
        return_lse, num_splits, slot_count, config, use_tma,
    )


def paged_slot_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    *,
    query_slots: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    prev_k: torch.Tensor | None = None,
    prev_v: torch.Tensor | None = None,
    with_deltas: bool = True,
    return_lse: bool = False,
    num_splits: int | None = None,
    slot_count: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> AttentionResult:
    """Launch :func:`epikv_triton.ops.paged_slot_attention` on the kernels (inputs already validated).

    The same kernel as :func:`slot_attention` over the pools ``[num_pages, page_size, Hkv, D]`` seen as
    ``[num_pages, Hkv, page_size, D]`` (page for batch row, offset for slot), each slot's page looked up
    in ``block_table``. K/V always take the pointer loads: a key tile spans pages, which one TMA box
    cannot.
    """
    paging = PageTable(block_table, k_pages.shape[1], k_pages.shape[0])
    return _launch(
        q, k_pages.transpose(1, 2), v_pages.transpose(1, 2), pos_pages, paging, query_slots, scale, window, prev_k,
        prev_v, with_deltas, return_lse, num_splits, slot_count, config, False,
    )


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    paging: PageTable | None,
    query_slots: torch.Tensor,
    scale: float | None,
    window: int | None,
    prev_k: torch.Tensor | None,
    prev_v: torch.Tensor | None,
    with_deltas: bool,
    return_lse: bool,
    num_splits: int | None,
    slot_count: torch.Tensor | None,
    config: triton.Config | None,
    use_tma: bool,
) -> AttentionResult:
    """Both layouts' launch: ``k``/``v`` are ``[B, Hkv, S, D]`` (dense) or ``[num_pages, Hkv, page_size, D]``
    pools, ``pos`` ``[B, S]`` or ``[num_pages, page_size]``, with ``paging`` naming the pages."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = k.shape[2] if paging is None else paging.slots
    G = Hq // Hkv
    num_rows = T * G
    scale = D**-0.5 if scale is None else float(scale)
    require_int32_plane_offsets(q=q, k=k, v=v, pos=pos, query_slots=query_slots)
    if num_splits is None:
        multiprocessors = _multiprocessor_count(q.device.index) if q.is_cuda else 0
        num_splits = choose_num_splits(B * Hkv, num_rows, S, multiprocessors)
    keys_per_split, num_splits = split_plan(S, num_splits)

    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device) if return_lse else None
    if num_splits > 1:
        # Partials in float32, laid out [split, B, Hq, T, (D)] so the combine
        # kernel sees flat rows identical to the contiguous output's.
        part_out = torch.empty((num_splits, B, Hq, T, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, B, Hq, T), dtype=torch.float32, device=q.device)
        target_out, target_lse = part_out, part_lse
    else:
        target_out = out
        target_lse = lse if lse is not None else out  # never written without WRITE_LSE
    write_lse = num_splits > 1 or return_lse
    split_out_stride = target_out.stride(0) if num_splits > 1 else 0
    split_lse_stride = target_lse.stride(0) if num_splits > 1 else 0
    out_strides = target_out.stride()[-4:]
    lse_strides = target_lse.stride()[-3:] if write_lse else (0, 0, 0)

    dk = dv = None
    if with_deltas:
        dk = torch.empty((B, Hkv, T), dtype=torch.float32, device=q.device)
        dv = torch.empty((B, Hkv, T), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    k_desc, v_desc = _kv_operands(k, v, use_tma, block_d, config)

    has_prev_k = with_deltas and prev_k is not None
    has_prev_v = with_deltas and prev_v is not None
    # Unused pointer arguments get a harmless stand-in; their code is compiled out.
    prev_k_arg = prev_k if has_prev_k else k
    prev_v_arg = prev_v if has_prev_v else v
    prev_k_strides = prev_k.stride() if has_prev_k else (0, 0, 0)
    prev_v_strides = prev_v.stride() if has_prev_v else (0, 0, 0)

    (table, *table_args), paging_constants = kernel_paging(paging)
    args = (
        q, k, v, k_desc, v_desc, pos, query_slots, slot_count if slot_count is not None else pos,
        target_out, target_lse, dk if dk is not None else out, dv if dv is not None else out,
        prev_k_arg, prev_v_arg, table,
        *q.stride(), *k.stride(), *v.stride(), *pos.stride(), *query_slots.stride(),
        slot_count.stride(0) if slot_count is not None else 0,
        *out_strides, split_out_stride,
        *lse_strides, split_lse_stride,
        *prev_k_strides, *prev_v_strides,
        *table_args,
        T, S, D, G, Hkv,
        scale * LOG2_E, window if window is not None else 0, keys_per_split,
        autotune_bucket(num_rows), autotune_bucket(S), autotune_bucket(B * Hkv), autotune_bucket(num_splits),
    )
    constants = dict(
        BLOCK_D=block_d,
        HAS_WINDOW=window is not None,
        HAS_SLOT_COUNT=slot_count is not None,
        WRITE_LSE=write_lse,
        WITH_DELTAS=with_deltas,
        HAS_PREV_K=has_prev_k,
        HAS_PREV_V=has_prev_v,
        SKIP_BY_POSITION=not uses_decode_space(num_rows),
        SCAN_BLOCK=SCAN_BLOCK,
        UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_TMA=use_tma,
        **paging_constants,
    )

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(num_rows, meta["BLOCK_M"]), B * Hkv, num_splits)

    if config is not None:
        _attention_fwd_kernel[grid](*args, **constants, **launch_options(config))
    elif uses_decode_space(num_rows):
        _decode_kernel[grid](*args, **constants)
    else:
        _prefill_kernel[grid](*args, **constants)

    if num_splits > 1:
        flat_rows = B * Hq * T
        _combine_splits_kernel[(triton.cdiv(flat_rows, COMBINE_ROWS),)](
            part_out, part_lse, out, lse if lse is not None else part_lse,
            flat_rows, num_splits, D,
            BLOCK_R=COMBINE_ROWS, BLOCK_D=constants["BLOCK_D"], WRITE_LSE=return_lse,
        )
    return AttentionResult(out, dk, dv, lse)


__all__ = [
    "DECODE_CONFIGS",
    "PREFILL_CONFIGS",
    "choose_num_splits",
    "descriptor_layout_ok",
    "paged_slot_attention",
    "slot_attention",
    "split_plan",
    "uses_decode_space",
    "uses_tensor_descriptors",
]
