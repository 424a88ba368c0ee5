"""``epikv``, ``epikv_flat`` and ``kv``: a rolling z-score of two layer bands (``docs/method.md`` sections 1, 2).

``epikv``/``epikv_flat`` read the residual-stream change ``‖h_l[t] − h_l[t−1]‖``
of the band layers (forward hooks); ``kv`` reads the attention kernel's
key/value delta norms of the band layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import ops
from .._static import static_address
from . import base
from .base import AttentionView, ChunkInfo, Scorer
from .registry import ScorerFactory

if TYPE_CHECKING:
    from ..config import EpiKVConfig


class BandScorer(Scorer):
    """``w_A·z(a) − w_B·z(b)`` over two layer bands (``hidden``: residual stream, ``kv``: key/value deltas)."""

    def __init__(self, bands: tuple[tuple[int, ...], ...], weights: tuple[float, float], window: int, source: str):
        self.band_of = {layer: band for band, layers in enumerate(bands) for layer in layers}
        self.band_sizes = [len(layers) for layers in bands]
        self.weights = torch.tensor([weights[0], -weights[1]], dtype=torch.float32)
        self.window = window
        self.source = source
        self.hidden_layers = tuple(sorted(self.band_of)) if source == "hidden" else ()
        self.wants_deltas = source == "kv"
        self.previous_hidden: dict[int, torch.Tensor] = {}
        self.ring: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        super().begin_chunk(chunk)
        B, T = chunk.positions.shape
        device = chunk.positions.device
        if self.ring is None:
            self.ring = static_address(torch.zeros(B, 2, self.window, dtype=torch.float32, device=device))
            self.count = static_address(torch.zeros(B, 2, dtype=torch.int64, device=device))
            self.weights = self.weights.to(device)
        self.band_values = torch.zeros(B, 2, T, dtype=torch.float32, device=device)

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        if layer not in self.band_of:
            return
        previous = self.previous_hidden.get(layer)
        norms = step_norms(hidden, hidden[:, 0] if previous is None else previous)
        if previous is None:
            self.previous_hidden[layer] = static_address(hidden[:, -1].clone())
        else:
            previous.copy_(hidden[:, -1])  # in place: a compiled step sees the same tensor every time
        self._add(layer, norms)

    def observe_attention(self, layer: int, view: AttentionView) -> None:
        if self.source == "kv" and layer in self.band_of:
            self._add(layer, (view.result.dk + view.result.dv).mean(dim=1))

    def _add(self, layer: int, signal: torch.Tensor) -> None:
        band = self.band_of[layer]
        self.band_values[:, band] += signal / self.band_sizes[band]

    def finish_chunk(self) -> torch.Tensor:
        if self.source == "kv":
            # Each tensor-parallel rank averaged its own KV heads: the z-score must see the mean over all of them.
            self.band_values = self.ranks.mean(self.band_values)
        # A token without a real predecessor has no difference: NaN = "no value" for the z-score.
        values = torch.where(self.chunk.has_predecessor[:, None], self.band_values, float("nan"))
        return ops.rolling_zscore(values, self.ring, self.count, self.weights)


def step_norms(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` float32 ``‖h[t] − h[t−1]‖₂`` of ``hidden [B, T, H]``, with ``previous [B, H]`` before ``h[0]``.

    Differences and norms are float32, computed over slices of tokens so the
    temporaries stay a fixed size: a long prefill chunk never allocates a
    float32 copy of its hidden states.
    """
    # A score only steers eviction: no gradient flows through it (and out= needs no autograd).
    hidden, previous = hidden.detach(), previous.detach()
    B, T, H = hidden.shape
    norms = torch.empty(B, T, dtype=torch.float32, device=hidden.device)
    step = max(1, base.TEMPORARY_SLICE_ELEMENTS // max(B * H, 1))
    for start in range(0, T, step):
        end = min(start + step, T)
        if start == 0:
            before = torch.cat([previous[:, None].to(hidden.dtype), hidden[:, : end - 1]], dim=1)
        else:
            before = hidden[:, start - 1 : end - 1]
        torch.linalg.vector_norm(hidden[:, start:end].float() - before.float(), dim=-1, out=norms[:, start:end])
    return norms


def band_scorer(source: str) -> ScorerFactory:
    """The factory of a band method's scorer: ``source`` ``"hidden"`` (residual stream) or ``"kv"`` (deltas)."""

    def make(config: EpiKVConfig, num_layers: int) -> BandScorer:
        return BandScorer(config.resolve_bands(num_layers), config.weights, config.window, source)

    return make
