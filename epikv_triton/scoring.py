"""Per-token importance scores from forward-pass signals (DESIGN.md section 2).

Transformers-free. A scorer sees one forward chunk at a time, in stream order:
``begin_chunk`` -> ``observe_hidden`` / ``observe_attention`` per layer ->
``finish_chunk``, which returns the new tokens' scores (higher = keep). Its
state is per sequence and independent of the context length.

Which signal each method reads:

* ``epikv``, ``epikv_flat``: residual-stream change ``‖h_l[t] − h_l[t−1]‖`` of the
  band layers (forward hooks), two bands, rolling z-score (2.1).
* ``kv``: the attention kernel's key/value delta norms of the band layers (2.2).
* ``lag_kv``: keys/values normalised by the previous ``C``-chunk's per-channel
  range, spread over channels (2.3).
* ``knorm``: minus the mean key norm (low-norm keys are kept, as KnormPress).
* ``random``: uniform from a seeded generator.
* ``streaming``: the position itself, so the kept set is the sink plus the
  most recent tokens (StreamingLLM). ``full`` shares it; it never evicts.
* ``h2o``: attention each slot receives, accumulated over every later query,
  layer and head. It needs the attention probabilities, so it materialises
  the attention matrix of each call (eager): memory grows with
  ``new tokens × cached tokens`` per call.

"Population" std is used wherever a std appears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .config import EpiKVConfig


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

    ``keys``/``values`` ``[B, Hkv, S, D]`` are every slot of the layer, the new
    tokens last; ``pos`` ``[B, S]`` their positions; ``result`` what
    :func:`ops.slot_attention` returned (deltas and lse only when asked for).
    """

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    num_new: int
    scale: float | None
    window: int | None
    result: ops.AttentionResult

    def new_keys_values(self) -> torch.Tensor:
        """``[2, B, Hkv, T, D]`` float32 keys and values of the new tokens."""
        T = self.num_new
        return torch.stack([self.keys[:, :, -T:], self.values[:, :, -T:]]).float()


class Scorer:
    """Base of the scorers: the hooks default to "signal not needed"; ``finish_chunk`` is each method's own."""

    #: Decoder layers whose output (residual stream) the scorer reads.
    hidden_layers: tuple[int, ...] = ()
    #: Whether the attention kernel must emit key/value delta norms.
    wants_deltas = False
    #: Whether the attention call must return its lse (for probabilities).
    wants_probabilities = False

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        self.chunk = chunk

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """``hidden [B, T, H]``: output of decoder layer ``layer`` for the chunk."""

    def observe_attention(self, layer: int, view: AttentionView) -> torch.Tensor | None:
        """Returns an increment ``[B, S]`` to add to every slot's score, or ``None``."""
        return None

    def finish_chunk(self) -> torch.Tensor | None:
        """``[B, T]`` float32 scores of the new tokens, or ``None`` to keep the accumulated ones."""
        raise NotImplementedError


class BandScorer(Scorer):
    """``w_A·z(a) − w_B·z(b)`` over two layer bands (2.1 ``hidden``, 2.2 ``kv``)."""

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
            self.ring = torch.zeros(B, 2, self.window, dtype=torch.float32, device=device)
            self.count = torch.zeros(B, 2, dtype=torch.int64, device=device)
            self.weights = self.weights.to(device)
        self.band_values = torch.zeros(B, 2, T, dtype=torch.float32, device=device)

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        if layer not in self.band_of:
            return
        h = hidden.float()
        previous = self.previous_hidden.get(layer, h[:, 0])
        before = torch.cat([previous[:, None], h[:, :-1]], dim=1)
        self.previous_hidden[layer] = h[:, -1].clone()
        self._add(layer, torch.linalg.vector_norm(h - before, dim=-1))

    def observe_attention(self, layer: int, view: AttentionView) -> None:
        if self.source == "kv" and layer in self.band_of:
            self._add(layer, (view.result.dk + view.result.dv).mean(dim=1))
        return None

    def _add(self, layer: int, signal: torch.Tensor) -> None:
        band = self.band_of[layer]
        self.band_values[:, band] += signal / self.band_sizes[band]

    def finish_chunk(self) -> torch.Tensor:
        # A token without a real predecessor has no difference: NaN = "no value" for the z-score.
        values = torch.where(self.chunk.has_predecessor[:, None], self.band_values, float("nan"))
        return ops.rolling_zscore(values, self.ring, self.count, self.weights)


