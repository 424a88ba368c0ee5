"""PyTorch twins of the kernel-backed ops: the test oracle and the CPU path.

Each twin takes the arguments of its op in :mod:`epikv_triton.ops` (less the
public wrappers' host-side ``check_positions``) and computes the same result
in plain torch, so the layouts, dtypes and semantics documented there hold
here too. The paged twins gather the pages into the dense layout
(:mod:`.pages`) and run the dense twins: paged and dense are one op. Twins
favour clarity over speed, but the attention twins build the score matrix one
block of queries at a time (:data:`SCORE_BLOCK` elements at most), so a long
prefill on the CPU path never holds a whole ``[B, Hq, T, S]`` matrix (nor the
dense copy of more pages than named). Inputs are validated by the public ops.
"""

from __future__ import annotations

import torch

from . import pages
from .slots import AttentionResult, gather_slots, resolve_query_slots, slots_in_use, visibility_mask


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
) -> AttentionResult:
    """Twin of :func:`epikv_triton.ops.slot_attention`: the masked score matrix, softmax in float32.

    One rule covers prefill, chunked prefill and decode (:func:`.slots.visibility_mask`).
    A query that sees no key gets a zero output and ``lse = -inf``. ``num_splits``
    only steers the Triton path's split-K; it is accepted and ignored here.
    """
    del num_splits
    B, Hq, T, D = q.shape
    query_slots = resolve_query_slots(query_slots, q, k)
    pos, keys, values = slots_in_use(pos, slot_count), k.float(), v.float()  # converted once, not per block
    out, lse = [], []
    for rows in query_blocks(q.shape, k.shape[2]):
        scores = _grouped_scores(q[:, :, rows], keys, pos, query_slots[:, rows], scale, window)
        block_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - block_lse.masked_fill(torch.isinf(block_lse), 0.0)[..., None])
        # Explicit sizes, not -1: a reshape cannot infer a dim of an empty batch.
        out.append(torch.matmul(probs, values).reshape(B, Hq, rows.stop - rows.start, D))
        lse.append(block_lse.reshape(B, Hq, rows.stop - rows.start))
    out, lse = torch.cat(out, dim=2).to(q.dtype), torch.cat(lse, dim=2)
    dk = dv = None
    if with_deltas:
        dk = _delta_norms(k, query_slots, prev_k)
        dv = _delta_norms(v, query_slots, prev_v)
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
) -> torch.Tensor:
    """Twin of :func:`epikv_triton.ops.attention_column_sums`: ``Σ_{t, g} exp(scale · q[g, t] · k[j] − lse[g, t])``
    over visible pairs, from the probabilities materialised a block of queries at a time (the eager H2O baseline)."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    query_slots, pos, keys = resolve_query_slots(query_slots, q, k), slots_in_use(pos, slot_count), k.float()
    sums = torch.zeros(B, Hkv, k.shape[2], dtype=torch.float32, device=q.device)
    for rows in query_blocks(q.shape, k.shape[2]):
        scores = _grouped_scores(q[:, :, rows], keys, pos, query_slots[:, rows], scale, window)
        normaliser = lse[:, :, rows].float().reshape(B, Hkv, Hq // Hkv * (rows.stop - rows.start), 1)
        # A query that saw nothing (lse = -inf) has every score at -inf too: give it a finite normaliser.
        sums += torch.exp(scores - normaliser.masked_fill(torch.isinf(normaliser), 0.0)).sum(dim=2)
    return sums


def rolling_zscore(
    values: torch.Tensor,
    ring: torch.Tensor,
    count: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Twin of :func:`epikv_triton.ops.rolling_zscore`: one token at a time, the window's mean and
    population std recomputed from the ring at every step."""
    B, _, T = values.shape
    W = ring.shape[2]
    slot = torch.arange(W, device=values.device)
    score = torch.zeros(B, T, dtype=torch.float32, device=values.device)
    for t in range(T):
        x = values[:, :, t].float()
        pushed = ~torch.isnan(x)
        write_here = pushed[..., None] & (slot == (count % W)[..., None])
        ring.copy_(torch.where(write_here, x[..., None], ring))
        count.add_(pushed.to(count.dtype))
        n = torch.clamp(count, max=W)
        in_window = slot < n[..., None]
        filled = in_window.sum(-1).clamp(min=1)
        mean = torch.where(in_window, ring, 0.0).sum(-1) / filled
        var = torch.where(in_window, (ring - mean[..., None]) ** 2, 0.0).sum(-1) / filled
        z = (x - mean) / (var.sqrt() + eps)
        z = torch.where(pushed & (n >= 2), z, 0.0)
        score[:, t] = (z * weights.float()).sum(-1)
    return score


