"""``tova``, ``snapkv`` and ``rkv``: every slot rescored at each chunk from the attention of the chunk's newest
queries, the observation window (``docs/method.md`` section 5).

The window's probabilities come from :func:`ops.attention_column_sums` fed the window's rows of the query, the
attention call's lse and the query slots: on a GPU a fused kernel that never materialises the attention
matrix, at O(w·S) per layer for a window of ``w`` queries over ``S`` slots.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionView, ChunkInfo, Scorer
from .key_similarity import cosine_to_mean_unit_key


class ObservationWindowScorer(Scorer):
    """The attention each slot receives from the chunk's last ``window`` queries: mean over the window's real
    queries and the query heads of each KV group, max-pooled over the slots within ``pool_kernel // 2``
    positions, then averaged over KV heads and layers. ``window=1, pool_kernel=1`` is TOVA (the newest
    query's attention); ``window=32, pool_kernel=7`` SnapKV's observation window."""

    wants_probabilities = True
    rescores_slots = True

    def __init__(self, num_layers: int, window: int, pool_kernel: int):
        if window < 1 or pool_kernel < 1 or pool_kernel % 2 == 0:
            raise ValueError(f"need window >= 1 and an odd pool_kernel >= 1, got {window} and {pool_kernel}")
        self.num_layers = num_layers
        self.window = window
        self.pool_radius = pool_kernel // 2

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        super().begin_chunk(chunk)
        window = min(self.window, chunk.positions.shape[1])
        # Padding queries in the window attend to nothing: the mean is over the real ones.
        self.window_queries = chunk.valid[:, -window:].sum(dim=1).clamp(min=1)  # [B]
        # Every layer sees the same slots: which are held and their neighbours are found at the first layer.
        self.held: torch.Tensor | None = None
        self.neighbours: torch.Tensor | None = None

    def observe_attention(self, layer: int, view: AttentionView) -> torch.Tensor:
        if self.held is None:
            pos = ops.slots.slots_in_use(view.pos, view.slot_count)
            self.held, self.neighbours = pos >= 0, positional_neighbours(pos, self.pool_radius)
        per_head = self.head_scores(view)  # [B, Hkv, S]
        return torch.where(self.held, per_head.mean(dim=1) / self.num_layers, float("nan"))

    def head_scores(self, view: AttentionView) -> torch.Tensor:
        """``[B, Hkv, S]`` float32: each slot's score for each KV head of this layer."""
        return self.window_attention(view)

    def window_attention(self, view: AttentionView) -> torch.Tensor:
        """``[B, Hkv, S]`` float32: the window's attention to each slot, averaged over the window's real queries
        and each group's query heads, then max-pooled by position."""
        window = min(self.window, view.query.shape[2])
        column_sums = ops.attention_column_sums(
            view.query[:, :, -window:], view.keys, view.pos, view.result.lse[:, :, -window:],
            query_slots=view.query_slots[:, -window:], scale=view.scale, window=view.window,
            slot_count=view.slot_count, check_positions=False,
        )
        group = view.query.shape[1] // view.keys.shape[1]
        return max_pool(column_sums / (group * self.window_queries[:, None, None]), self.neighbours)

    def finish_chunk(self) -> None:
        return None


class RedundancyAwareScorer(ObservationWindowScorer):
    """R-KV-style: ``λ · importance − (1 − λ) · redundancy`` per layer and KV head, averaged over both.
    Importance is the observation window's attention (as :class:`ObservationWindowScorer`); redundancy is
    the softmax over the slots in use of each key's mean cosine similarity to the other keys in use (over all
    ``n``, its own counted as 0, as R-KV averages)."""

    def __init__(self, num_layers: int, window: int, pool_kernel: int, mix: float):
        super().__init__(num_layers, window, pool_kernel)
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"the importance weight λ must lie in [0, 1], got {mix}")
        self.mix = mix

    def head_scores(self, view: AttentionView) -> torch.Tensor:
        # R-KV's mean similarity to the other keys, over all n with its own counted as 0, is k̂_j·m − 1/n (m the
        # mean unit key): the softmax ignores the constant.
        similarity, _ = cosine_to_mean_unit_key(view.keys, self.held)
        redundancy = torch.softmax(similarity.masked_fill(~self.held[:, None], float("-inf")), dim=-1)
        return self.mix * self.window_attention(view) - (1.0 - self.mix) * redundancy


def positional_neighbours(pos: torch.Tensor, radius: int) -> torch.Tensor:
    """``[B, 2·radius, S]`` int64: for each slot, the slots whose positions lie within ``radius`` of its own, the
    slot itself standing in where there are fewer (``pos [B, S]``, ``-1`` = not in use: no neighbours).

    Slots are in no particular order, so they are sorted by position first: a sequence's positions are
    distinct, so every slot within ``radius`` positions lies within ``radius`` places in that order, and each
    of the ``2·radius`` shifted orders is one candidate per slot, O(S·radius) after the O(S log S) sort.
    """
    if radius == 0:
        return pos.new_zeros(pos.shape[0], 0, pos.shape[1])
    order = pos.argsort(dim=1)  # [B, S]: slots by position
    sorted_pos = pos.gather(1, order)
    candidates = []
    for shift in (s for step in range(1, radius + 1) for s in (step, -step)):
        # A shift wraps around the row; the position test rejects whatever is not a real neighbour.
        neighbour_pos = sorted_pos.roll(shift, dims=1)
        near = (neighbour_pos >= 0) & (sorted_pos >= 0) & ((neighbour_pos - sorted_pos).abs() <= radius)
        candidates.append(torch.where(near, order.roll(shift, dims=1), order))
    by_rank = torch.stack(candidates, dim=1)
    return torch.empty_like(by_rank).scatter_(2, order[:, None].expand_as(by_rank), by_rank)


def max_pool(scores: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``scores [B, H, S]`` with each slot's value replaced by the largest over itself and its ``neighbours``
    (``[B, K, S]`` slot indices, from :func:`positional_neighbours`)."""
    B, H, S = scores.shape
    if neighbours.shape[1] == 0:
        return scores
    index = neighbours.flatten(1)[:, None].expand(B, H, -1)
    return torch.maximum(scores, scores.gather(2, index).unflatten(2, (-1, S)).amax(dim=2))
