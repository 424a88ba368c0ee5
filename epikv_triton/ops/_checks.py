"""Input validation shared by both backends: every error names the argument
and what was expected, so a caller never has to read a kernel to find out."""

from __future__ import annotations

from typing import Sequence

import torch

from . import pages
from .slots import slots_in_use

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int32, torch.int64)


def require_tensor(name: str, x: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).removeprefix('torch.')}")
    return x


def require_shape(name: str, x: torch.Tensor, shape: Sequence[int], layout: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(x.shape)}")


def require_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return devices.pop()


def check_queries_over_slots(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    query_slots: torch.Tensor | None,
    window: int | None,
    slot_count: torch.Tensor | None,
    **companions: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    """What every attention-shaped op requires; returns ``(B, Hq, Hkv, T, S, D)``.

    ``q [B, Hq, T, D]`` and ``k [B, Hkv, S, D]`` of one float dtype with
    ``Hq`` a positive multiple of ``Hkv`` and ``T, D, S >= 1`` (``B = 0`` is allowed), ``pos [B, S]`` int32/int64,
    ``query_slots`` None (then ``S >= T``: the last ``T`` slots) or ``[B, T]``
    int32/int64, ``window`` None or a positive int, ``slot_count`` None or
    ``[B]`` int32/int64; ``companions`` (the op's other tensors, None when
    absent) share the device. Positions, slots and slot counts are not read
    here (see :func:`check_query_positions`).
    """
    require_tensor("q", q, 4, FLOAT_DTYPES)
    require_tensor("k", k, 4, FLOAT_DTYPES)
    require_tensor("pos", pos, 2, INT_DTYPES)
    if query_slots is not None:
        require_tensor("query_slots", query_slots, 2, INT_DTYPES)
    if slot_count is not None:
        require_tensor("slot_count", slot_count, 1, INT_DTYPES)
    require_same_device(q=q, k=k, pos=pos, query_slots=query_slots, slot_count=slot_count, **companions)
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k must have shape [B, Hkv, S, D] with B={B} and D={D} taken from q [B, Hq, T, D]; got {tuple(k.shape)}"
        )
    Hkv, S = k.shape[1], k.shape[2]
    if S == 0:
        raise ValueError("k has no slots (S = 0): every query needs at least its own key slot")
    check_query_layout(q, k, Hkv, S, query_slots, window, slot_count)
    require_shape("pos", pos, (B, S), "[B, S]")
    return B, Hq, Hkv, T, S, D


