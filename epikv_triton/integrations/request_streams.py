"""One request of a continuous-batching engine, as eviction sees it: transformers-free.

The engine keeps the request's keys and values in its own pages; what it does
not keep is what eviction needs: each cached token's position and score, the
scorer's per-sequence state and the retention policy. A
:class:`RequestStream` holds exactly those, for one request (a batch of one,
like ``generate`` on that prompt alone), and decides with the same pieces a
:class:`~epikv_triton.store.SlotStore` uses (:func:`~epikv_triton.scoring.make_scorer`,
:class:`~epikv_triton.store.policy.RetentionPolicy`), so the same tokens are
kept at the same steps. Slot ``i`` is the request's ``i``-th cached token in
the order of its pages.

A chunk's tokens take their slots when it opens, scored 0, as in the store's
chunks. A method that scores from what arrives (the residual stream, the new
keys) fixes their scores when it closes; one that reads the cache
(:func:`reads_cache`: attention probabilities, every held key)
is shown, per layer, the request's queries and every slot it holds
(:meth:`RequestStream.observe_cache`), and its slot scores are folded in as the
store folds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..config import EpiKVConfig
from ..scoring import AttentionView, ChunkInfo, Scorer, fold_slot_scores, make_scorer
from ..store.policy import RetentionPolicy


@dataclass(frozen=True)
class SlotMoves:
    """An eviction of one request: slot ``sources[i]`` moves to slot ``destinations[i]``; afterwards the request
    holds ``kept`` slots, ``dropped`` fewer than before."""

    sources: torch.Tensor
    destinations: torch.Tensor
    kept: int
    dropped: int


def reads_cache(scorer: Scorer) -> bool:
    """Whether ``scorer`` scores from the queries and the whole cache (attention probabilities, or every slot
    rescored): a request stream must then be shown every layer's attention (:meth:`RequestStream.observe_cache`)."""
    return scorer.wants_probabilities or scorer.rescores_slots


