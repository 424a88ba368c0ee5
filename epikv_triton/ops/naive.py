"""PyTorch twins of every op in :mod:`epikv_triton.ops`.

Each function here has the same signature and semantics as its Triton
counterpart. They are the test oracle and the CPU path, so they favour
clarity over speed, but they still never build anything larger than the
attention matrix of one call.

Layouts (shared with the kernels, see :mod:`epikv_triton.ops`):

* ``q``: ``[B, Hq, T, D]``; ``k``, ``v``: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0``.
* ``pos``: ``[B, S]`` integer absolute positions of the key slots, ``-1`` for an
  empty or padding slot. Slot order carries no meaning.
* ``query_slots``: ``[B, T]`` int32/int64, the slot holding query token ``t``'s
  own key and value (so its position is ``pos[b, query_slots[b, t]]``); any
  slots, in any order, each in ``[0, S)``. ``None`` means the last ``T`` slots,
  in order (:func:`last_slots`).
* ``slot_count``: optional ``[B]`` int32/int64, the slots in use: slots
  ``>= slot_count[b]`` are empty whatever ``pos`` holds there, as keys and as
  query slots (:func:`slots_in_use`). ``None``: every slot is in use.
* Any strides are accepted.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class AttentionResult(NamedTuple):
    """What :func:`slot_attention` returns.

    ``out``: ``[B, Hq, T, D]`` in ``q.dtype``.
    ``dk``, ``dv``: ``[B, Hkv, T]`` float32 delta norms ``‖k_t − k_{t−1}‖₂`` of the
    new keys/values (``None`` when ``with_deltas=False``). The first new token is
    compared with ``prev_k``/``prev_v``; without them its delta is NaN ("no value").
    ``lse``: ``[B, Hq, T]`` float32 natural-log sum of exp of the scaled scores
    (``-inf`` for a query that sees no key), or ``None`` unless asked for.
    """

    out: torch.Tensor
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    lse: torch.Tensor | None


def last_slots(batch: int, num_queries: int, num_slots: int, device: torch.device) -> torch.Tensor:
    """``[B, T]`` int64 query slots when none are given: the last ``T`` of ``S`` slots, in order
    (an expanded view, no copy per sequence)."""
    return torch.arange(num_slots - num_queries, num_slots, device=device).expand(batch, num_queries)


def resolve_query_slots(query_slots: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``query_slots``, or the last ``T`` slots of ``k`` for ``q [B, Hq, T, D]`` when it is ``None``."""
    if query_slots is not None:
        return query_slots
    return last_slots(q.shape[0], q.shape[2], k.shape[2], q.device)


def slots_in_use(pos: torch.Tensor, slot_count: torch.Tensor | None) -> torch.Tensor:
    """``pos [B, S]`` with the slots at or past ``slot_count [B]`` marked empty (``-1``); ``pos`` itself
    when ``slot_count`` is ``None``."""
    if slot_count is None:
        return pos
    in_use = torch.arange(pos.shape[1], device=pos.device) < slot_count[:, None]
    return torch.where(in_use, pos, -1)


