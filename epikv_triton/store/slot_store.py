"""SlotStore: a bounded KV cache of preallocated slots, transformers-free.

It composes the parts, one job each: :class:`~.buffers.SlotBuffers` (the
tensors), :class:`~.counters.StreamCounters` and
:class:`~.counters.SequenceCounters` (how far the stream got),
:class:`~.policy.RetentionPolicy` (prompt protection, capacity, when and what to
evict), a scorer (the method, :mod:`epikv_triton.scoring`), and the chunk in
progress (:mod:`.chunks`, eager or compiled).

A forward pass is one chunk: :meth:`SlotStore.begin_chunk` -> per layer
:meth:`~SlotStore.write` then :meth:`~SlotStore.attend` (and
:meth:`~SlotStore.observe_hidden` for residual-stream signals) ->
:meth:`~SlotStore.end_chunk`. A chunk that runs while ``torch.compile`` traces
is a :class:`~.chunks.CompiledChunk`, any other an
:class:`~.chunks.EagerChunk`. The ``fill`` is the number of slots in use
between chunks; a chunk of ``T`` tokens occupies ``[fill, fill + T)``, and an
eviction brings the fill back to ``budget``.

Under tensor parallelism each rank runs its own store over its own KV heads;
the stores agree on what to keep because every eviction selects from the
scores averaged over the ranks (:class:`~epikv_triton.scoring.RankGroup`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..config import EpiKVConfig
from ..scoring import RankGroup, make_scorer
from .buffers import SlotBuffers
from .chunks import Chunk, CompiledChunk, EagerChunk
from .counters import SequenceCounters, StreamCounters
from .policy import RetentionPolicy
from .stats import CacheStats, SequenceStats


class SlotStore:
    """Bounded KV cache with per-slot positions and scores; see the module docstring.

    ``prompt_lengths``, ``expected_length`` and ``chunk_size`` are what the caller
    knows of the stream (see :class:`~.policy.RetentionPolicy`).
    ``tensor_parallel_group``: the process group of the tensor-parallel ranks that
    share this stream, each with a store over its own KV heads; ``None`` for one
    process.
    """

    def __init__(
        self,
        config: EpiKVConfig,
        num_layers: int,
        prompt_lengths: Sequence[int] | None = None,
        expected_length: int | None = None,
        chunk_size: int | None = None,
        tensor_parallel_group: dist.ProcessGroup | None = None,
    ):
        self.config = config
        self.num_layers = num_layers
        self.tensor_parallel_group = tensor_parallel_group
        self.policy = RetentionPolicy(config, prompt_lengths, expected_length, chunk_size)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next chunk starts a new stream."""
        self.ranks = RankGroup(self.tensor_parallel_group)
        self.scorer = make_scorer(self.config, self.num_layers)
        self.scorer.ranks = self.ranks
        self.buffers = SlotBuffers(self.num_layers)
        self.counters = StreamCounters()
        self.sequences: SequenceCounters | None = None
        self.policy.reset()
        self.chunk: Chunk | None = None

    # ----------------------------------------------------------------- chunks
    @property
    def chunk_open(self) -> bool:
        return self.chunk is not None

    def next_positions(
        self,
        batch: int,
        num_tokens: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """``[B, T]`` positions of the next chunk, ``-1`` for padding.

        ``attention_mask`` (2D, ``0`` = padding) may cover the whole stream or
        just the new tokens; its last ``T`` columns are used. ``position_ids``
        win when given; otherwise a real token's position is the number of real
        tokens before it in its sequence (what ``generate`` computes).
        """
        if attention_mask is None:
            valid = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape[-1] < num_tokens:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} columns but the chunk has {num_tokens} tokens"
                )
            valid = attention_mask[:, -num_tokens:].bool()
        if position_ids is None:
            seen = self.sequences.seen if self.sequences is not None else torch.zeros(
                batch, dtype=torch.int64, device=valid.device
            )
            positions = seen[:, None] + valid.long().cumsum(dim=1) - 1
        else:
            positions = position_ids.to(valid.device).long().expand(batch, num_tokens)
        return torch.where(valid, positions, -1)

    def begin_chunk(self, positions: torch.Tensor) -> None:
        """Open a chunk of ``positions [B, T]`` new tokens (``-1`` = padding); evicts first if they don't fit."""
        if self.chunk is not None:
            # The previous forward raised (or was interrupted) midway: some layers wrote their keys and advanced
            # their scorer state, which cannot be rolled back.
            raise RuntimeError(
                "a forward over this EpiKV cache raised midway, leaving its keys and scores partly updated: "
                "build a new cache (epikv_triton.new_cache(model)) or call its reset(), and feed the stream again"
            )
        kind = CompiledChunk if torch.compiler.is_compiling() else EagerChunk
        self.chunk = kind(self, positions)
        self.scorer.begin_chunk(self.chunk.tokens)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's ``key``/``value [B, Hkv, T, D]`` of ``layer``; return the keys and values attention
        reads: views of the slots in use (eager) or of the whole buffer (compiled)."""
        if self.chunk is None:
            raise RuntimeError("write() outside a chunk: call begin_chunk() first")
        return self.chunk.write(layer, key, value)

    def attend(
        self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float | None,
        window: int | None,
    ) -> torch.Tensor:
        """Attention of the chunk's ``query [B, Hq, T, D]`` over ``keys``/``values`` (as :meth:`write` returned).

        Visibility comes from the slot positions alone; returns ``[B, Hq, T, D]``.
        """
        return self.chunk.attend(layer, query, keys, values, scale=scale, window=window)

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Output ``[B, T, H]`` of decoder layer ``layer`` for the chunk (residual stream)."""
        self.scorer.observe_hidden(layer, hidden)

    def end_chunk(self) -> None:
        """Fix the new tokens' scores, advance the stream, evict if the cache is over its cadence."""
        self.chunk.end()
        self.chunk = None

    # ------------------------------------------------- what the chunks call
    def start_sequences(self, batch: int, device: torch.device) -> None:
        """The per-sequence counters, made by the stream's first chunk."""
        if self.sequences is None:
            self.sequences = SequenceCounters(batch, device)

    def make_room(self, num_tokens: int) -> None:
        """Before an eager chunk of ``num_tokens``: evict, then grow, until the chunk fits after the fill."""
        fill, capacity = self.counters.fill, self.buffers.capacity
        if fill + num_tokens <= capacity:
            return
        if self.config.evicts and fill > self.config.budget:
            self.evict()
            fill = self.counters.fill
        if fill + num_tokens > capacity:
            self.buffers.grow(self.policy.capacity_for(fill, num_tokens), fill)

    def evict(self) -> None:
        """Keep ``budget`` slots per sequence (protected first, then highest scores), compacted in place.

        Only the kept slots at or above the new fill move, into the freed slots
        below it: an eviction moves at most as many slots as it releases.
        """
        used = self.counters.fill
        fill = min(self.config.budget, used)
        buffers = self.buffers
        keep, real_before, destination = self.plan_eviction(used, fill)
        buffers.compact(used, destination)
        self.sequences.count_eviction(real_before - keep.sum(dim=1), (destination >= 0).sum(dim=1))
        self.counters.evicted(fill)
        self.counters.publish(self.sequences.seen.device)

    def plan_eviction(self, used: int, fill_after: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's plan (:meth:`~.policy.RetentionPolicy.plan`) over the first ``used`` slots, from the
        scores averaged over the tensor-parallel ranks: every rank selects from the same bits, so every rank
        keeps the same tokens. The stored scores stay the rank's own (a mean is linear, so accumulating them
        stays correct). With a value reserve, each slot's largest value norm is read from the buffer (one pass
        over every layer's values) and its maximum over the ranks taken, exact on every rank."""
        buffers = self.buffers
        largest_values = None
        if self.config.value_reserve:
            largest_values = self.ranks.max(buffers.largest_value_norms(used))
        return self.policy.plan(
            buffers.pos[:, :used], self.ranks.mean(buffers.scores[:, :used]), fill_after, largest_values
        )

    # ------------------------------------------------------------ inspection
    @property
    def fill(self) -> int:
        """Slots in use (one device read after compiled steps)."""
        return self.counters.fill

    @property
    def stream_length(self) -> int:
        """Tokens per sequence so far, padding included (one device read after compiled steps)."""
        return self.counters.stream_length

    def kept_positions(self) -> list[list[int]]:
        """Sorted positions of the tokens each sequence holds."""
        if not self.buffers.allocated:
            return [[] for _ in range(0 if self.sequences is None else self.sequences.batch)]
        return self.buffers.kept_positions(self.counters.fill)

    def stats(self) -> CacheStats:
        if not self.buffers.allocated:
            return CacheStats([], 0, 0, 0, 0, 0, self.ranks.bytes_received)
        buffers, counters, sequences = self.buffers, self.counters, self.sequences
        fill, per_token = counters.fill, buffers.bytes_per_token
        rows = [
            SequenceStats(int(seen), int(kept), int(evicted), int(kept) * per_token, int(moved))
            for seen, kept, evicted, moved in zip(
                sequences.seen.tolist(), buffers.kept_counts(fill), sequences.tokens_evicted.tolist(),
                sequences.slots_moved.tolist(),
            )
        ]
        return CacheStats(rows, fill, counters.peak_fill, buffers.capacity, buffers.allocated_bytes,
                          counters.eviction_passes, self.ranks.bytes_received)