def compact_slots_(kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor) -> None:
    """Twin of :func:`epikv_triton.ops.compact_slots_`: one scatter per tensor, no host synchronisation.

    A destination outside ``[0, S - W)`` may raise here, where the kernel drops its slot.
    """
    P, B, H, S, D = kv.shape
    width = destination.shape[1]
    fill = S - width
    if width == 0:
        return
    # A dropped slot is "moved" onto itself, so one scatter serves every row without a sync.
    own_slot = torch.arange(fill, S, device=destination.device).expand(B, width)
    index = torch.where(destination >= 0, destination, own_slot)
    moving = kv[:, :, :, fill:].clone()
    kv.scatter_(3, index[None, :, None, :, None].expand(P, B, H, width, D), moving)
    pos.scatter_(1, index, pos[:, fill:].clone())
    scores.scatter_(1, index, scores[:, fill:].clone())
    pos[:, fill:] = -1
    scores[:, fill:] = float("nan")


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
) -> AttentionResult:
    """Twin of :func:`epikv_triton.ops.paged_slot_attention`: :func:`slot_attention` over the pages gathered
    into ``[B, Hkv, S, D]`` (slots in no page: position -1, zero K/V)."""
    index = pages.slot_index(block_table, k_pages.shape[1], k_pages.shape[0])
    k, v = pages.dense_planes(k_pages, index), pages.dense_planes(v_pages, index)
    return slot_attention(
        q, k, v, pages.gather_slots(pos_pages, index, -1), query_slots=query_slots, scale=scale, window=window,
        prev_k=prev_k, prev_v=prev_v, with_deltas=with_deltas, return_lse=return_lse, num_splits=num_splits,
        slot_count=slot_count,
    )


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
) -> torch.Tensor:
    """Twin of :func:`epikv_triton.ops.paged_attention_column_sums`: :func:`attention_column_sums` over the
    pages gathered into ``[B, Hkv, S, D]``."""
    index = pages.slot_index(block_table, k_pages.shape[1], k_pages.shape[0])
    return attention_column_sums(
        q, pages.dense_planes(k_pages, index), pages.gather_slots(pos_pages, index, -1), lse,
        query_slots=query_slots, scale=scale, window=window, slot_count=slot_count,
    )


def paged_compact_slots_(
    kv_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    scores_pages: torch.Tensor,
    block_table: torch.Tensor,
    destination: torch.Tensor,
) -> None:
    """Twin of :func:`epikv_triton.ops.paged_compact_slots_`: :func:`compact_slots_` on the pages gathered
    into the dense layout, written back to the pages that exist (masked indexing: a host sync).

    A move whose source or destination page does not exist is dropped first, as the kernel drops it.
    """
    index = pages.slot_index(block_table, kv_pages.shape[2], kv_pages.shape[1])
    S, W = index.shape[1], destination.shape[1]
    destination_index = index.gather(1, destination.clamp(0, S - 1))
    moves = (destination >= 0) & (destination < S - W) & (destination_index >= 0) & (index[:, S - W :] >= 0)
    planes = pages.gather_slots(kv_pages.permute(1, 2, 0, 3, 4), index, 0.0)  # [B, S, P, H, D]
    kv = planes.permute(2, 0, 3, 1, 4)  # [P, B, H, S, D], a view of planes
    pos = pages.gather_slots(pos_pages, index, -1)
    scores = pages.gather_slots(scores_pages, index, float("nan"))
    compact_slots_(kv, pos, scores, torch.where(moves, destination, -1))
    pages.scatter_slots_(kv_pages.permute(1, 2, 0, 3, 4), index, planes)
    pages.scatter_slots_(pos_pages, index, pos)
    pages.scatter_slots_(scores_pages, index, scores)


#: Score elements per block of queries in the attention twins: 8 MB of float32. Small enough that the
#: allocator reuses the same block at every layer instead of faulting in fresh pages for a whole matrix
#: (which cost as much as the arithmetic of a long prefill), big enough to keep matmuls large.
SCORE_BLOCK = 1 << 21


def query_blocks(query_shape: torch.Size, slots: int) -> list[slice]:
    """Slices of the ``T`` queries of ``query_shape [B, Hq, T, D]`` whose scores over ``slots`` key slots fit
    :data:`SCORE_BLOCK` elements (one query at least; one empty slice when ``T == 0``)."""
    B, Hq, T, _ = query_shape
    rows = max(1, SCORE_BLOCK // max(1, B * Hq * slots))
    return [slice(start, min(start + rows, T)) for start in range(0, max(T, 1), rows)]


def _grouped_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """``[B, Hkv, G·T, S]`` float32 scaled ``q·kᵀ``, ``-inf`` where hidden.

    Query head ``h`` reads kv head ``h // G``, so the ``G`` heads of a group are
    folded into the rows (row ``g·T + t``) instead of repeating K.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    scores = torch.matmul(q.float().reshape(B, Hkv, group * T, D), k.float().transpose(-1, -2)) * scale
    # Explicit sizes, not -1: a reshape cannot infer a dim of an empty batch.
    S = k.shape[2]
    visible = visibility_mask(pos, query_slots, window)[:, None].expand(B, group, T, S).reshape(B, 1, group * T, S)
    return scores.masked_fill(~visible, float("-inf"))


def _delta_norms(x: torch.Tensor, query_slots: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, T]`` float32 ``‖x_t − x_{t−1}‖₂`` of the new tokens, token ``t`` being ``x`` at
    ``query_slots[:, t]`` (``prev`` before token 0; NaN without it)."""
    new = gather_slots(x, query_slots).float()
    if prev is None:
        first = torch.full_like(new[:, :, :1, 0], float("nan"))
    else:
        first = torch.linalg.vector_norm(new[:, :, 0] - prev.float(), dim=-1)[:, :, None]
    rest = torch.linalg.vector_norm(new[:, :, 1:] - new[:, :, :-1], dim=-1)
    return torch.cat([first, rest], dim=2)


__all__ = [
    "attention_column_sums",
    "compact_slots_",
    "paged_attention_column_sums",
    "paged_compact_slots_",
    "paged_slot_attention",
    "rolling_zscore",
    "slot_attention",
]
