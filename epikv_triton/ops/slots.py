"""The slot cache's vocabulary, shared by the twins, the Triton launchers and the input checks.

A cache holds ``S`` key/value slots per sequence; ``pos [B, S]`` (int32/int64)
gives each slot's absolute position, ``-1`` for an empty or padding slot, and
slot order carries no meaning. A call's ``T`` new tokens sit in its
``query_slots [B, T]`` (int32/int64): token ``t``'s own key and value are in
slot ``query_slots[b, t]``, so its position is ``pos[b, query_slots[b, t]]``.
``slot_count [B]`` (int32/int64), when given, marks the slots at or past it
empty whatever ``pos`` holds there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionResult(NamedTuple):
    """What :func:`epikv_triton.ops.slot_attention` returns.

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
    sees nothing. Nothing here depends on which slot holds what. The kernels'
    copy of the rule is :func:`~epikv_triton.ops._triton_support.visible_pairs`.
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


__all__ = ["AttentionResult", "gather_slots", "last_slots", "resolve_query_slots", "slots_in_use", "visibility_mask"]
