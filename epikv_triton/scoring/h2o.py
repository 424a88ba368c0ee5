"""``h2o``: the attention each slot receives, accumulated over every later query, layer and head.

It needs the attention probabilities, so it reads each attention call's lse
and runs a second, attention-shaped pass (``docs/method.md`` section 4).
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionView, Scorer


class AttentionMassScorer(Scorer):
    """H2O: accumulated attention probability per slot, averaged over query heads and layers.

    The probabilities come from :func:`ops.attention_column_sums`, pass 2 of a
    two-pass scheme whose pass 1 (the row log-sum-exp) is the attention call
    itself. On a GPU the column sums are a fused kernel that never materialises
    the attention matrix; the CPU twin does materialise it, one layer at a time.
    """

    wants_probabilities = True

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def observe_attention(self, layer: int, view: AttentionView) -> torch.Tensor:
        column_sums = ops.attention_column_sums(
            view.query, view.keys, view.pos, view.result.lse,
            query_slots=view.query_slots, scale=view.scale, window=view.window, slot_count=view.slot_count,
            check_positions=False,
        )
        return column_sums.sum(dim=1) / (view.query.shape[1] * self.num_layers)

    def finish_chunk(self) -> None:
        return None