def check_paged_queries(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    query_slots: torch.Tensor,
    window: int | None,
    slot_count: torch.Tensor | None,
    **companions: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    """:func:`check_queries_over_slots` for the paged layout; returns ``(B, Hq, Hkv, T, S, D)`` with ``S =
    max_pages · page_size`` logical slots.

    ``k_pages [num_pages, page_size, Hkv, D]`` with at least one page of one slot, ``pos_pages [num_pages,
    page_size]`` int32/int64, ``block_table [B, max_pages]`` int32/int64 with ``max_pages >= 1``, and
    ``query_slots`` given (there is no "last T slots" of a paged sequence). Page ids are not read here
    (see :func:`check_block_table`).
    """
    require_tensor("q", q, 4, FLOAT_DTYPES)
    require_tensor("k_pages", k_pages, 4, FLOAT_DTYPES)
    require_tensor("pos_pages", pos_pages, 2, INT_DTYPES)
    require_tensor("block_table", block_table, 2, INT_DTYPES)
    if query_slots is None:
        raise ValueError("the paged ops need query_slots: the logical slot of each new token (there is no default)")
    require_tensor("query_slots", query_slots, 2, INT_DTYPES)
    if slot_count is not None:
        require_tensor("slot_count", slot_count, 1, INT_DTYPES)
    require_same_device(
        q=q, k_pages=k_pages, pos_pages=pos_pages, block_table=block_table, query_slots=query_slots,
        slot_count=slot_count, **companions,
    )
    B, Hq, T, D = q.shape
    num_pages, page_size, Hkv, _ = k_pages.shape
    if k_pages.shape[3] != D:
        raise ValueError(
            f"k_pages must have shape [num_pages, page_size, Hkv, D] with D={D} taken from q [B, Hq, T, D]; "
            f"got {tuple(k_pages.shape)}"
        )
    if num_pages == 0 or page_size == 0:
        raise ValueError(f"k_pages holds no slot (num_pages = {num_pages}, page_size = {page_size})")
    require_shape("pos_pages", pos_pages, (num_pages, page_size), "[num_pages, page_size] like k_pages")
    if block_table.shape[0] != B or block_table.shape[1] == 0:
        raise ValueError(
            f"block_table must have shape [B, max_pages] with B={B} taken from q and max_pages >= 1; "
            f"got {tuple(block_table.shape)}"
        )
    S = block_table.shape[1] * page_size
    check_query_layout(q, k_pages, Hkv, S, query_slots, window, slot_count)
    return B, Hq, Hkv, T, S, D


def check_query_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    Hkv: int,
    S: int,
    query_slots: torch.Tensor | None,
    window: int | None,
    slot_count: torch.Tensor | None,
) -> None:
    """What the queries require of ``Hkv`` heads over ``S`` slots, whichever layout holds them."""
    B, Hq, T, D = q.shape
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share one dtype; got {q.dtype} and {k.dtype}")
    if Hkv == 0 or Hq == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"query heads ({Hq}) must be a positive multiple of key/value heads ({Hkv}) for grouped-query attention"
        )
    if T == 0:
        raise ValueError("q has no tokens (T = 0)")
    if D == 0:
        raise ValueError("q and k have an empty head dim (D = 0): pass at least one feature per head")
    if query_slots is None and S < T:
        raise ValueError(
            f"k has {S} slots but q has {T} tokens: without query_slots the last T key slots must hold the new "
            "tokens' keys"
        )
    if query_slots is not None:
        require_shape("query_slots", query_slots, (B, T), "[B, T] (one key slot per query token)")
    if slot_count is not None:
        require_shape("slot_count", slot_count, (B,), "[B] (slots in use per sequence)")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


def check_block_table(block_table: torch.Tensor, num_pages: int, *, distinct: bool) -> None:
    """Every entry is a page id in ``[0, num_pages)`` or ``-1`` (no page), and with ``distinct`` no page is
    named twice (a compaction writes each page for one sequence). Reads the table (a host sync)."""
    bad = (block_table < -1) | (block_table >= num_pages)
    if bool(bad.any()):
        raise ValueError(
            f"block_table entries must be page ids in [0, num_pages={num_pages}) or -1 (no page); got "
            f"{int(block_table[bad][0])}"
        )
    if distinct:
        named = block_table[block_table >= 0]
        values, counts = named.unique(return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(
                f"block_table names page {int(values[counts > 1][0])} more than once: a compaction moves each "
                "page's slots for one sequence, so its pages must be distinct"
            )


def check_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    query_slots: torch.Tensor | None,
    window: int | None,
    prev_k: torch.Tensor | None,
    prev_v: torch.Tensor | None,
    num_splits: int | None,
    slot_count: torch.Tensor | None,
    check_positions: bool,
) -> None:
    require_tensor("v", v, 4, FLOAT_DTYPES)
    B, _, Hkv, T, S, D = check_queries_over_slots(
        q, k, pos, query_slots, window, slot_count, v=v, prev_k=prev_k, prev_v=prev_v
    )
    check_values_and_options(q, "v", v, k.shape, "[B, Hkv, S, D] like k", prev_k, prev_v, (B, Hkv, D), num_splits)
    if check_positions:
        check_query_positions(slots_in_use(pos, slot_count), query_slots, T)


