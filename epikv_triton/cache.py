"""SlotCache: a bounded KV cache of preallocated slots, transformers-free.

One buffer holds every layer's keys and values, ``kv [2, L, B, Hkv, capacity, D]``,
so one :func:`ops.compact_slots_` call compacts all layers (as the
``[2L, B, Hkv, fill, D]`` view). Per slot: ``pos [B, capacity]`` int64 absolute
position (``-1`` = empty or padding) and ``scores [B, capacity]`` float32.
Slot order carries no meaning (visibility is by position): an eviction moves
the kept slots above the new fill into the freed ones below it. The ops are
told which slots hold the chunk being processed (``query_slots``); no layer
assumes where they are.

A forward pass is one *chunk* of ``T`` new tokens per sequence:
``begin_chunk(positions)`` -> per layer ``write`` then ``attend`` (and
``observe_hidden`` for residual-stream signals) -> ``end_chunk()``, which
fixes the new tokens' scores and evicts when the cache holds
``budget + evict_every`` tokens or more. New tokens are written in place at
``[fill, fill + T)``; nothing is concatenated.

Capacity is allocated once, at the first chunk: ``budget + evict_every``
slots, enough for decoding and for any chunk of at most ``evict_every``
tokens, or ``budget + C`` when the first chunk (``C`` tokens) is the first of
a prompt read in chunks (the declared prompt is longer than it: ``generate``
declares it, a ``new_cache`` loop passes ``prompt_length``), or
``budget + max(C, evict_every)`` when the caller names its chunk length
``C`` up front (``chunk_size``). A chunked read
(``generate(..., prefill_chunk_size=C)`` or a loop) then never holds more
than ``budget + max(C, evict_every)`` slots. Only a chunk longer than any
planned for grows the buffers, once, to exactly what it needs
(``budget + T``); growing copies, so the old and new buffers briefly coexist.
``full`` (no eviction) allocates the expected stream length when it is known
(``generate`` passes it) and otherwise grows geometrically.

Compiled steps. A chunk traced by ``torch.compile`` (a decode step, after an
eager first chunk) must trace to the same graph at every step, so it reads
nothing that changes per step from Python: the fill, stream length, peak fill
and eviction count live in the device tensor ``counters``. Such a chunk writes
its keys and values at the device fill (one ``index_put_`` on the whole buffer;
positions and scores by ``index_copy_``), attends over the whole
buffer with ``slot_count`` bounding the key tiles that cost anything, and
computes the eviction at every step, applying it only when it is due
(:meth:`_evict_compiled`). Eager chunks keep the host counters authoritative
and mirror them to the device after each chunk; after compiled steps the host
reads them back once (:meth:`sync_host`) before anything that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import ops
from ._static import static_address
from .config import EpiKVConfig
from .scoring import AttentionView, ChunkInfo, make_scorer


@dataclass(frozen=True)
class SequenceStats:
    """One sequence of the batch: real tokens only (padding is never counted).

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


