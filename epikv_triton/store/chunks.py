"""A chunk: one forward pass of ``T`` new tokens per sequence through a slot store.

Both kinds have one life: made at the start of the forward (every check that
can refuse the chunk runs before any state changes), then per layer
:meth:`~Chunk.write` and :meth:`~Chunk.attend`, then :meth:`~Chunk.end`, which
fixes the new tokens' scores, advances the counters and evicts when the cadence
says so. The ops are told which slots hold the chunk (``query_slots``); no
layer assumes where they are.

* :class:`EagerChunk`: host counters are authoritative. The new tokens go to
  slots ``[fill, fill + T)`` (evicting or growing first when they do not fit);
  attention sees the slots in use.
* :class:`CompiledChunk`: traced by ``torch.compile``, so it must trace to the
  same graph at every step and reads nothing that changes per step from Python.
  The new tokens go to the device fill (one ``index_put_`` on the whole buffer
  for K/V, ``index_copy_`` for the metadata); attention sees the whole buffer
  with ``slot_count = fill + T`` (the kernels skip key tiles past it); the
  eviction is computed every step and applied where it is due.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import ops
from ..scoring import AttentionView, ChunkInfo, fold_slot_scores

if TYPE_CHECKING:
    from .slot_store import SlotStore


class Chunk:
    """What both kinds share: the chunk's tokens, attention over the slots, and the end-of-chunk bookkeeping."""

    #: ``[B]`` slots in use while the chunk runs, when attention spans the whole buffer; ``None`` otherwise.
    slot_count: torch.Tensor | None = None

    def __init__(self, store: SlotStore, positions: torch.Tensor, query_slots: torch.Tensor, has_previous: bool):
        valid = positions >= 0
        before = torch.cat([store.sequences.last_valid[:, None], valid[:, :-1]], dim=1)
        self.store = store
        self.tokens = ChunkInfo(positions, valid, valid & before)
        self.query_slots = query_slots  # [B, T] the slots of the new tokens
        self.has_previous = has_previous  # a token came before this chunk: its K/V start the delta norms
        self.rescored = False  # a layer has scored the slots in this chunk (a rescoring scorer's first replaces)

    @property
    def num_tokens(self) -> int:
        return self.tokens.positions.shape[1]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's ``key``/``value [B, Hkv, T, D]`` of ``layer``; return the keys and values attention
        reads."""
        raise NotImplementedError

    def attend(
        self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float | None,
        window: int | None,
    ) -> torch.Tensor:
        """Attention of ``query [B, Hq, T, D]`` over ``keys``/``values`` (what :meth:`write` returned); the
        scorer sees the result. Returns ``[B, Hq, T, D]``."""
        store = self.store
        buffers, scorer = store.buffers, store.scorer
        pos = buffers.pos[:, : keys.shape[2]]
        previous = buffers.previous_kv[:, layer] if self.has_previous else (None, None)
        result = ops.slot_attention(
            query, keys, values, pos, query_slots=self.query_slots, scale=scale, window=window,
            prev_k=previous[0], prev_v=previous[1], with_deltas=scorer.wants_deltas,
            return_lse=scorer.wants_probabilities, slot_count=self.slot_count, check_positions=False,
        )
        view = AttentionView(query, keys, values, pos, self.query_slots, scale, window, result, self.slot_count)
        slot_scores = scorer.observe_attention(layer, view)
        if slot_scores is not None:
            fold_slot_scores(scorer, buffers.scores[:, : keys.shape[2]], slot_scores, first_layer=not self.rescored)
            self.rescored = True
        return result.out

    def end(self) -> None:
        """Fix the new tokens' scores, advance the counters, evict when due."""
        raise NotImplementedError

    def _store_tokens(self) -> None:
        """The bookkeeping both kinds end with: the new tokens' scores (NaN for padding, which is never kept),
        the last token's K/V for the next chunk's delta norms, the per-sequence counts."""
        store = self.store
        new_scores = store.scorer.finish_chunk()
        if new_scores is not None:
            self._put_scores(torch.where(self.tokens.valid, new_scores, float("nan")))
        store.buffers.previous_kv.copy_(self._last_kv())
        store.sequences.count_tokens(self.tokens.valid)

    def _put_scores(self, scores: torch.Tensor) -> None:
        raise NotImplementedError

    def _last_kv(self) -> torch.Tensor:
        """``[2, L, B, Hkv, D]``: the K/V of the chunk's last token."""
        raise NotImplementedError


