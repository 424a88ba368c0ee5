"""What a slot store reports about itself: plain records, real tokens only (padding is never counted)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceStats:
    """One sequence of the batch.

    ``slots_moved``: slots the evictions moved to fill the holes they left (each
    one ``2 · layers · kv_heads · head_dim`` elements); at most the slots each
    eviction released.
    """

    tokens_seen: int
    tokens_kept: int
    tokens_evicted: int
    kv_bytes: int
    slots_moved: int


@dataclass(frozen=True)
class CacheStats:
    """``sequences``: per sequence; the rest is the physical buffer shared by the batch.

    ``collective_bytes``: score bytes this rank received from the other tensor-parallel ranks (0 on one
    process): ``(ranks − 1) · B · slots · 4`` per eviction over ``slots`` slots in use, plus, for ``kv``,
    ``(ranks − 1) · B · 2 · T · 4`` per chunk of ``T`` tokens. An eviction moves ``slots_moved`` slots of
    ``2 · layers · kv_heads · head_dim`` elements each (the rank's own KV heads).
    """

    sequences: list[SequenceStats]
    slots_used: int
    peak_slots_used: int
    capacity: int
    allocated_bytes: int
    eviction_passes: int
    collective_bytes: int = 0
