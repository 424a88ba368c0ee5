"""The epikv_triton ops: plain tensors in and out, no transformers.

Four ops have a Triton kernel and a PyTorch twin in :mod:`.naive`:

* :func:`slot_attention` — fused attention of new tokens over a slot cache,
  emitting the per-new-key delta norms ``‖k_t − k_{t−1}‖``, ``‖v_t − v_{t−1}‖``
  (kernel: :mod:`.attention`).
* :func:`attention_column_sums` — the H2O score without the attention matrix:
  pass 2 of a two-pass kernel whose pass 1 is :func:`slot_attention` with
  ``return_lse=True``; exact column sums of the attention probabilities (:mod:`.h2o`).
* :func:`rolling_zscore` — the causal rolling z-score of many bands, combined
  into one score per token, state updated in place (:mod:`.zscore`).
* :func:`compact_slots_` — an in-place compaction of every layer's K and V plus
  the slot metadata that moves only the kept slots above the new fill into the
  freed slots below it (:mod:`.compaction`).

Three are torch compositions, the same code on every backend (:mod:`.selection`):
:func:`select_slots` (budgeted partial selection), :func:`compaction_plan`
(where the kept slots go), and :func:`evict_`, which chains them with
:func:`compact_slots_`. The slot vocabulary they share (:class:`AttentionResult`,
query slots, visibility) is :mod:`.slots`.

Paged variants (:func:`paged_slot_attention`, :func:`paged_attention_column_sums`,
:func:`paged_compact_slots_`, :func:`paged_evict_`) take a serving engine's page
pools and block table instead of dense per-sequence buffers (:mod:`.pages`);
they run the same kernels, whose slot addressing goes through the table, and
their twins gather the pages and run the dense twins.

Backend (decided in :mod:`._dispatch`): Triton when the tensors are on a GPU or
``TRITON_INTERPRET=1``, otherwise the twin; ``EPIKV_BACKEND=triton|torch``
forces one, and a head dim above 256 runs the twin. Any strides work.

Under ``torch.compile`` the kernel-backed ops are custom ops (:mod:`._library`),
so a compiled caller traces through every op here with no graph break; pass
``check_positions=False`` there (that check reads device data).

Inference only, on both backends: an op called with grad mode on and an input
that requires grad returns outputs whose backward raises, never silently
gradient-free ones. Call them under ``torch.no_grad()`` or
``torch.inference_mode()`` (what the cache integrations do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _library, naive, pages, selection, slots
from ._checks import (
    check_attention,
    check_column_sums,
    check_compact,
    check_paged_attention,
    check_paged_column_sums,
    check_paged_compact,
    check_plan,
    check_select,
    check_zscore,
)
from ._dispatch import backend_for
from .pages import PagedEviction
from .slots import AttentionResult, slots_in_use


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
    check_positions: bool = True,
) -> AttentionResult:
    """Attention of ``T`` new tokens over ``S`` key slots, with the new keys' and values' delta norms.

    One rule covers prefill, chunked prefill and decode (``T == 1``): key slot
    ``j`` is visible to new token ``i`` iff ``pos[j] >= 0`` and
    ``pos[j] <= pos_q[i]`` (and ``pos_q[i] - pos[j] < window``), where
    ``pos_q[i] = pos[query_slots[i]]`` (:func:`.slots.visibility_mask`).
    Softmax in float32; a query that sees no key gets a zero output and ``lse = -inf``.

    Args:
        q (torch.Tensor):
            Queries ``[B, Hq, T, D]``, fp16, bf16 or fp32.
        k (torch.Tensor):
            Keys ``[B, Hkv, S, D]``, ``q``'s dtype, ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
        v (torch.Tensor):
            Values ``[B, Hkv, S, D]``, ``q``'s dtype. Every slot's K/V must be finite, even an empty
            slot's: on sm_90 a ragged key tile reaches the ``p @ v`` product whole (one TMA copy),
            where a masked key's probability 0 times a NaN is NaN (the twin does the same).
        pos (torch.Tensor):
            Positions of the key slots ``[B, S]``, int32 or int64; ``-1`` = empty or padding.
            Slot order carries no meaning.
        query_slots (torch.Tensor, optional):
            ``[B, T]`` int32 or int64: the slot holding new token ``t``'s own key and value, each in
            ``[0, S)``, any slots in any order; the real positions ``pos_q`` must strictly increase.
            Default: the last ``T`` slots, in order.
        scale (float, optional):
            Score scale. Default: ``D ** -0.5``.
        window (int, optional):
            Sliding window in positions. Default: none.
        prev_k (torch.Tensor, optional):
            ``[B, Hkv, D]``, any float dtype: the key of the token before the first new one. Without
            it the first token's key delta is NaN. Token ``t > 0`` is compared with the key in token
            ``t - 1``'s query slot.
        prev_v (torch.Tensor, optional):
            ``[B, Hkv, D]``: the same for the values.
        with_deltas (bool):
            Compute ``dk``/``dv``. Default: ``True``.
        return_lse (bool):
            Return ``lse`` (pass 1 of :func:`attention_column_sums`). Default: ``False``.
        num_splits (int, optional):
            Caps how many contiguous key splits run in parallel on the Triton path (split-K; each
            launched split gets keys, so fewer may run). Default: picked from the shape and the GPU.
        slot_count (torch.Tensor, optional):
            ``[B]`` int32 or int64 on the tensors' device: the slots in use. Slots ``>= slot_count``
            are empty whatever ``pos`` holds, as keys and as query slots, and the kernel skips their
            key tiles without a host read, so a static-shape step over the whole buffer costs only
            its fill. Default: every slot is in use.
        check_positions (bool):
            Validate positions and query slots on the host (host syncs). Engines that build them
            themselves, and compiled code, pass ``False``. Default: ``True``.

    Returns:
        AttentionResult ``(out, dk, dv, lse)``:
            ``out [B, Hq, T, D]`` in ``q.dtype``; ``dk``/``dv [B, Hkv, T]`` float32 delta norms
            ``‖k_t − k_{t−1}‖₂`` / ``‖v_t − v_{t−1}‖₂`` (``None`` without ``with_deltas``);
            ``lse [B, Hq, T]`` float32 natural-log normaliser (``None`` without ``return_lse``).
            Inference only (no backward).
    """
    check_attention(q, k, v, pos, query_slots, window, prev_k, prev_v, num_splits, slot_count, check_positions)
    out, dk, dv, lse = _library.slot_attention(
        q, k, v, pos, query_slots=query_slots, scale=_optional_float(scale), window=window, prev_k=prev_k,
        prev_v=prev_v, with_deltas=with_deltas, return_lse=return_lse, num_splits=num_splits, slot_count=slot_count,
    )
    # The custom op returns empty tensors for the members not asked for.
    if not with_deltas:
        dk = dv = None
    return AttentionResult(out, dk, dv, lse if return_lse else None)


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
    check_positions: bool = True,
) -> torch.Tensor:
    """H2O scores: the attention probability each key slot receives, summed over queries and group heads.

    Pass 2 of two: for key slot ``j``, ``Σ_{t, g} exp(scale · q[g, t] · k[j] − lse[g, t])`` over the
    ``T`` queries and the ``G = Hq / Hkv`` query heads of its kv group, over visible pairs only.
    The Triton path never materialises the attention matrix.

    Args:
        q (torch.Tensor):
            Queries ``[B, Hq, T, D]``, fp16, bf16 or fp32, as passed to :func:`slot_attention`.
        k (torch.Tensor):
            Keys ``[B, Hkv, S, D]``, ``q``'s dtype.
        pos (torch.Tensor):
            ``[B, S]`` int32 or int64, as for :func:`slot_attention`.
        lse (torch.Tensor):
            ``[B, Hq, T]`` float32 from that call (``return_lse=True``); ``-inf`` (a query that saw
            nothing) contributes nothing.
        query_slots (torch.Tensor, optional):
            ``[B, T]`` int32 or int64, as for :func:`slot_attention`.
        scale (float, optional):
            As for :func:`slot_attention`.
        window (int, optional):
            As for :func:`slot_attention`.
        slot_count (torch.Tensor, optional):
            ``[B]`` int32 or int64, as for :func:`slot_attention`.
        check_positions (bool):
            As for :func:`slot_attention`. Default: ``True``.

    Returns:
        torch.Tensor:
            ``[B, Hkv, S]`` float32 column sums, 0 for a slot no query sees.
    """
    check_column_sums(q, k, pos, lse, query_slots, window, slot_count, check_positions)
    return _library.attention_column_sums(
        q, k, pos, lse, query_slots=query_slots, scale=_optional_float(scale), window=window, slot_count=slot_count
    )


def rolling_zscore(
    values: torch.Tensor,
    ring: torch.Tensor,
    count: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Causal rolling z-score of many bands, combined into one score per token; the state advances in place.

    For each pushed value ``x``, the window being the last ``n = min(count, W)``
    pushed values including ``x``: ``z = (x − mean) / (std + eps)`` (population
    std), and ``z = 0`` while ``n < 2``.

    Args:
        values (torch.Tensor):
            ``[B, NB, T]`` float32 new band values in stream order. NaN means "no value" (first
            token of a sequence, padding): it is not pushed into the window and contributes 0.
        ring (torch.Tensor):
            ``[B, NB, W]`` float32, contiguous: the last ``W`` pushed values of each band; the next
            push goes to index ``count % W``. Updated in place.
        count (torch.Tensor):
            ``[B, NB]`` int64, contiguous: values pushed so far. Updated in place.
        weights (torch.Tensor):
            ``[NB]`` float32 signed band weights.
        eps (float):
            Added to the std. Default: ``1e-6``.

    Returns:
        torch.Tensor:
            ``score [B, T] = Σ_band weights[band] · z``, float32.
    """
    check_zscore(values, ring, count, weights, eps)
    return _library.rolling_zscore(values, ring, count, weights, eps=float(eps))


