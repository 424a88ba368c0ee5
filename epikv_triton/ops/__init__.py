"""The epikv_triton kernel set: plain tensors in and out, no transformers.

Five ops, each with a Triton kernel and a PyTorch twin in :mod:`.naive`:

* :func:`slot_attention` — fused attention of new tokens over a slot cache,
  emitting the per-new-key delta norms ``‖k_t − k_{t−1}‖``, ``‖v_t − v_{t−1}‖``.
* :func:`rolling_zscore` — the causal rolling z-score of many bands, combined
  into one score per token, state updated in place.
* :func:`select_slots` / :func:`compaction_plan` / :func:`compact_slots_`
  (or all at once, :func:`evict_`) — budgeted partial selection, then an
  in-place compaction of every layer's K and V plus the slot metadata that
  moves only the kept slots above the new fill into the freed slots below it.
* :func:`attention_column_sums` — the H2O score without the attention matrix:
  pass 2 of a two-pass kernel whose pass 1 is :func:`slot_attention` with
  ``return_lse=True``; exact column sums of the attention probabilities.

Backend: Triton when the tensors are on a GPU or ``TRITON_INTERPRET=1``,
otherwise the PyTorch twin. ``EPIKV_BACKEND=triton|torch`` forces one. A
shape or dtype the kernels do not cover (``head_dim > 256``) runs the twin.
Layouts are documented on each function in :mod:`.naive`; any strides work.

Under ``torch.compile`` the ops with a kernel are custom ops (see
:mod:`._library`), so a compiled caller traces through every op here with no
graph break; pass ``check_positions=False`` there (that check reads device data).

Inference only, on both backends: an op called with grad mode on and an input
that requires grad returns outputs whose backward raises, never silently
gradient-free ones. Call them under ``torch.no_grad()`` or
``torch.inference_mode()`` (what the cache integrations do).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import _library, naive
from ._checks import check_attention, check_column_sums, check_compact, check_plan, check_select, check_zscore
from ._library import backend_for
from .naive import AttentionResult


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
    """Attention of ``T`` new tokens over ``S`` key slots, with delta norms.

    ``q [B, Hq, T, D]``, ``k``/``v [B, Hkv, S, D]`` (fp16, bf16 or fp32, one
    dtype), ``pos [B, S]`` int32/int64 (``-1`` = empty or padding; slot order
    carries no meaning). ``query_slots [B, T]`` int32/int64: the slot holding
    new token ``t``'s own key/value, each in ``[0, S)``, any slots in any order
    (``None``: the last ``T`` slots, in order); token ``t``'s position is
    ``pos_q[t] = pos[query_slots[t]]``, and the real ones must strictly
    increase. Key ``j`` is visible to query ``i`` iff ``pos[j] >= 0 and
    pos[j] <= pos_q[i]`` (and ``pos_q[i] - pos[j] < window``).
    ``prev_k``/``prev_v [B, Hkv, D]``: the key/value of the token before the
    first new one (its delta is NaN without them); token ``t > 0`` is compared
    with the key/value in token ``t - 1``'s query slot. ``num_splits`` caps how
    many contiguous key splits run in parallel (split-K: each launched split
    gets keys, so fewer may run); ``None`` picks it from the shape and the GPU.
    ``slot_count [B]`` int32/int64 (device): the slots in use; slots
    ``>= slot_count`` are empty whatever ``pos`` holds (as keys and as query
    slots) and the kernel skips their key tiles without a host read, so a
    static-shape step over the whole buffer costs only its fill. Their K/V
    bytes must still be finite numbers, like every slot's: on sm_90 a ragged
    key tile is one TMA copy and reaches the ``p @ v`` product whole, where a
    masked key's probability 0 times a NaN is NaN (the twin does the same).
    Zeroing V on those tiles would take wgmma's operand through registers.
    ``check_positions`` validates positions and query slots on the host (host
    syncs); engines that build them themselves, and compiled code, pass ``False``.
    Returns :class:`AttentionResult` ``(out, dk, dv, lse)``; inference only (no backward).
    """
    check_attention(q, k, v, pos, query_slots, window, prev_k, prev_v, num_splits, slot_count, check_positions)
    attention = _routed(_library.slot_attention_op, _library.slot_attention, q, k, v, prev_k, prev_v)
    out, dk, dv, lse = attention(
        q, k, v, pos, query_slots, _optional_float(scale), window, prev_k, prev_v, with_deltas, return_lse, num_splits,
        slot_count,
    )
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
    """H2O scores: attention probability per key slot, summed over queries and group heads.

    ``q [B, Hq, T, D]``, ``k [B, Hkv, S, D]`` (one float dtype), ``pos [B, S]``,
    ``query_slots [B, T]``, ``window`` and ``slot_count [B]`` exactly as passed to
    :func:`slot_attention`, and ``lse [B, Hq, T]`` float32 from that call
    (``return_lse=True``). Returns ``[B, Hkv, S]`` float32; see
    :func:`.naive.attention_column_sums`. The Triton path never materialises
    the attention matrix. ``check_positions`` as for :func:`slot_attention`.
    """
    check_column_sums(q, k, pos, lse, query_slots, window, slot_count, check_positions)
    column_sums = _routed(_library.attention_column_sums_op, _library.attention_column_sums, q, k, lse)
    return column_sums(q, k, pos, lse, query_slots, _optional_float(scale), window, slot_count)


def rolling_zscore(
    values: torch.Tensor,
    ring: torch.Tensor,
    count: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rolling z-score update: ``values [B, NB, T]`` -> ``score [B, T]``; ``ring``/``count`` in place.

    See :func:`.naive.rolling_zscore` for the exact definition.
    """
    check_zscore(values, ring, count, weights, eps)
    zscore = _routed(_library.rolling_zscore_op, _library.rolling_zscore, values, ring, weights)
    return zscore(values, ring, count, weights, float(eps))


