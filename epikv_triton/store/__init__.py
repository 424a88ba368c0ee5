"""The slot store: a bounded KV cache of preallocated slots, transformers-free (see :mod:`.slot_store`)."""

from .policy import check_prompt_fits
from .slot_store import SlotStore
from .stats import CacheStats, SequenceStats

__all__ = ["CacheStats", "SequenceStats", "SlotStore", "check_prompt_fits"]