def check_paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    query_slots: torch.Tensor,
    window: int | None,
    prev_k: torch.Tensor | None,
    prev_v: torch.Tensor | None,
    num_splits: int | None,
    slot_count: torch.Tensor | None,
    check_positions: bool,
) -> None:
    require_tensor("v_pages", v_pages, 4, FLOAT_DTYPES)
    B, _, Hkv, T, _, D = check_paged_queries(
        q, k_pages, pos_pages, block_table, query_slots, window, slot_count, v_pages=v_pages, prev_k=prev_k,
        prev_v=prev_v,
    )
    check_values_and_options(
        q, "v_pages", v_pages, k_pages.shape, "[num_pages, page_size, Hkv, D] like k_pages", prev_k, prev_v,
        (B, Hkv, D), num_splits,
    )
    if check_positions:
        check_paged_positions(pos_pages, block_table, query_slots, slot_count, T)


def check_values_and_options(
    q: torch.Tensor,
    name: str,
    v: torch.Tensor,
    shape: Sequence[int],
    layout: str,
    prev_k: torch.Tensor | None,
    prev_v: torch.Tensor | None,
    prev_shape: Sequence[int],
    num_splits: int | None,
) -> None:
    """Attention's values (shaped like the keys), ``prev_k``/``prev_v [B, Hkv, D]`` and ``num_splits``."""
    if v.dtype != q.dtype:
        raise ValueError(f"q, the keys and {name} must share one dtype; got {q.dtype} and {v.dtype}")
    require_shape(name, v, shape, layout)
    for prev_name, prev in (("prev_k", prev_k), ("prev_v", prev_v)):
        if prev is not None:
            require_tensor(prev_name, prev, 3, FLOAT_DTYPES)
            require_shape(prev_name, prev, prev_shape, "[B, Hkv, D]")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")


def check_paged_positions(
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    query_slots: torch.Tensor,
    slot_count: torch.Tensor | None,
    num_queries: int,
) -> None:
    """:func:`check_query_positions` on the sequences' slots gathered from their pages, after
    :func:`check_block_table` (host syncs)."""
    num_pages, page_size = pos_pages.shape
    check_block_table(block_table, num_pages, distinct=False)
    pos = pages.gather_slots(pos_pages, pages.slot_index(block_table, page_size, num_pages), -1)
    check_query_positions(slots_in_use(pos, slot_count), query_slots, num_queries)


def check_query_positions(pos: torch.Tensor, query_slots: torch.Tensor | None, num_queries: int) -> None:
    """Positions are ``-1`` or non-negative, query slots lie in ``[0, S)``, and the new tokens' real
    positions (``pos`` at their query slots) strictly increase.

    Reads device data (host syncs); callers that build positions and slots
    themselves pass ``check_positions=False``.
    """
    if bool((pos < -1).any()):
        raise ValueError("pos must be -1 (empty/padding slot) or a non-negative absolute position")
    S = pos.shape[1]
    if query_slots is None:
        new = pos[:, S - num_queries :]
    else:
        if bool(((query_slots < 0) | (query_slots >= S)).any()):
            raise ValueError(f"query_slots must index the key slots: every entry in [0, S={S})")
        new = pos.gather(1, query_slots.long())
    if num_queries < 2:
        return
    real = new >= 0
    # Running maximum of the real positions seen so far (-1 before the first).
    running = torch.cummax(torch.where(real, new, torch.full_like(new, -1)), dim=1).values
    out_of_order = real[:, 1:] & (new[:, 1:] <= running[:, :-1])
    if bool(out_of_order.any()):
        raise ValueError(
            "positions out of order: the new tokens' positions (pos at query_slots, by default its last T "
            "entries) must strictly increase within each sequence, with -1 only for padding"
        )