def select_slots(
    scores: torch.Tensor,
    pos: torch.Tensor,
    budget: int,
    *,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
) -> torch.Tensor:
    """Kept slots ``[B, S]`` bool, at most ``min(budget, S)`` per row; see :func:`.naive.select_slots`.

    A partial selection (``topk`` of the slots to drop), so O(S) per sequence,
    on the tensors' device with no host synchronisation on either backend.
    ``protect_prefix`` as ints is checked against the budget; as a device
    tensor ``[B]`` it is not (that would need a sync), so the caller must
    guarantee ``max(prefix) + recent <= budget``.
    """
    check_select(scores, pos, budget, protect_prefix, recent)
    return naive.select_slots(scores, pos, budget, protect_prefix=protect_prefix, recent=recent)


def compaction_plan(keep: torch.Tensor, fill: int) -> torch.Tensor:
    """``[B, S - fill]`` int64: where each slot at or above ``fill`` goes (``-1`` = dropped).

    ``keep [B, S]`` bool holds at most ``fill`` slots per row (as from
    :func:`select_slots` with ``fill = min(budget, S)``); see
    :func:`.naive.compaction_plan`. A few small sync-free launches on ``[B, S]``.
    """
    check_plan(keep, fill)
    return naive.compaction_plan(keep, fill)


def compact_slots_(kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor) -> None:
    """Move slot ``S - W + j`` of every plane of ``kv [P, B, H, S, D]`` and of ``pos``/``scores`` to
    ``destination[b, j]`` (``[B, W]`` from :func:`compaction_plan`), in place; clears ``[S - W, S)``.

    Moves only the kept slots at or above the new fill, so an eviction costs
    what it evicts; see :mod:`.compaction` for the kernel.
    """
    check_compact(kv, pos, scores, destination)
    _routed(_library.compact_slots_op, _library.compact_slots_, kv, scores)(kv, pos, scores, destination)


def evict_(
    kv: torch.Tensor,
    pos: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    *,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
) -> torch.Tensor:
    """:func:`select_slots`, :func:`compaction_plan` and :func:`compact_slots_`: keep ``budget`` slots.

    Afterwards the kept slots of every sequence are the first ``min(budget, S)``
    (in no particular order). Returns the ``destination`` used: ``[B, S - fill]``,
    ``(destination >= 0).sum(1)`` slots moved per sequence.
    """
    keep = select_slots(scores, pos, budget, protect_prefix=protect_prefix, recent=recent)
    destination = compaction_plan(keep, min(budget, keep.shape[1]))
    compact_slots_(kv, pos, scores, destination)
    return destination


def _routed(op: torch.library.CustomOpDef, implementation: Callable, *float_inputs: torch.Tensor | None) -> Callable:
    """The registered custom op while ``torch.compile`` traces (one graph node, no break) or when
    autograd would record the call (a node whose backward raises: the ops are inference-only, see
    :mod:`._library`), else its implementation called directly: the dispatcher round trip costs 10 to
    20 µs of host time a call, as much as a kernel launch, and an eager decode step makes dozens of
    these calls."""
    recorded = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in float_inputs)
    return op if recorded or torch.compiler.is_compiling() else implementation


def _optional_float(x: float | None) -> float | None:
    """A scale as the op schema's ``float?`` wants it (a caller may pass an int)."""
    return None if x is None else float(x)


__all__ = [
    "AttentionResult",
    "attention_column_sums",
    "backend_for",
    "compact_slots_",
    "compaction_plan",
    "evict_",
    "naive",
    "rolling_zscore",
    "select_slots",
    "slot_attention",
]