def select_slots(
    scores: torch.Tensor,
    pos: torch.Tensor,
    budget: int,
    *,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
    reserve: int = 0,
    reserve_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which slots each sequence keeps: at most ``budget``, the protected ones first, then the highest scores.

    Protected, always kept: positions below ``protect_prefix`` (sink tokens or the
    whole prompt) and the ``recent`` highest positions of the sequence. The rest
    of the budget goes to the highest scores; among equal scores the older token
    (lower position) is kept, so the choice never depends on slot order. A partial
    selection (``topk`` of the slots to drop): O(S) per sequence, on the tensors'
    device, no host synchronisation.

    Args:
        scores (torch.Tensor):
            ``[B, S]`` fp16, bf16 or fp32, higher = more important; NaN ranks lowest (below ``-inf``).
        pos (torch.Tensor):
            ``[B, S]`` int32 or int64 absolute positions; ``-1`` = empty/padding (never kept, never
            costs budget).
        budget (int):
            Slots kept per sequence, at least ``max(protect_prefix) + recent``.
        protect_prefix (int, sequence of int, or torch.Tensor):
            One int, one per sequence, or an int32/int64 tensor ``[B]`` on the scores' device. As
            ints it is checked against the budget; as a tensor it is not (a host sync), so the
            caller must guarantee ``max(prefix) + recent <= budget``.
        recent (int):
            The newest positions always kept.
        reserve (int):
            Unprotected slots kept next, before any score, for the highest ``reserve_scores`` (ties: the
            older); 0 = none.
        reserve_scores (torch.Tensor, optional):
            ``[B, S]`` floats like ``scores`` (for example each slot's largest value norm); needed when
            ``reserve > 0``.

    Returns:
        torch.Tensor:
            ``keep [B, S]`` bool with ``min(budget, S, real tokens)`` kept slots per row.
    """
    check_select(scores, pos, budget, protect_prefix, recent, reserve, reserve_scores)
    return selection.select_slots(
        scores, pos, budget, protect_prefix=protect_prefix, recent=recent, reserve=reserve,
        reserve_scores=reserve_scores,
    )


def compaction_plan(keep: torch.Tensor, fill: int) -> torch.Tensor:
    """Where each kept slot at or above ``fill`` moves: into a slot below ``fill`` that is not kept.

    Slot order carries no meaning, so only the kept slots at or above ``fill``
    move, at most ``S - fill`` a row. Destinations are distinct and below
    ``fill``, so sources and destinations never overlap. A hole that receives
    nothing was already empty: a row keeps fewer than ``fill`` slots only when
    it holds fewer real tokens. A few small sync-free launches on ``[B, S]``.

    Args:
        keep (torch.Tensor):
            ``[B, S]`` bool with at most ``fill`` kept slots per row (as from :func:`select_slots`).
        fill (int):
            The slots kept per sequence afterwards, ``min(budget, S)``; in ``[0, S]``.

    Returns:
        torch.Tensor:
            ``destination [B, S - fill]`` int64: entry ``[b, j]`` is the new slot of slot
            ``fill + j``, or ``-1`` when it is dropped.
    """
    check_plan(keep, fill)
    return selection.compaction_plan(keep, fill)


def compact_slots_(kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor) -> None:
    """Move the kept slots at or above the new fill into the holes below it, in place, every plane at once.

    Afterwards every moved slot's K/V, position and score sit at its
    destination, and slots ``>= S - W`` have ``pos = -1``, ``score = NaN``
    (their K/V bytes are left as they were: masked out by ``pos``). Slots below
    ``S - W`` that are not destinations are untouched. Costs the moved slots
    only; no host synchronisation.

    Args:
        kv (torch.Tensor):
            ``[P, B, H, S, D]`` fp16, bf16 or fp32, any strides: the planes are every layer's K and V.
        pos (torch.Tensor):
            ``[B, S]`` int32 or int64 slot positions. Updated in place.
        scores (torch.Tensor):
            ``[B, S]`` float32 slot scores. Updated in place.
        destination (torch.Tensor):
            ``[B, W]`` int64 from :func:`compaction_plan`: slot ``S - W + j`` moves to slot
            ``destination[b, j]``, or is dropped (``-1``). Destinations must be distinct and below
            ``S - W`` (not checked: a host sync); the kernel drops a slot whose destination is not.

    Returns:
        None: ``kv``, ``pos`` and ``scores`` are updated in place.
    """
    check_compact(kv, pos, scores, destination)
    _library.compact_slots_(kv, pos, scores, destination)


def evict_(
    kv: torch.Tensor,
    pos: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    *,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
) -> torch.Tensor:
    """Keep ``budget`` slots per sequence: :func:`select_slots`, :func:`compaction_plan`, :func:`compact_slots_`.

    Afterwards the kept slots of every sequence are the first ``min(budget, S)``
    (in no particular order).

    Args:
        kv (torch.Tensor):
            ``[P, B, H, S, D]``, as for :func:`compact_slots_`. Updated in place.
        pos (torch.Tensor):
            ``[B, S]`` int32 or int64. Updated in place.
        scores (torch.Tensor):
            ``[B, S]`` float32. Updated in place.
        budget (int):
            As for :func:`select_slots`.
        protect_prefix (int, sequence of int, or torch.Tensor):
            As for :func:`select_slots`.
        recent (int):
            As for :func:`select_slots`.

    Returns:
        torch.Tensor:
            The ``destination [B, S - fill]`` int64 used; ``(destination >= 0).sum(1)`` slots moved
            per sequence.
    """
    keep = select_slots(scores, pos, budget, protect_prefix=protect_prefix, recent=recent)
    destination = compaction_plan(keep, min(budget, keep.shape[1]))
    compact_slots_(kv, pos, scores, destination)
    return destination


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
    check_positions: bool = True,
) -> AttentionResult:
    """:func:`slot_attention` over a paged cache: the same result as on the sequences' slots gathered densely.

    Sequence ``b`` has ``S = max_pages · page_size`` logical slots; slot ``s`` lives in page
    ``block_table[b, s // page_size]`` at offset ``s % page_size`` of the pools. An entry outside
    ``[0, num_pages)`` (``-1``: no page) makes its slots empty (position -1, never read). Visibility,
    deltas, ``slot_count`` and the outputs are exactly :func:`slot_attention`'s, in logical slots.

    Args:
        q (torch.Tensor):
            Queries ``[B, Hq, T, D]``, fp16, bf16 or fp32.
        k_pages (torch.Tensor):
            One layer's key pool ``[num_pages, page_size, Hkv, D]`` (vLLM's and transformers' layout), any
            strides, ``q``'s dtype. Read only.
        v_pages (torch.Tensor):
            The value pool, shaped and typed like ``k_pages``. Every slot's K/V in a named page must be finite.
        pos_pages (torch.Tensor):
            ``[num_pages, page_size]`` int32 or int64: each slot's absolute position, ``-1`` = empty. Shared by
            every layer.
        block_table (torch.Tensor):
            ``[B, max_pages]`` int32 or int64, any strides: sequence ``b``'s pages in logical order. A page may
            appear in several rows (shared prefixes): attention only reads.
        query_slots (torch.Tensor):
            ``[B, T]`` int32 or int64 logical slots of the new tokens (required: no default layout). Real
            positions must strictly increase.
        scale, window, prev_k, prev_v, with_deltas, return_lse, num_splits, slot_count:
            As for :func:`slot_attention`; ``slot_count`` counts logical slots.
        check_positions (bool):
            Validate on the host (host syncs) the block table entries (page ids or ``-1``), query slots and
            positions. Default: ``True``; engines and compiled code pass ``False``.

    Returns:
        AttentionResult ``(out, dk, dv, lse)``, as for :func:`slot_attention`.
    """
    check_paged_attention(
        q, k_pages, v_pages, pos_pages, block_table, query_slots, window, prev_k, prev_v, num_splits, slot_count,
        check_positions,
    )
    out, dk, dv, lse = _library.paged_slot_attention(
        q, k_pages, v_pages, pos_pages, block_table, query_slots=query_slots, scale=_optional_float(scale),
        window=window, prev_k=prev_k, prev_v=prev_v, with_deltas=with_deltas, return_lse=return_lse,
        num_splits=num_splits, slot_count=slot_count,
    )
    if not with_deltas:
        dk = dv = None
    return AttentionResult(out, dk, dv, lse if return_lse else None)


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
    check_positions: bool = True,
) -> torch.Tensor:
    """:func:`attention_column_sums` over a paged cache (pass 2 of :func:`paged_slot_attention`).

    Args:
        q (torch.Tensor):
            ``[B, Hq, T, D]``, as passed to :func:`paged_slot_attention`.
        k_pages (torch.Tensor):
            ``[num_pages, page_size, Hkv, D]``, as for :func:`paged_slot_attention`.
        pos_pages (torch.Tensor):
            ``[num_pages, page_size]`` int32 or int64, as for :func:`paged_slot_attention`.
        block_table (torch.Tensor):
            ``[B, max_pages]`` int32 or int64, as for :func:`paged_slot_attention`.
        lse (torch.Tensor):
            ``[B, Hq, T]`` float32 from that call (``return_lse=True``).
        query_slots, scale, window, slot_count, check_positions:
            As for :func:`paged_slot_attention`.

    Returns:
        torch.Tensor:
            ``[B, Hkv, max_pages · page_size]`` float32, one column sum per logical slot (0 for a slot no
            query sees or in no page). To add it to the score pool, index with :func:`.pages.slot_index`.
    """
    check_paged_column_sums(q, k_pages, pos_pages, block_table, lse, query_slots, window, slot_count, check_positions)
    return _library.paged_attention_column_sums(
        q, k_pages, pos_pages, block_table, lse, query_slots=query_slots, scale=_optional_float(scale),
        window=window, slot_count=slot_count,
    )


def paged_compact_slots_(
    kv_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    scores_pages: torch.Tensor,
    block_table: torch.Tensor,
    destination: torch.Tensor,
    *,
    check_pages: bool = True,
) -> torch.Tensor:
    """:func:`compact_slots_` in a paged cache: the kept slots move into the sequences' lowest pages, in place.

    With ``S = max_pages · page_size`` logical slots and ``W = destination.shape[1]``, the new fill is
    ``F = S - W``: afterwards every kept slot lies below ``F``, so the pages from block-table column
    ``ceil(F / page_size)`` on hold nothing and are returned for the engine's pool; logical slots ``>= F``
    in existing pages read ``pos = -1``, ``score = NaN``. One launch, no host synchronisation (with
    ``check_pages=False``).

    Args:
        kv_pages (torch.Tensor):
            ``[P, num_pages, page_size, H, D]`` fp16, bf16 or fp32, any strides: the ``P`` planes are every
            layer's K and V pools, indexed by the same page ids. Updated in place.
        pos_pages (torch.Tensor):
            ``[num_pages, page_size]`` int32 or int64. Updated in place.
        scores_pages (torch.Tensor):
            ``[num_pages, page_size]`` float32. Updated in place.
        block_table (torch.Tensor):
            ``[B, max_pages]`` int32 or int64, any strides; no page named twice (a page is compacted for one
            sequence). An entry outside ``[0, num_pages)`` is no page: a move from or into it is dropped.
        destination (torch.Tensor):
            ``[B, W]`` int64 from :func:`compaction_plan` over the ``[B, S]`` logical slots.
        check_pages (bool):
            Check on the host (a sync) that the entries are page ids or ``-1`` and that no page is named
            twice. Default: ``True``; engines and compiled code pass ``False``.

    Returns:
        torch.Tensor:
            ``freed_pages = block_table[:, ceil(F / page_size):]`` (a view): the emptied pages' entries. The
            engine knows them from its own copy of the table too, without reading the device.
    """
    check_paged_compact(kv_pages, pos_pages, scores_pages, block_table, destination, check_pages)
    _library.paged_compact_slots_(kv_pages, pos_pages, scores_pages, block_table, destination)
    fill = block_table.shape[1] * kv_pages.shape[2] - destination.shape[1]
    return pages.freed_pages(block_table, fill, kv_pages.shape[2])


def paged_evict_(
    kv_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    scores_pages: torch.Tensor,
    block_table: torch.Tensor,
    budget: int,
    *,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
    slot_count: torch.Tensor | None = None,
    check_pages: bool = True,
) -> PagedEviction:
    """:func:`evict_` in a paged cache: keep ``budget`` slots per sequence in its lowest pages, free the rest.

    Gathers the sequences' positions and scores (``[B, S]``, small), runs :func:`select_slots` and
    :func:`compaction_plan` on them exactly as :func:`evict_` does, then :func:`paged_compact_slots_`.
    Afterwards each sequence's kept slots are its first ``F = min(budget, S)`` logical slots.

    Args:
        kv_pages (torch.Tensor):
            ``[P, num_pages, page_size, H, D]``, as for :func:`paged_compact_slots_`. Updated in place.
        pos_pages (torch.Tensor):
            ``[num_pages, page_size]`` int32 or int64. Updated in place.
        scores_pages (torch.Tensor):
            ``[num_pages, page_size]`` float32. Updated in place.
        block_table (torch.Tensor):
            ``[B, max_pages]``, as for :func:`paged_compact_slots_`.
        budget, protect_prefix, recent:
            As for :func:`select_slots`.
        slot_count (torch.Tensor, optional):
            ``[B]`` int32 or int64: slots at or past it are empty whatever their pages hold (never kept).
        check_pages (bool):
            As for :func:`paged_compact_slots_`.

    Returns:
        PagedEviction ``(destination, freed_pages)``: the plan applied and the emptied pages' entries.
    """
    page_size, num_pages = kv_pages.shape[2], kv_pages.shape[1]
    index = pages.slot_index(block_table, page_size, num_pages)
    pos = slots_in_use(pages.gather_slots(pos_pages, index, -1), slot_count)
    keep = select_slots(
        pages.gather_slots(scores_pages, index, float("nan")), pos, budget, protect_prefix=protect_prefix,
        recent=recent,
    )
    destination = compaction_plan(keep, min(budget, keep.shape[1]))
    freed = paged_compact_slots_(kv_pages, pos_pages, scores_pages, block_table, destination, check_pages=check_pages)
    return PagedEviction(destination, freed)


def _optional_float(x: float | None) -> float | None:
    """A scale as the op schema's ``float?`` wants it (a caller may pass an int)."""
    return None if x is None else float(x)


__all__ = [
    "AttentionResult",
    "PagedEviction",
    "attention_column_sums",
    "backend_for",
    "compact_slots_",
    "compaction_plan",
    "evict_",
    "naive",
    "paged_attention_column_sums",
    "paged_compact_slots_",
    "paged_evict_",
    "paged_slot_attention",
    "pages",
    "rolling_zscore",
    "select_slots",
    "slot_attention",
    "slots",
]