class EagerChunk(Chunk):
    """Host counters authoritative; the new tokens in slots ``[start, start + T)``, ``start`` the fill."""

    def __init__(self, store: SlotStore, positions: torch.Tensor):
        B, T = positions.shape
        counters, policy = store.counters, store.policy
        if store.sequences is None:
            policy.fit_declared_prompts(B)
        elif B != store.sequences.batch:
            raise ValueError(f"this cache holds {store.sequences.batch} sequences; the chunk has {B}")
        # Compiled chunks never check (that would guard on per-cache values): without a known bound the first
        # chunk checks for the whole stream.
        bound = counters.stream_length + T
        expected = policy.expected_length
        policy.check_prompt(None if expected is None else max(bound, expected), positions)
        store.start_sequences(B, positions.device)
        has_previous = counters.stream_length > 0
        if store.buffers.allocated:
            store.make_room(T)
        self.start = counters.fill
        super().__init__(
            store, positions, torch.arange(self.start, self.start + T, device=positions.device).expand(B, T),
            has_previous,
        )
        if store.buffers.allocated:
            self._open_slots()

    def _open_slots(self) -> None:
        """Positions of the chunk's slots; their scores start at 0 (``h2o`` accumulates into them)."""
        buffers, end = self.store.buffers, self.start + self.num_tokens
        buffers.pos[:, self.start : end] = self.tokens.positions
        buffers.scores[:, self.start : end] = 0.0

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store = self.store
        buffers = store.buffers
        if not buffers.allocated:
            buffers.allocate(key, store.policy.capacity_for(0, self.num_tokens, first_chunk=self.tokens.valid))
            self._open_slots()
        end = self.start + self.num_tokens
        buffers.kv[0, layer, :, :, self.start : end] = key
        buffers.kv[1, layer, :, :, self.start : end] = value
        return buffers.kv[0, layer, :, :, :end], buffers.kv[1, layer, :, :, :end]

    def end(self) -> None:
        store = self.store
        self._store_tokens()
        end = self.start + self.num_tokens
        store.counters.advance(end, self.num_tokens)
        store.policy.record_prompt(store.sequences.seen)
        if store.policy.eviction_due(end):
            store.evict()
        else:
            store.counters.publish(store.sequences.seen.device)

    def _put_scores(self, scores: torch.Tensor) -> None:
        self.store.buffers.scores[:, self.start : self.start + self.num_tokens] = scores

    def _last_kv(self) -> torch.Tensor:
        return self.store.buffers.kv[:, :, :, :, self.start + self.num_tokens - 1]