def check_zscore(
    values: torch.Tensor, ring: torch.Tensor, count: torch.Tensor, weights: torch.Tensor, eps: float
) -> None:
    require_tensor("values", values, 3, (torch.float32,))
    require_tensor("ring", ring, 3, (torch.float32,))
    require_tensor("count", count, 2, (torch.int64,))
    require_tensor("weights", weights, 1, (torch.float32,))
    require_same_device(values=values, ring=ring, count=count, weights=weights)
    B, NB, _ = values.shape
    if ring.shape[0] != B or ring.shape[1] != NB or ring.shape[2] < 1:
        raise ValueError(f"ring must have shape [B, NB, W] = [{B}, {NB}, W>=1] like values; got {tuple(ring.shape)}")
    require_shape("count", count, (B, NB), "[B, NB]")
    require_shape("weights", weights, (NB,), "[NB]")
    if not ring.is_contiguous() or not count.is_contiguous():
        raise ValueError("ring and count are updated in place and must be contiguous")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def check_select(
    scores: torch.Tensor,
    pos: torch.Tensor,
    budget: int,
    protect_prefix: int | Sequence[int] | torch.Tensor,
    recent: int,
    reserve: int = 0,
    reserve_scores: torch.Tensor | None = None,
) -> None:
    require_tensor("scores", scores, 2, FLOAT_DTYPES)
    require_tensor("pos", pos, 2, INT_DTYPES)
    require_same_device(scores=scores, pos=pos)
    require_shape("pos", pos, scores.shape, "[B, S] like scores")
    if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
        raise ValueError(f"reserve must be a non-negative int, got {reserve!r}")
    if reserve > 0:
        if reserve_scores is None:
            raise ValueError(f"reserve={reserve} needs reserve_scores [B, S] to choose the reserved slots")
        require_tensor("reserve_scores", reserve_scores, 2, FLOAT_DTYPES)
        require_same_device(scores=scores, reserve_scores=reserve_scores)
        require_shape("reserve_scores", reserve_scores, scores.shape, "[B, S] like scores")
    B = scores.shape[0]
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if not isinstance(recent, int) or recent < 0:
        raise ValueError(f"recent must be a non-negative int, got {recent!r}")
    if isinstance(protect_prefix, torch.Tensor):
        # Reading the values would be a host sync: the caller vouches that they fit the budget.
        require_tensor("protect_prefix", protect_prefix, 1, INT_DTYPES)
        require_shape("protect_prefix", protect_prefix, (B,), "[B]")
        require_same_device(scores=scores, protect_prefix=protect_prefix)
        if budget < recent:
            raise ValueError(f"budget ({budget}) is smaller than the protected recent window ({recent} tokens)")
        return
    prefixes = [protect_prefix] * B if isinstance(protect_prefix, int) else list(protect_prefix)
    if len(prefixes) != B or any(not isinstance(p, int) or p < 0 for p in prefixes):
        raise ValueError(
            f"protect_prefix must be a non-negative int or {B} of them (one per sequence), got {protect_prefix!r}"
        )
    protected = max(prefixes, default=0) + recent
    if budget < protected:
        raise ValueError(
            f"budget ({budget}) is smaller than the protected set (prefix {max(prefixes)} + recent {recent} = "
            f"{protected} tokens): raise the budget, or lower sink/recent (keep_prompt=False protects only the sink)"
        )


def check_plan(keep: torch.Tensor, fill: int) -> None:
    require_tensor("keep", keep, 2, (torch.bool,))
    if not isinstance(fill, int) or not 0 <= fill <= keep.shape[1]:
        raise ValueError(f"fill must be an int in [0, S={keep.shape[1]}] (the slots kept per sequence), got {fill!r}")


