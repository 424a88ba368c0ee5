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
    """``sequences``: per sequence; the rest is the physical buffer shared by the batch."""

    sequences: list[SequenceStats]
    slots_used: int
    peak_slots_used: int
    capacity: int
    allocated_bytes: int
    eviction_passes: int