class CompiledChunk(Chunk):
    """Traced by ``torch.compile``: the chunk's slots come from the device fill (see the module docstring)."""

    def __init__(self, store: SlotStore, positions: torch.Tensor):
        B, T = positions.shape
        _check_compilable(store, B, T)
        fill = store.counters.begin_on_device()
        self.slots = fill + torch.arange(T, device=positions.device)  # [T]
        # A compiled chunk is never the first (the first one runs eagerly), so it always has a predecessor.
        super().__init__(store, positions, self.slots.expand(B, T), has_previous=True)
        self.slot_count = (fill + T).expand(B)
        buffers = store.buffers
        buffers.pos.index_copy_(1, self.slots, positions)
        buffers.scores.index_fill_(1, self.slots, 0.0)
        # The K/V write index of every layer but the layer itself, made once per chunk: it broadcasts to
        # [2 (K, V), B, Hkv, T, D].
        _, _, _, H, _, D = buffers.kv.shape
        device = positions.device
        self.write_index = (
            torch.arange(2, device=device)[:, None, None, None, None],
            torch.arange(B, device=device)[:, None, None, None],
            torch.arange(H, device=device)[:, None, None],
            self.slots[:, None],
            torch.arange(D, device=device),
        )

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``index_put_`` on the whole buffer with every index explicit. An update through a view
        (``kv[0, layer].index_copy_``) is functionalized into a copy of the whole buffer per layer, which
        Inductor cannot make in place again; an indexed update of the base it can."""
        kv = self.store.buffers.kv
        planes, batch, heads, slots, dims = self.write_index
        layer_index = torch.full((), layer, device=key.device)
        kv.index_put_((planes, layer_index, batch, heads, slots, dims), torch.stack([key, value]))
        return kv[0, layer], kv[1, layer]

    def end(self) -> None:
        """The eager end as device tensor updates: the eviction is computed at every step and applied only
        where it is due (no branch on device data)."""
        store = self.store
        self._store_tokens()
        end = self.slots[-1] + 1
        budget = store.config.budget
        due = end >= budget + store.config.evict_every
        evicted, moved = self._evict_where_due(due)
        store.sequences.count_eviction(evicted, moved)
        store.counters.advance_on_device(end, self.num_tokens, due, budget)

    def _evict_where_due(self, due: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The eviction over the whole buffer, in effect only where ``due`` (a device bool): otherwise no slot
        moves and the tail's metadata is put back. Empty slots hold position -1, so selecting over the whole
        buffer keeps exactly what the eager eviction keeps over the slots in use. Returns ``[B]`` tokens
        evicted and slots moved."""
        buffers, budget = self.store.buffers, self.store.config.budget
        capacity = buffers.capacity
        keep, real_before, destination = self.store.plan_eviction(capacity, budget)
        destination = torch.where(due, destination, -1)
        tail_pos, tail_scores = buffers.pos[:, budget:].clone(), buffers.scores[:, budget:].clone()
        buffers.compact(capacity, destination)
        buffers.pos[:, budget:] = torch.where(due, buffers.pos[:, budget:], tail_pos)
        buffers.scores[:, budget:] = torch.where(due, buffers.scores[:, budget:], tail_scores)
        evicted = torch.where(due, real_before - keep.sum(dim=1), 0)
        return evicted, (destination >= 0).sum(dim=1)

    def _put_scores(self, scores: torch.Tensor) -> None:
        self.store.buffers.scores.index_copy_(1, self.slots, scores)

    def _last_kv(self) -> torch.Tensor:
        return self.store.buffers.kv.index_select(4, self.slots[-1:]).squeeze(4)


def _check_compilable(store: SlotStore, batch: int, num_tokens: int) -> None:
    """Trace-time checks of a compiled chunk (shapes and settings only, nothing on the device)."""
    config = store.config
    if not config.evicts:
        raise RuntimeError(
            "method='full' cannot run under torch.compile: its buffer grows with the stream. Compile the "
            "unpatched model with transformers' static cache for a full-cache baseline"
        )
    if not store.buffers.allocated or store.policy.prompt_lengths is None:
        raise RuntimeError(
            "the first chunk (the prompt) of an EpiKV cache must run eagerly: it sizes the buffers and fixes "
            "the protected prompt. Run the prefill with the uncompiled model, then compile the decode step"
        )
    if store.ranks.size > 1:
        raise NotImplementedError(
            "a compiled step cannot yet run an EpiKV cache split over tensor-parallel ranks: each eviction gathers "
            "the ranks' scores with a collective the compiled step does not capture. Decode eagerly (generate "
            "without compile_config)"
        )
    if batch != store.sequences.batch:
        raise ValueError(f"this cache holds {store.sequences.batch} sequences; the chunk has {batch}")
    # Between chunks the fill is below budget + evict_every, so this many new tokens always fit.
    capacity = store.buffers.capacity
    room = capacity - (config.budget + config.evict_every - 1)
    if num_tokens > room:
        raise ValueError(
            f"a compiled chunk holds at most {room} tokens with this cache (capacity {capacity}, budget "
            f"{config.budget}, evict_every {config.evict_every}); got {num_tokens}. Run longer chunks eagerly, "
            f"or make the cache with chunk_size={num_tokens + config.evict_every - 1} or more"
        )
