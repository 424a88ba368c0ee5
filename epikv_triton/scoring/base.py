"""What every scorer sees and promises: the chunk records and the ``Scorer`` protocol.

A scorer sees one forward chunk at a time, in stream order:
``begin_chunk`` -> ``observe_hidden`` / ``observe_attention`` per layer ->
``finish_chunk``, which returns the new tokens' scores (higher = keep). Its
state is per sequence and independent of the context length.

A score reaches the slots in one of three ways: fixed once, when the token
arrives (``finish_chunk``); accumulated, each layer adding its share to every
slot (``h2o``); or re-evaluated over every slot in use at each chunk
(``rescores_slots``: a score that depends on the cache or on the newest
queries, as KeyDiff's, TOVA's and SnapKV's do).

Under tensor parallelism a scorer sees only its rank's KV heads. The store
averages every rank's slot scores before it selects (``ranks.py``), so a score
that is a plain mean over KV heads, or a sum of such means, needs nothing. A
scorer that transforms a mean over heads nonlinearly before the score is fixed
(``kv``'s rolling z-score) averages it over the ranks first, with
``self.ranks.mean``: one exchange of O(tokens) values per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .ranks import SINGLE_PROCESS, RankGroup

# Float32 elements per slice of a chunk-wide computation: bounds its temporaries (16 MiB each) whatever
# the chunk length. Scorers read it as ``base.TEMPORARY_SLICE_ELEMENTS`` at call time, so tests can shrink it.
TEMPORARY_SLICE_ELEMENTS = 2**22


@dataclass(frozen=True)
class ChunkInfo:
    """The new tokens of one forward chunk, ``[B, T]`` each.

    ``positions``: absolute positions, ``-1`` for padding. ``valid``: real
    token. ``has_predecessor``: the token and the one before it in the stream
    are both real, so a difference to the previous token exists.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    has_predecessor: torch.Tensor


@dataclass(frozen=True)
class AttentionView:
    """One layer's attention call, as the slot cache ran it.

    ``keys``/``values`` ``[B, Hkv, S, D]`` are every slot of the layer, in no
    particular order; ``pos`` ``[B, S]`` their positions; ``query_slots``
    ``[B, T]`` int64 the slots of the chunk's new tokens (see
    :func:`ops.slot_attention`); ``result`` what the attention call returned
    (deltas and lse only when asked for); ``slot_count [B]`` the slots in use
    when ``keys`` span the whole buffer (a compiled step), else ``None``.
    """

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    query_slots: torch.Tensor
    scale: float | None
    window: int | None
    result: ops.AttentionResult
    slot_count: torch.Tensor | None = None

    def new_tokens(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """``x`` (``keys`` or ``values``) at the slots of new tokens ``start:end``: ``[B, Hkv, end - start, D]``
        (a copy)."""
        return ops.slots.gather_slots(x, self.query_slots[:, start:end])


class Scorer:
    """Base of the scorers: the hooks default to "signal not needed"; ``finish_chunk`` is each method's own."""

    #: Decoder layers whose output (residual stream) the scorer reads.
    hidden_layers: tuple[int, ...] = ()
    #: Whether the attention kernel must emit key/value delta norms.
    wants_deltas = False
    #: Whether the attention call must return its lse (for probabilities).
    wants_probabilities = False
    #: Whether each chunk scores every slot in use afresh: the first layer's per-slot result replaces the stored
    #: scores and the later layers' add to them, so a slot's score is this chunk's, summed over layers.
    rescores_slots = False
    #: The tensor-parallel ranks the stream is split over; the store sets it (one process by default).
    ranks: RankGroup = SINGLE_PROCESS

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        self.chunk = chunk

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """``hidden [B, T, H]``: output of decoder layer ``layer`` for the chunk."""

    def observe_attention(self, layer: int, view: AttentionView) -> torch.Tensor | None:
        """Returns ``[B, S]`` float32, this layer's share of every slot's score (added to the stored scores, or
        replacing them at the chunk's first layer when ``rescores_slots``), or ``None``. A slot not in use
        (position ``-1``) may get any value: it is never kept."""
        return None

    def finish_chunk(self) -> torch.Tensor | None:
        """``[B, T]`` float32 scores of the new tokens, or ``None`` to keep the accumulated ones."""
        raise NotImplementedError


def fold_slot_scores(scorer: Scorer, stored: torch.Tensor, slot_scores: torch.Tensor, first_layer: bool) -> None:
    """One layer's ``slot_scores`` into the ``stored`` scores of the same slots, in place: a rescoring scorer's first
    layer of the chunk replaces them (every slot in use is scored afresh), every other layer adds its share."""
    if scorer.rescores_slots and first_layer:
        stored.copy_(slot_scores)
    else:
        stored += slot_scores