def visibility_mask(pos: torch.Tensor, query_slots: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[B, T, S]`` bool: key slot ``j`` is visible to query ``i``.

    The one masking rule of the library: ``pos_k[j] >= 0`` and
    ``pos_k[j] <= pos_q[i]`` and, with a window, ``pos_q[i] - pos_k[j] < window``,
    where ``pos_q[i] = pos[query_slots[i]]``. A padding query (``pos_q = -1``)
    sees nothing. Nothing here depends on which slot holds what.
    """
    pos_q = pos.gather(1, query_slots.long())[:, :, None]
    pos_k = pos[:, None, :]
    visible = (pos_k >= 0) & (pos_k <= pos_q)
    if window is not None:
        visible &= (pos_q - pos_k) < window
    return visible


def gather_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` at ``slots [B, T]``: ``[B, H, T, D]`` (a copy)."""
    B, H, _, D = x.shape
    return x.gather(2, slots.long()[:, None, :, None].expand(B, H, slots.shape[1], D))


def delta_norms(
    x: torch.Tensor, query_slots: torch.Tensor, prev: torch.Tensor | None
) -> torch.Tensor:
    """``[B, H, T]`` float32 ``‖x_t − x_{t−1}‖₂`` of the new tokens, token ``t`` being ``x`` at
    ``query_slots[:, t]`` (``prev`` before token 0; NaN without it)."""
    new = gather_slots(x, query_slots).float()
    if prev is None:
        first = torch.full_like(new[:, :, :1, 0], float("nan"))
    else:
        first = torch.linalg.vector_norm(new[:, :, 0] - prev.float(), dim=-1)[:, :, None]
    rest = torch.linalg.vector_norm(new[:, :, 1:] - new[:, :, :-1], dim=-1)
    return torch.cat([first, rest], dim=2)


def grouped_scores(
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
    """Attention of the ``T`` new tokens (in ``query_slots``) over all ``S`` key slots, plus delta norms.

    Covers prefill, chunked prefill and decode (``T == 1``) with one rule (see
    :func:`visibility_mask`); the delta norms compare each new token's key and
    value with those in the previous token's query slot (see :func:`delta_norms`). Softmax in float32; the output is cast
    to ``q.dtype``. A query that sees no key gets a zero output and ``lse = -inf``.
    ``num_splits`` only steers the Triton path's split-K; it is accepted and
    ignored here so both backends share one signature. Slots at or past
    ``slot_count`` are empty (:func:`slots_in_use`); the delta norms still read
    the query slots' keys and values.
    """
    del num_splits
    B, Hq, T, D = q.shape
    query_slots = resolve_query_slots(query_slots, q, k)
    scores = grouped_scores(q, k, slots_in_use(pos, slot_count), query_slots, scale, window)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.matmul(probs, v.float()).reshape(B, Hq, T, D).to(q.dtype)
    lse = lse.reshape(B, Hq, T)
    dk = dv = None
    if with_deltas:
        dk = delta_norms(k, query_slots, prev_k)
        dv = delta_norms(v, query_slots, prev_v)
    return AttentionResult(out, dk, dv, lse if return_lse else None)


def rolling_zscore(
    values: torch.Tensor,
    ring: torch.Tensor,
    count: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Causal rolling z-score of many bands, combined into one score per token.

    ``values``: ``[B, NB, T]`` float32 new band values in stream order; NaN
    means "no value" (first token of a sequence, padding): it is not pushed
    into the window and contributes 0 to the score.
    ``ring``: ``[B, NB, W]`` float32, the last ``W`` pushed values of each band;
    the next push goes to index ``count % W``. Updated in place.
    ``count``: ``[B, NB]`` int64 values pushed so far. Updated in place.
    ``weights``: ``[NB]`` float32 signed band weights.

    For each pushed value ``x``, with the window being the last
    ``n = min(count, W)`` pushed values including ``x``:
    ``z = (x − mean) / (std + eps)`` (population std), and ``z = 0`` while
    ``n < 2``. Returns ``score [B, T] = Σ_band weights[band] · z``, float32.
    """
    B, NB, T = values.shape
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


def select_slots(
    scores: torch.Tensor,
    pos: torch.Tensor,
    budget: int,
    *,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
) -> torch.Tensor:
    """Choose which slots each sequence keeps: ``[B, S]`` bool mask.

    ``scores``: ``[B, S]`` float, higher = more important; NaN ranks lowest
    (below ``-inf``). ``pos``: ``[B, S]`` int absolute positions, ``-1`` =
    empty/padding (never kept, never costs budget). Protected, always kept:
    positions below ``protect_prefix`` (an int, one int per sequence, or an int
    tensor ``[B]`` on the scores' device: sink tokens or the whole prompt) and
    the ``recent`` highest positions of the sequence. The rest of the budget
    goes to the highest scores; among equal scores the older token (lower
    position) is kept, so the choice never depends on slot order.

    Each row keeps ``min(budget, S, real tokens)`` slots. Cost: one partial
    selection of the ``S - min(budget, S)`` slots to drop per row (``topk``
    with a small ``k``: O(S) per sequence, no sort), no host synchronisation
    (a list of prefixes is copied to the device each call; a tensor avoids that
    copy on a hot path).
    """
    B, S = scores.shape
    dropped = S - min(budget, S)
    valid = pos >= 0
    if dropped == 0:
        return valid
    key = _keep_priority(scores, pos, valid, _per_sequence(protect_prefix, B, pos.device), recent)
    lowest = torch.topk(key, dropped, dim=1, largest=False, sorted=False).indices
    return valid.scatter(1, lowest, False)


# Bits of the keep priority: the position tie-break below the score below the tier.
_POSITION_BITS = 30
_SCORE_LEVELS = 2**32  # ordered float32 bit patterns, NaN at 0


def _keep_priority(
    scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, prefix: torch.Tensor, recent: int
) -> torch.Tensor:
    """``[B, S]`` int64, distinct for the real slots of a row: higher = kept first.

    Protected slots rank above every score, padding below everything; between
    them, the float32 score's ordered bit pattern (NaN lowest, ``-0.0`` equal
    to ``0.0``), then the older position.
    """
    # Adding 0.0 turns -0.0 into 0.0, so the two compare equal as floats do.
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # monotone in the float, in [0, 2^32)
    ordered = torch.where(torch.isnan(scores), 0, ordered)
    seen = pos.max(dim=1, keepdim=True).values + 1
    protected = (pos < prefix[:, None]) | (pos >= seen - recent)
    tier = torch.where(protected, _SCORE_LEVELS, ordered)
    younger = pos.clamp(min=0, max=2**_POSITION_BITS - 1)
    priority = tier * 2**_POSITION_BITS + (2**_POSITION_BITS - 1 - younger)
    return torch.where(valid, priority, -1)


def compaction_plan(keep: torch.Tensor, fill: int) -> torch.Tensor:
    """Where each slot at or above ``fill`` goes once the kept set is ``keep``: ``[B, S - fill]`` int64.

    ``keep``: ``[B, S]`` bool with at most ``fill`` kept slots per row (what
    :func:`select_slots` returns, with ``fill = min(budget, S)``). Slot order
    carries no meaning, so only the kept slots at or above ``fill`` move: the
    ``i``-th of them (in slot order) into the ``i``-th slot below ``fill`` that
    is not kept. Entry ``[b, j]`` is that destination for slot ``fill + j``,
    or ``-1`` when the slot is dropped. Destinations are distinct and below
    ``fill``, so sources and destinations never overlap, and a row moves at
    most ``S - fill`` slots. Sync-free.

    A hole that receives nothing is a slot that was already empty: a row keeps
    fewer than ``fill`` slots only when it holds fewer real tokens.
    """
    B, S = keep.shape
    width = S - fill
    holes = ~keep[:, :fill]
    movers = keep[:, fill:]
    # Only the first `width` holes can receive a mover; the rest are parked in a spare column.
    hole_rank = holes.cumsum(dim=1) - 1
    hole_column = torch.where(holes & (hole_rank < width), hole_rank, width)
    hole_slot = torch.full((B, width + 1), -1, dtype=torch.int64, device=keep.device)
    below = torch.arange(fill, device=keep.device).expand(B, fill)
    hole_slot.scatter_(1, hole_column, below)
    mover_rank = (movers.cumsum(dim=1) - 1).clamp(min=0)
    return torch.where(movers, hole_slot.gather(1, mover_rank), -1)


def compact_slots_(
    kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor
) -> None:
    """Move the kept slots at or above the new fill into the holes below it, in place, every plane at once.

    ``kv``: ``[P, B, H, S, D]`` (planes = every layer's K and V), any strides.
    ``pos``: ``[B, S]`` int; ``scores``: ``[B, S]`` float32 slot metadata.
    ``destination``: ``[B, W]`` int64 from :func:`compaction_plan`: slot
    ``S - W + j`` moves to slot ``destination[b, j] < S - W``, or is dropped
    (``-1``). Destinations must be distinct and below ``S - W`` (not checked: a host sync; the
    Triton kernel drops a slot whose destination is not, where this twin may raise).

    Afterwards every moved slot's K/V, position and score sit at its
    destination, and slots ``>= S - W`` have ``pos = -1``, ``score = NaN``
    (their K/V bytes are left as they were: masked out by pos). Slots below
    ``S - W`` that are not destinations are untouched. Costs the moved slots
    only; no host synchronisation.
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
    """H2O column sums: the attention probability each key slot receives, summed.

    ``q``: ``[B, Hq, T, D]``; ``k``: ``[B, Hkv, S, D]`` (one float dtype);
    ``pos``: ``[B, S]`` int and ``query_slots``: ``[B, T]`` int (see
    :func:`visibility_mask`); ``lse``: ``[B, Hq, T]`` float32 natural-log row
    normalisers, as :func:`slot_attention` returns them (``-inf``: the query saw
    nothing and contributes nothing); ``slot_count`` as passed to it.

    Returns ``[B, Hkv, S]`` float32: for each key slot ``j``,
    ``Σ_{t, g} exp(scale · q[g, t] · k[j] − lse[g, t])`` over the ``T`` queries and
    the ``G = Hq / Hkv`` query heads of its kv group, over visible pairs only.
    Materialises the ``[B, Hq, T, S]`` probabilities (the eager H2O baseline).
    """
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    scores = grouped_scores(q, k, slots_in_use(pos, slot_count), resolve_query_slots(query_slots, q, k), scale, window)
    normaliser = lse.float().reshape(B, Hkv, Hq // Hkv * T, 1)
    # A query that saw nothing (lse = -inf) has every score at -inf too: give it a finite normaliser.
    probs = torch.exp(scores - normaliser.masked_fill(torch.isinf(normaliser), 0.0))
    return probs.sum(dim=2)


def _per_sequence(value: int | Sequence[int] | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.int64)
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    return torch.as_tensor(list(value), dtype=torch.int64, device=device)


__all__ = [
    "AttentionResult",
    "attention_column_sums",
    "slot_attention",
    "compact_slots_",
    "compaction_plan",
    "delta_norms",
    "gather_slots",
    "last_slots",
    "resolve_query_slots",
    "rolling_zscore",
    "select_slots",
    "slots_in_use",
    "visibility_mask",
]