def check_compact(kv: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, destination: torch.Tensor) -> None:
    require_tensor("kv", kv, 5, FLOAT_DTYPES)
    require_tensor("pos", pos, 2, INT_DTYPES)
    require_tensor("scores", scores, 2, (torch.float32,))
    require_tensor("destination", destination, 2, (torch.int64,))
    require_same_device(kv=kv, pos=pos, scores=scores, destination=destination)
    _, B, _, S, _ = kv.shape
    require_shape("pos", pos, (B, S), "[B, S] with B, S from kv [P, B, H, S, D]")
    require_shape("scores", scores, (B, S), "[B, S] like pos")
    if destination.shape[0] != B or destination.shape[1] > S:
        raise ValueError(
            f"destination must have shape [B, W] with B={B} and W <= S={S} (one entry per slot at or above the "
            f"new fill, from ops.compaction_plan); got {tuple(destination.shape)}"
        )


def check_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    lse: torch.Tensor,
    query_slots: torch.Tensor | None,
    window: int | None,
    slot_count: torch.Tensor | None,
    check_positions: bool,
) -> None:
    """Inputs of ``attention_column_sums``: ``q``/``k``/``pos``/``query_slots``/``slot_count`` as for
    attention, ``lse [B, Hq, T]`` float32."""
    require_tensor("lse", lse, 3, (torch.float32,))
    B, Hq, _, T, _, _ = check_queries_over_slots(q, k, pos, query_slots, window, slot_count, lse=lse)
    require_shape("lse", lse, (B, Hq, T), "[B, Hq, T] like q (slot_attention's lse)")
    if check_positions:
        check_query_positions(slots_in_use(pos, slot_count), query_slots, T)


def check_paged_column_sums(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_table: torch.Tensor,
    lse: torch.Tensor,
    query_slots: torch.Tensor,
    window: int | None,
    slot_count: torch.Tensor | None,
    check_positions: bool,
) -> None:
    """Inputs of ``paged_attention_column_sums``: as for paged attention, ``lse [B, Hq, T]`` float32."""
    require_tensor("lse", lse, 3, (torch.float32,))
    B, Hq, _, T, _, _ = check_paged_queries(
        q, k_pages, pos_pages, block_table, query_slots, window, slot_count, lse=lse
    )
    require_shape("lse", lse, (B, Hq, T), "[B, Hq, T] like q (paged_slot_attention's lse)")
    if check_positions:
        check_paged_positions(pos_pages, block_table, query_slots, slot_count, T)


def check_paged_compact(
    kv_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    scores_pages: torch.Tensor,
    block_table: torch.Tensor,
    destination: torch.Tensor,
    check_pages: bool,
) -> None:
    require_tensor("kv_pages", kv_pages, 5, FLOAT_DTYPES)
    require_tensor("pos_pages", pos_pages, 2, INT_DTYPES)
    require_tensor("scores_pages", scores_pages, 2, (torch.float32,))
    require_tensor("block_table", block_table, 2, INT_DTYPES)
    require_tensor("destination", destination, 2, (torch.int64,))
    require_same_device(
        kv_pages=kv_pages, pos_pages=pos_pages, scores_pages=scores_pages, block_table=block_table,
        destination=destination,
    )
    _, num_pages, page_size, _, _ = kv_pages.shape
    if num_pages == 0 or page_size == 0:
        raise ValueError(f"kv_pages holds no slot (num_pages = {num_pages}, page_size = {page_size})")
    layout = "[num_pages, page_size] with num_pages, page_size from kv_pages [P, num_pages, page_size, H, D]"
    require_shape("pos_pages", pos_pages, (num_pages, page_size), layout)
    require_shape("scores_pages", scores_pages, (num_pages, page_size), "[num_pages, page_size] like pos_pages")
    B, S = block_table.shape[0], block_table.shape[1] * page_size
    if destination.shape[0] != B or destination.shape[1] > S:
        raise ValueError(
            f"destination must have shape [B, W] with B={B} (block_table's rows) and W <= S={S} (max_pages · "
            f"page_size logical slots): one entry per slot at or above the new fill, from ops.compaction_plan; "
            f"got {tuple(destination.shape)}"
        )
    if check_pages:
        check_block_table(block_table, num_pages, distinct=True)