class RequestStream:
    """Positions, scores and scorer state of one request's cached tokens; see the module docstring."""

    def __init__(
        self, config: EpiKVConfig, num_layers: int, prompt_length: int, expected_length: int | None,
        device: torch.device,
    ):
        self.config = config
        self.num_layers = num_layers
        self.scorer = make_scorer(config, num_layers)
        # Refuses, as generate does, a prompt keep_prompt cannot protect in a stream that may outgrow the budget.
        self.policy = RetentionPolicy(config, [prompt_length], expected_length)
        self.pos = torch.empty(1, 0, dtype=torch.int64, device=device)
        self.scores = torch.empty(1, 0, dtype=torch.float32, device=device)
        self.seen = 0  # tokens read so far: the position of the next one
        self.chunk: ChunkInfo | None = None
        self.layers_scored = 0  # layers whose attention scored the slots in the chunk open now
        self.previous_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer, the last token's K/V

    @property
    def dropped(self) -> int:
        """Tokens evicted so far: the engine's count of cached tokens lags the positions by this much."""
        return self.seen - self.pos.shape[1]

    def begin_chunk(self, num_tokens: int) -> None:
        """The request's next ``num_tokens`` tokens enter the forward in progress."""
        device = self.pos.device
        positions = torch.arange(self.seen, self.seen + num_tokens, device=device)[None]
        valid = torch.ones_like(positions, dtype=torch.bool)
        # A token has a predecessor unless it opens the stream (what the store's chunks compute).
        before = torch.cat([torch.tensor([[self.seen > 0]], device=device), valid[:, :-1]], dim=1)
        self.chunk = ChunkInfo(positions, valid, valid & before)
        self.scorer.begin_chunk(self.chunk)
        self.pos = torch.cat([self.pos, positions], dim=1)
        self.scores = torch.cat([self.scores, torch.zeros(positions.shape, device=device)], dim=1)
        self.seen += num_tokens
        self.layers_scored = 0

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """``hidden [1, T, H]``: the output of decoder layer ``layer`` for this request's chunk."""
        self.scorer.observe_hidden(layer, hidden)

    def observe_keys(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys``/``values [1, Hkv, T, D]``: what layer ``layer`` writes for this request's chunk. The scorer sees a
        view of these new tokens alone (all a score fixed at arrival reads); its key/value delta norms come from
        :func:`ops.slot_attention` over them, as the store's attention computes them, from the previous chunk's
        last token on."""
        chunk = self.chunk
        slots = torch.arange(keys.shape[2], device=keys.device)[None]
        previous = self.previous_kv.get(layer, (None, None))
        result = None
        if self.scorer.wants_deltas:
            result = ops.slot_attention(
                keys, keys, values, chunk.positions, query_slots=slots, prev_k=previous[0], prev_v=previous[1],
                with_deltas=True, check_positions=False,
            )
        view = AttentionView(keys, keys, values, chunk.positions, slots, None, None, result)
        if self.scorer.observe_attention(layer, view) is not None:
            raise NotImplementedError(f"method {self.config.method!r} scores the cache, not the arriving tokens")
        self.previous_kv[layer] = (keys[:, :, -1].clone(), values[:, :, -1].clone())

    def observe_cache(
        self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float | None
    ) -> None:
        """``query [1, Hq, T, D]``: this request's queries of the chunk at layer ``layer``; ``keys``/``values
        [1, Hkv, S, D]``: every slot it holds, the chunk's included, in slot order. The scorer sees the attention
        :func:`ops.slot_attention` computes over them, as the store's attention computes it; its slot scores are
        folded in as the store folds them."""
        num_tokens, held = query.shape[2], keys.shape[2]
        query_slots = torch.arange(held - num_tokens, held, device=keys.device)[None]
        result = ops.slot_attention(
            query, keys, values, self.pos, query_slots=query_slots, scale=scale, with_deltas=False,
            return_lse=self.scorer.wants_probabilities, check_positions=False,
        )
        view = AttentionView(query, keys, values, self.pos, query_slots, scale, None, result)
        slot_scores = self.scorer.observe_attention(layer, view)
        if slot_scores is not None:
            fold_slot_scores(self.scorer, self.scores, slot_scores, first_layer=self.layers_scored == 0)
        self.layers_scored += 1

    def end_chunk(self) -> SlotMoves | None:
        """Fix the chunk's scores; the eviction the policy's cadence calls for now, or ``None``."""
        chunk, self.chunk = self.chunk, None
        if reads_cache(self.scorer) and self.layers_scored != self.num_layers:
            # Were another attention function registered over the observed one, the scores would silently go stale.
            raise RuntimeError(
                f"method {self.config.method!r} scores from the engine's attention calls, but {self.layers_scored} "
                f"of {self.num_layers} layers were observed: was the attention implementation replaced mid-run?"
            )
        scores = self.scorer.finish_chunk()
        if scores is not None:
            self.scores[:, -chunk.positions.shape[1] :] = scores.float()
        self.policy.record_prompt(torch.tensor([self.seen], device=self.pos.device))
        used = self.pos.shape[1]
        if not self.policy.eviction_due(used):
            return None
        kept = min(self.config.budget, used)
        _, _, destination = self.policy.plan(self.pos, self.scores, kept)
        destination = destination[0]
        moving = destination >= 0
        sources = torch.arange(kept, used, device=destination.device)[moving]
        destinations = destination[moving]
        for slots in (self.pos, self.scores):
            slots[0, destinations] = slots[0, sources]
        self.pos, self.scores = self.pos[:, :kept].clone(), self.scores[:, :kept].clone()
        return SlotMoves(sources, destinations, kept, used - kept)

    def kept_positions(self) -> list[int]:
        """Sorted positions of the tokens the request holds."""
        return sorted(self.pos[0].tolist())
