"""Which slots an eviction keeps, and where the kept ones go: torch compositions on every backend.

Both are a handful of sync-free aten ops on ``[B, S]`` metadata, so no kernel
is written for them: ``torch.compile`` traces them as they are, and Inductor
may fuse them. Validation is done by the public ops, :func:`epikv_triton.ops.select_slots`
and :func:`epikv_triton.ops.compaction_plan`, which document the arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Bits of the keep priority: the position tie-break below the score below the tier.
_POSITION_BITS = 30
_SCORE_LEVELS = 2**32  # ordered float32 bit patterns, NaN at 0


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
    """``[B, S]`` bool: the slots each sequence keeps.

    One partial selection of the ``S - min(budget, S)`` slots to drop per row
    (``topk`` with a small ``k`` of a distinct priority per slot, see
    :func:`_keep_priority`: O(S) per sequence, no sort). A list of prefixes is
    copied to the device each call; a tensor avoids that copy on a hot path.
    """
    B, S = scores.shape
    dropped = S - min(budget, S)
    valid = pos >= 0
    if dropped == 0:
        return valid
    key = _keep_priority(
        scores, pos, valid, _per_sequence(protect_prefix, B, pos.device), recent, reserve, reserve_scores
    )
    lowest = torch.topk(key, dropped, dim=1, largest=False, sorted=False).indices
    return valid.scatter(1, lowest, False)


def _keep_priority(
    scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, prefix: torch.Tensor, recent: int,
    reserve: int, reserve_scores: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, S]`` int64, distinct for the real slots of a row: higher = kept first.

    Protected slots rank above everything, then the ``reserve`` unprotected real
    slots with the highest ``reserve_scores``, then every other slot by the
    float32 score's ordered bit pattern (NaN lowest, ``-0.0`` equal to ``0.0``);
    padding below everything. Ties go to the older position.
    """
    seen = pos.max(dim=1, keepdim=True).values + 1
    protected = (pos < prefix[:, None]) | (pos >= seen - recent)
    tier = torch.where(protected, _SCORE_LEVELS + 1, _ordered(scores))
    older_first = 2**_POSITION_BITS - 1 - pos.clamp(min=0, max=2**_POSITION_BITS - 1)
    if reserve > 0:
        rank = torch.where(valid & ~protected, _ordered(reserve_scores) * 2**_POSITION_BITS + older_first, -1)
        top = torch.topk(rank, min(reserve, rank.shape[1]), dim=1, sorted=False)
        # A row with fewer candidates than the reserve tops up with non-candidates (-1): not reserved.
        reserved = torch.zeros_like(valid).scatter(1, top.indices, top.values >= 0)
        tier = torch.where(reserved, _SCORE_LEVELS, tier)
    priority = tier * 2**_POSITION_BITS + older_first
    return torch.where(valid, priority, -1)


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` int64 in ``[0, 2^32)``, monotone in the float32 value: NaN at 0, ``-0.0`` equal to ``0.0``."""
    # Adding 0.0 turns -0.0 into 0.0, so the two compare equal as floats do.
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31
    return torch.where(torch.isnan(x), 0, ordered)


def _per_sequence(value: int | Sequence[int] | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """``[B]`` int64 on ``device``: one int for every sequence, one per sequence, or a tensor of them."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.int64)
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    return torch.as_tensor(list(value), dtype=torch.int64, device=device)


def compaction_plan(keep: torch.Tensor, fill: int) -> torch.Tensor:
    """``[B, S - fill]`` int64: the slot below ``fill`` each kept slot at or above it moves to, else ``-1``.

    The ``i``-th kept slot at or above ``fill`` (in slot order) goes to the
    ``i``-th slot below ``fill`` that is not kept. Ranks come from cumulative
    sums and one scatter, so the plan costs a few launches on ``[B, S]`` and no
    host synchronisation.
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


__all__ = ["compaction_plan", "select_slots"]