class LagKVScorer(Scorer):
    """Lag-normalised key/value spread (2.3), per layer and KV head, averaged.

    State per layer: the per-channel min/max of the chunk in progress
    (``acc``) and of the previous complete chunk (``ref``), for keys and values.
    """

    def __init__(self, num_layers: int, chunk_length: int):
        self.num_layers = num_layers
        self.chunk_length = chunk_length
        self.acc_min: list[torch.Tensor | None] = [None] * num_layers
        self.acc_max: list[torch.Tensor | None] = [None] * num_layers
        self.ref_min: list[torch.Tensor | None] = [None] * num_layers
        self.ref_max: list[torch.Tensor | None] = [None] * num_layers
        self.acc_chunk: list[torch.Tensor | None] = [None] * num_layers

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        super().begin_chunk(chunk)
        valid = chunk.valid
        self.lag_chunk = torch.where(valid, chunk.positions // self.chunk_length, -1)
        # Chunk of each sequence's first real token here; tokens are visited chunk by chunk from it.
        first = torch.where(valid, self.lag_chunk, torch.iinfo(torch.int64).max).min(dim=1).values
        self.offset = torch.where(valid, self.lag_chunk - first[:, None], -1)
        self.num_steps = chunk.positions.shape[1] // self.chunk_length + 2
        self.total = torch.zeros(chunk.positions.shape, dtype=torch.float32, device=chunk.positions.device)

    def observe_attention(self, layer: int, view: AttentionView) -> None:
        kv = view.new_keys_values()  # [2, B, H, T, D]
        if self.acc_chunk[layer] is None:
            stat_shape = kv[:, :, :, 0].shape  # [2, B, H, D]
            self.acc_min[layer] = torch.full(stat_shape, float("inf"), device=kv.device)
            self.acc_max[layer] = torch.full(stat_shape, float("-inf"), device=kv.device)
            self.ref_min[layer] = torch.zeros(stat_shape, device=kv.device)
            self.ref_max[layer] = torch.zeros(stat_shape, device=kv.device)
            self.acc_chunk[layer] = torch.full(kv.shape[1:2], -1, dtype=torch.int64, device=kv.device)
        plain_std = kv.std(dim=-1, unbiased=False)  # chunk 0: no reference yet
        for step in range(self.num_steps):
            in_step = self.offset == step  # [B, T]
            present = in_step.any(dim=1)
            chunk_index = torch.where(in_step, self.lag_chunk, -1).max(dim=1).values
            self._advance(layer, present & (self.acc_chunk[layer] < chunk_index), chunk_index)
            lo = self.ref_min[layer][:, :, :, None]
            hi = self.ref_max[layer][:, :, :, None]
            lagged_std = ((kv - lo) / (hi - lo + 1e-9)).std(dim=-1, unbiased=False)
            std = torch.where((self.lag_chunk >= 1)[None, :, None], lagged_std, plain_std)
            per_token = std.sum(dim=0).mean(dim=1)  # keys + values, mean over heads: [B, T]
            self.total += torch.where(in_step, per_token, 0.0) / self.num_layers
            mask = in_step[None, :, None, :, None]
            self.acc_min[layer] = torch.minimum(self.acc_min[layer], torch.where(mask, kv, float("inf")).amin(dim=3))
            self.acc_max[layer] = torch.maximum(self.acc_max[layer], torch.where(mask, kv, float("-inf")).amax(dim=3))
        return None

    def _advance(self, layer: int, advance: torch.Tensor, chunk_index: torch.Tensor) -> None:
        """Sequences entering a new chunk: the finished one becomes the reference."""
        gate = advance[None, :, None, None]
        self.ref_min[layer] = torch.where(gate, self.acc_min[layer], self.ref_min[layer])
        self.ref_max[layer] = torch.where(gate, self.acc_max[layer], self.ref_max[layer])
        self.acc_min[layer] = torch.where(gate, float("inf"), self.acc_min[layer])
        self.acc_max[layer] = torch.where(gate, float("-inf"), self.acc_max[layer])
        self.acc_chunk[layer] = torch.where(advance, chunk_index, self.acc_chunk[layer])

    def finish_chunk(self) -> torch.Tensor:
        return self.total


class KeyNormScorer(Scorer):
    """Minus the key norm, averaged over layers and KV heads: low-norm keys are kept."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        super().begin_chunk(chunk)
        self.total = torch.zeros(chunk.positions.shape, dtype=torch.float32, device=chunk.positions.device)

    def observe_attention(self, layer: int, view: AttentionView) -> None:
        keys = view.keys[:, :, -view.num_new :].float()
        self.total -= torch.linalg.vector_norm(keys, dim=-1).mean(dim=1) / self.num_layers
        return None

    def finish_chunk(self) -> torch.Tensor:
        return self.total


class RandomScorer(Scorer):
    """Uniform scores from a generator seeded once per cache: reproducible runs."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: torch.Generator | None = None

    def finish_chunk(self) -> torch.Tensor:
        positions = self.chunk.positions
        if self.generator is None:
            # On the tokens' device, so no host-to-device copy per step.
            self.generator = torch.Generator(device=positions.device).manual_seed(self.seed)
        return torch.rand(positions.shape, generator=self.generator, device=positions.device)


class PositionScorer(Scorer):
    """Score = position: the most recent tokens win (StreamingLLM once the sink is protected)."""

    def finish_chunk(self) -> torch.Tensor:
        return self.chunk.positions.float()


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
            scale=view.scale, window=view.window, check_positions=False,
        )
        return column_sums.sum(dim=1) / (view.query.shape[1] * self.num_layers)

    def finish_chunk(self) -> None:
        return None


def make_scorer(config: EpiKVConfig, num_layers: int) -> Scorer:
    """The scorer of ``config.method`` for a model of ``num_layers`` decoder layers."""
    method = config.method
    if config.uses_bands:
        source = "kv" if method == "kv" else "hidden"
        return BandScorer(config.resolve_bands(num_layers), config.weights, config.window, source)
    if method == "lag_kv":
        return LagKVScorer(num_layers, config.lag_chunk)
    if method == "knorm":
        return KeyNormScorer(num_layers)
    if method == "random":
        return RandomScorer(config.seed)
    if method == "h2o":
        return AttentionMassScorer(num_layers)
    return PositionScorer()  # streaming, full