class SlotCache:
    """Bounded KV cache with per-slot positions and scores; see the module docstring."""

    def __init__(
        self,
        config: EpiKVConfig,
        num_layers: int,
        prompt_lengths: Sequence[int] | None = None,
        expected_length: int | None = None,
        chunk_size: int | None = None,
    ):
        self.config = config
        self.num_layers = num_layers
        # Tokens per sequence the caller expects to stream (generate knows it): lets ``full``
        # allocate once instead of growing geometrically.
        self.expected_length = expected_length
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        # The longest chunk the caller will feed (a chunked read): room for it is allocated up front.
        self.chunk_size = chunk_size
        self.declared_prompt_lengths = None if prompt_lengths is None else [int(n) for n in prompt_lengths]
        self.reset()
        if self.declared_prompt_lengths is not None:
            self._check_prompt(expected_length)  # up front when the caller says how long the stream gets

    def reset(self) -> None:
        """Forget everything: the next chunk starts a new stream."""
        self.scorer = make_scorer(self.config, self.num_layers)
        self.kv: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.prev_kv: torch.Tensor | None = None  # [2, L, B, Hkv, D]: last key/value of the previous chunk
        self.fill = 0
        self.peak_fill = 0
        self.stream_length = 0  # tokens seen per sequence, padding included (the mask's width)
        self.seen: torch.Tensor | None = None  # [B] real tokens seen
        self.last_valid: torch.Tensor | None = None  # [B] last token seen was real
        self.tokens_evicted: torch.Tensor | None = None
        self.slots_moved: torch.Tensor | None = None  # [B] slots compaction moved, all evictions together
        self.eviction_passes = 0
        self.prompt_lengths = self.declared_prompt_lengths
        self.prompt_prefix: torch.Tensor | None = None  # prompt_lengths on the device, for eviction
        self.chunk: ChunkInfo | None = None
        self.start = 0
        self.query_slots: torch.Tensor | None = None  # [B, T] the chunk's slots, [start, start + T)
        # A compiled step (see "Compiled steps" in the module docstring) keeps its counters on the device.
        self.counters: torch.Tensor | None = None  # [4] int64: fill, stream_length, peak_fill, eviction_passes
        self.host_stale = False  # a compiled step ran since the host counters were last read back
        self.chunk_slots: torch.Tensor | None = None  # [T] the slots of a compiled step's chunk
        self.chunk_write_index: tuple[torch.Tensor, ...] | None = None  # see _begin_compiled_chunk
        self.slot_count: torch.Tensor | None = None  # [B] slots in use during a compiled step
        self.prompt_checked = False  # check_prompt_fits passed for this stream

    # ----------------------------------------------------------------- chunks
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
            seen = torch.zeros(batch, dtype=torch.int64, device=valid.device) if self.seen is None else self.seen
            positions = seen[:, None] + valid.long().cumsum(dim=1) - 1
        else:
            positions = position_ids.to(valid.device).long().expand(batch, num_tokens)
        return torch.where(valid, positions, -1)

    def begin_chunk(self, positions: torch.Tensor) -> None:
        """Open a chunk of ``positions [B, T]`` new tokens (``-1`` = padding); evicts first if they don't fit.

        Everything that can refuse the chunk is checked before any state changes.
        """
        if self.chunk is not None:
            # The previous forward raised (or was interrupted) midway: some layers wrote their keys and advanced
            # their scorer state, which cannot be rolled back.
            raise RuntimeError(
                "a forward over this EpiKV cache raised midway, leaving its keys and scores partly updated: "
                "build a new cache (epikv_triton.new_cache(model)) or call its reset(), and feed the stream again"
            )
        if torch.compiler.is_compiling():
            self._begin_compiled_chunk(positions)
            return
        self.sync_host()
        B, T = positions.shape
        if self.seen is None:
            self._fit_declared_prompts(B)
        elif B != self.seen.shape[0]:
            raise ValueError(f"this cache holds {self.seen.shape[0]} sequences; the chunk has {B}")
        # Compiled steps never check (it would guard on per-cache values): without a known bound the first
        # chunk checks for the whole stream.
        bound = self.stream_length + T
        self._check_prompt(None if self.expected_length is None else max(bound, self.expected_length), positions)
        if self.seen is None:
            self.seen, self.tokens_evicted, self.slots_moved = (
                static_address(torch.zeros(B, dtype=torch.int64, device=positions.device)) for _ in range(3)
            )
            self.last_valid = static_address(torch.zeros(B, dtype=torch.bool, device=positions.device))
        self.chunk = self._chunk_info(positions)
        if self.kv is not None:
            self._make_room(T)
            self._open_slots()
        self.start = self.fill
        # The ops and scorers are told where the chunk's tokens are, not left to assume it.
        self.query_slots = torch.arange(self.start, self.start + T, device=positions.device).expand(B, T)
        self.chunk_slots = self.slot_count = None
        self.scorer.begin_chunk(self.chunk)

    def _chunk_info(self, positions: torch.Tensor) -> ChunkInfo:
        valid = positions >= 0
        before = torch.cat([self.last_valid[:, None], valid[:, :-1]], dim=1)
        return ChunkInfo(positions, valid, valid & before)

    def _begin_compiled_chunk(self, positions: torch.Tensor) -> None:
        """A chunk traced by ``torch.compile``: every per-step quantity is read from device tensors,
        so the traced code is the same at every step (see "Compiled steps" in the module docstring)."""
        B, T = positions.shape
        self._check_compilable(B, T)
        self.chunk = self._chunk_info(positions)
        fill = self.counters[0]
        self.chunk_slots = fill + torch.arange(T, device=positions.device)
        self.query_slots = self.chunk_slots.expand(B, T)
        self.slot_count = (fill + T).expand(B)
        self.pos.index_copy_(1, self.chunk_slots, positions)
        self.scores.index_fill_(1, self.chunk_slots, 0.0)
        # The K/V write index of every layer but the layer itself, made once per chunk: it broadcasts to
        # [2 (K, V), B, Hkv, T, D].
        _, _, _, H, _, D = self.kv.shape
        device = positions.device
        self.chunk_write_index = (
            torch.arange(2, device=device)[:, None, None, None, None],
            torch.arange(B, device=device)[:, None, None, None],
            torch.arange(H, device=device)[:, None, None],
            self.chunk_slots[:, None],
            torch.arange(D, device=device),
        )
        self.scorer.begin_chunk(self.chunk)
        self.host_stale = True

    def _check_compilable(self, batch: int, num_tokens: int) -> None:
        """Trace-time checks of a compiled chunk (shapes and settings only, nothing on the device)."""
        config = self.config
        if not config.evicts:
            raise RuntimeError(
                "method='full' cannot run under torch.compile: its buffer grows with the stream. Compile the "
                "unpatched model with transformers' static cache for a full-cache baseline"
            )
        if self.kv is None or self.prompt_lengths is None:
            raise RuntimeError(
                "the first chunk (the prompt) of an EpiKV cache must run eagerly: it sizes the buffers and fixes "
                "the protected prompt. Run the prefill with the uncompiled model, then compile the decode step"
            )
        if batch != self.seen.shape[0]:
            raise ValueError(f"this cache holds {self.seen.shape[0]} sequences; the chunk has {batch}")
        # Between chunks the fill is below budget + evict_every, so this many new tokens always fit.
        room = self.kv.shape[4] - (config.budget + config.evict_every - 1)
        if num_tokens > room:
            raise ValueError(
                f"a compiled chunk holds at most {room} tokens with this cache (capacity {self.kv.shape[4]}, budget "
                f"{config.budget}, evict_every {config.evict_every}); got {num_tokens}. Run longer chunks eagerly, "
                f"or make the cache with chunk_size={num_tokens + config.evict_every - 1} or more"
            )

    def _check_prompt(self, stream_end: int | None, positions: torch.Tensor | None = None) -> None:
        """``keep_prompt=True`` keeps the whole prompt and the recent window once evictions start: refuse
        a prompt that leaves them no room, but only when the stream may outgrow the budget (``stream_end``
        tokens per sequence; ``None``: no bound known), so a budget that holds everything runs any prompt
        (``expected_length`` is then a promise: a chunk that passes the budget is checked, eagerly).
        Without a declared prompt, the first chunk (``positions``) is the prompt: one host read."""
        config = self.config
        if self.prompt_checked or not (config.keep_prompt and config.evicts):
            return
        if stream_end is not None and stream_end <= config.budget:
            return
        prompt_lengths = self.prompt_lengths
        if prompt_lengths is None:
            prompt_lengths = (positions >= 0).sum(dim=1).tolist()
        check_prompt_fits(config, prompt_lengths)
        self.prompt_checked = True

    def _fit_declared_prompts(self, batch: int) -> None:
        declared = self.declared_prompt_lengths
        if declared is None or len(declared) == batch:
            return
        if len(declared) != 1:
            raise ValueError(f"{len(declared)} prompt lengths were declared for a batch of {batch} sequences")
        self.prompt_lengths = declared * batch

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's ``key``/``value [B, Hkv, T, D]`` of ``layer``; return views of every slot in use."""
        if self.chunk is None:
            raise RuntimeError("write() outside a chunk: call begin_chunk() first")
        T = key.shape[2]
        if self.chunk_slots is not None:  # compiled: the whole buffer, the chunk's slots from the device fill
            self._write_compiled(layer, key, value)
            return self.kv[0, layer], self.kv[1, layer]
        if self.kv is None:
            self._allocate(key, self._capacity_for(T))
            self._open_slots()
        end = self.start + T
        self.kv[0, layer, :, :, self.start : end] = key
        self.kv[1, layer, :, :, self.start : end] = value
        return self.kv[0, layer, :, :, :end], self.kv[1, layer, :, :, :end]

    def _write_compiled(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """One ``index_put_`` on the whole buffer with every index explicit. An update through a view
        (``kv[0, layer].index_copy_``) is functionalized into a copy of the whole buffer per layer, which
        Inductor cannot make in place again; an indexed update of the base it can."""
        planes, batch, heads, slots, dims = self.chunk_write_index
        layer_index = torch.full((), layer, device=key.device)
        self.kv.index_put_((planes, layer_index, batch, heads, slots, dims), torch.stack([key, value]))

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        scale: float | None,
        window: int | None,
    ) -> torch.Tensor:
        """Attention of the chunk's ``query [B, Hq, T, D]`` over ``keys``/``values`` (as :meth:`write` returned).

        Visibility comes from the slot positions alone; returns ``[B, Hq, T, D]``.
        """
        pos = self.pos[:, : keys.shape[2]]
        # A compiled chunk is never the first (the first one runs eagerly), so it always has a predecessor.
        has_previous = self.chunk_slots is not None or self.stream_length > 0
        result = ops.slot_attention(
            query,
            keys,
            values,
            pos,
            query_slots=self.query_slots,
            scale=scale,
            window=window,
            prev_k=self.prev_kv[0, layer] if has_previous else None,
            prev_v=self.prev_kv[1, layer] if has_previous else None,
            with_deltas=self.scorer.wants_deltas,
            return_lse=self.scorer.wants_probabilities,
            slot_count=self.slot_count,
            check_positions=False,
        )
        view = AttentionView(query, keys, values, pos, self.query_slots, scale, window, result, self.slot_count)
        increment = self.scorer.observe_attention(layer, view)
        if increment is not None:
            self.scores[:, : keys.shape[2]] += increment
        return result.out

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Output ``[B, T, H]`` of decoder layer ``layer`` for the chunk (residual stream)."""
        self.scorer.observe_hidden(layer, hidden)

    def end_chunk(self) -> None:
        """Fix the new tokens' scores, advance the stream, evict if the cache is over its cadence."""
        if self.chunk_slots is not None:
            self._end_compiled_chunk()
            return
        chunk = self.chunk
        T = chunk.positions.shape[1]
        end = self.start + T
        new_scores = self.scorer.finish_chunk()
        if new_scores is not None:
            self.scores[:, self.start : end] = torch.where(chunk.valid, new_scores, float("nan"))
        self.prev_kv.copy_(self.kv[:, :, :, :, end - 1])
        self.last_valid.copy_(chunk.valid[:, -1])
        self.seen += chunk.valid.sum(dim=1)
        self.stream_length += T
        self.fill = end
        self.peak_fill = max(self.peak_fill, end)
        self.chunk = None
        if self.prompt_lengths is None:
            # Without a declared prompt, the first chunk is the prompt (generate's prefill).
            self.prompt_lengths = self.seen.tolist()
        if self.config.keep_prompt:
            self._prompt_prefix(self.seen.device)  # made here, so a compiled step finds it
        if self.config.evicts and self.fill >= self.config.budget + self.config.evict_every:
            self.evict()
        else:
            self._publish_counters()

    def _end_compiled_chunk(self) -> None:
        """:meth:`end_chunk` of a compiled chunk: the same state changes, as device tensor updates; the
        eviction is computed at every step and applied only when it is due (no branch on device data)."""
        chunk, slots = self.chunk, self.chunk_slots
        new_scores = self.scorer.finish_chunk()
        if new_scores is not None:
            self.scores.index_copy_(1, slots, torch.where(chunk.valid, new_scores, float("nan")))
        self.prev_kv.copy_(self.kv.index_select(4, slots[-1:]).squeeze(4))
        self.last_valid.copy_(chunk.valid[:, -1])
        self.seen += chunk.valid.sum(dim=1)
        used = slots[-1] + 1
        config = self.config
        due = used >= config.budget + config.evict_every
        evicted, moved = self._evict_compiled(due)
        self.tokens_evicted += evicted
        self.slots_moved += moved
        _, stream_length, peak_fill, passes = self.counters.unbind()
        self.counters.copy_(
            torch.stack([
                torch.where(due, config.budget, used), stream_length + chunk.positions.shape[1],
                torch.maximum(peak_fill, used), passes + due.long(),
            ])
        )
        self.chunk = self.chunk_slots = self.slot_count = self.chunk_write_index = None

    # --------------------------------------------------------------- eviction
    def evict(self) -> None:
        """Keep ``budget`` slots per sequence (protected first, then highest scores), compacted in place.

        Only the kept slots at or above the new fill move, into the freed slots
        below it: an eviction moves at most as many slots as it releases.
        """
        self.sync_host()
        used = self.fill
        fill = min(self.config.budget, used)
        keep, real_before, destination = self._plan(used, fill)
        self._compact(used, destination)
        self.tokens_evicted += real_before - keep.sum(dim=1)
        self.slots_moved += (destination >= 0).sum(dim=1)
        self.fill = fill
        self.eviction_passes += 1
        self._publish_counters()

    def _evict_compiled(self, due: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The eviction of a compiled step over the whole buffer, in effect only where ``due`` (a device
        bool): otherwise no slot moves and the tail's metadata is put back. Empty slots hold position -1,
        so selecting over the whole buffer keeps exactly what :meth:`evict` keeps over the slots in use.
        Returns ``[B]`` tokens evicted and slots moved."""
        capacity, budget = self.kv.shape[4], self.config.budget
        keep, real_before, destination = self._plan(capacity, budget)
        destination = torch.where(due, destination, -1)
        tail_pos, tail_scores = self.pos[:, budget:].clone(), self.scores[:, budget:].clone()
        self._compact(capacity, destination)
        self.pos[:, budget:] = torch.where(due, self.pos[:, budget:], tail_pos)
        self.scores[:, budget:] = torch.where(due, self.scores[:, budget:], tail_scores)
        evicted = torch.where(due, real_before - keep.sum(dim=1), 0)
        return evicted, (destination >= 0).sum(dim=1)

    def _plan(self, used: int, fill: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept slots ``[B, used]``, real tokens before ``[B]`` and the compaction plan ``[B, used - fill]``."""
        config = self.config
        pos, scores = self.pos[:, :used], self.scores[:, :used]
        protect = self._prompt_prefix(pos.device) if config.keep_prompt else config.sink
        keep = ops.select_slots(scores, pos, config.budget, protect_prefix=protect, recent=config.recent)
        return keep, (pos >= 0).sum(dim=1), ops.compaction_plan(keep, fill)

    def _compact(self, used: int, destination: torch.Tensor) -> None:
        _, L, B, H, capacity, D = self.kv.shape
        planes = self.kv.view(2 * L, B, H, capacity, D)[:, :, :, :used]
        ops.compact_slots_(planes, self.pos[:, :used], self.scores[:, :used], destination)

    # ------------------------------------------------------------ counters
    def _publish_counters(self) -> None:
        """Mirror the host counters on the device for a compiled step that may follow (a small
        host-to-device copy; nothing waits for the device)."""
        values = torch.tensor([self.fill, self.stream_length, self.peak_fill, self.eviction_passes])
        if self.counters is None:
            self.counters = static_address(values.to(self.seen.device))
        else:
            self.counters.copy_(values, non_blocking=True)

    def sync_host(self) -> None:
        """Read back the counters compiled steps advanced on the device (one sync); a no-op otherwise."""
        if self.host_stale:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "the EpiKV cache's host counters (fill, tokens seen) cannot be read inside a compiled step: "
                    "read them, or the cache's stats, between steps"
                )
            self.fill, self.stream_length, self.peak_fill, self.eviction_passes = self.counters.tolist()
            self.host_stale = False

    def _prompt_prefix(self, device: torch.device) -> torch.Tensor:
        """The prompt lengths as a device tensor, made once per stream: no host-to-device copy per
        eviction. ``_check_prompt`` vetted them against the budget before the stream could outgrow it."""
        if self.prompt_prefix is None:
            self.prompt_prefix = torch.tensor(self.prompt_lengths, dtype=torch.int64, device=device)
        return self.prompt_prefix

    def _capacity_for(self, num_tokens: int) -> int:
        needed = self.fill + num_tokens
        if self.config.evicts:
            room = max(self.config.evict_every, self.chunk_size or 0)
            if self.kv is None and self._prompt_continues():
                room = max(room, num_tokens)  # every later chunk of the read fits beside the budget
            return max(self.config.budget + room, needed)
        if self.expected_length is not None and self.expected_length >= needed:
            return self.expected_length
        return max(2 * needed, 64)

    def _prompt_continues(self) -> bool:
        """The declared prompt of some sequence is longer than its real tokens in the first chunk:
        the prompt is being read in chunks. One host read, at the first allocation only."""
        if self.prompt_lengths is None:
            return False  # undeclared: the first chunk is the prompt
        in_chunk = self.chunk.valid.sum(dim=1).tolist()
        return any(declared > read for declared, read in zip(self.prompt_lengths, in_chunk))

    def _make_room(self, num_tokens: int) -> None:
        capacity = self.kv.shape[4]
        if self.fill + num_tokens <= capacity:
            return
        if self.config.evicts and self.fill > self.config.budget:
            self.evict()
        if self.fill + num_tokens > capacity:
            self._grow(self._capacity_for(num_tokens))

    def _allocate(self, like: torch.Tensor, capacity: int) -> None:
        B, H, _, D = like.shape
        self.kv = static_address(
            torch.zeros(2, self.num_layers, B, H, capacity, D, dtype=like.dtype, device=like.device)
        )
        self.pos = static_address(torch.full((B, capacity), -1, dtype=torch.int64, device=like.device))
        self.scores = static_address(torch.full((B, capacity), float("nan"), dtype=torch.float32, device=like.device))
        self.prev_kv = static_address(torch.zeros(2, self.num_layers, B, H, D, dtype=like.dtype, device=like.device))

    def _grow(self, capacity: int) -> None:
        kv, pos, scores, prev_kv, used = self.kv, self.pos, self.scores, self.prev_kv, self.fill
        self._allocate(kv[0, 0], capacity)
        self.kv[:, :, :, :, :used] = kv[:, :, :, :, :used]
        self.pos[:, :used] = pos[:, :used]
        self.scores[:, :used] = scores[:, :used]
        self.prev_kv = prev_kv

    def _open_slots(self) -> None:
        """Positions of the chunk's slots; their scores start at 0 (h2o accumulates into them)."""
        T = self.chunk.positions.shape[1]
        self.pos[:, self.fill : self.fill + T] = self.chunk.positions
        self.scores[:, self.fill : self.fill + T] = 0.0

    # ------------------------------------------------------------ inspection
    def kept_positions(self) -> list[list[int]]:
        """Sorted positions of the tokens each sequence holds."""
        self.sync_host()
        if self.pos is None:
            return [[] for _ in range(0 if self.seen is None else self.seen.shape[0])]
        return [sorted(p for p in row if p >= 0) for row in self.pos[:, : self.fill].tolist()]

    def stats(self) -> CacheStats:
        self.sync_host()
        if self.kv is None:
            return CacheStats([], 0, 0, 0, 0, 0)
        _, L, B, H, capacity, D = self.kv.shape
        bytes_per_token = 2 * L * H * D * self.kv.element_size()
        kept = (self.pos[:, : self.fill] >= 0).sum(dim=1).tolist()
        sequences = [
            SequenceStats(int(seen), int(k), int(evicted), int(k) * bytes_per_token, int(moved))
            for seen, k, evicted, moved in zip(
                self.seen.tolist(), kept, self.tokens_evicted.tolist(), self.slots_moved.tolist()
            )
        ]
        allocated = self.kv.numel() * self.kv.element_size() + self.pos.numel() * 8 + self.scores.numel() * 4
        return CacheStats(sequences, self.fill, self.peak_fill, capacity, allocated, self.eviction_passes)


def check_prompt_fits(config: EpiKVConfig, prompt_lengths: Sequence[int]) -> None:
    """``keep_prompt=True`` keeps every prompt token and the recent window: both must fit the budget."""
    longest = max(prompt_lengths, default=0)
    if longest + config.recent > config.budget:
        raise ValueError(
            f"keep_prompt=True keeps the whole prompt, but the longest prompt ({longest} tokens) plus the recent "
            f"window ({config.recent}) exceeds the budget ({config.budget}): raise the budget, or pass "
            "keep_prompt=False (keeps only the first sink tokens) to read a long prompt with bounded memory"
        )
