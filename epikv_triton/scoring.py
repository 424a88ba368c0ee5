"""Per-token importance scores from forward-pass signals (the method: ``docs/method.md``).

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
* ``random``: uniform, hashed from the seed, the sequence and the position.
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
from ._static import static_address
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
        return ops.naive.gather_slots(x, self.query_slots[:, start:end])


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
        return None

    def _add(self, layer: int, signal: torch.Tensor) -> None:
        band = self.band_of[layer]
        self.band_values[:, band] += signal / self.band_sizes[band]

    def finish_chunk(self) -> torch.Tensor:
        # A token without a real predecessor has no difference: NaN = "no value" for the z-score.
        values = torch.where(self.chunk.has_predecessor[:, None], self.band_values, float("nan"))
        return ops.rolling_zscore(values, self.ring, self.count, self.weights)


# Float32 elements per slice of a chunk-wide computation: bounds its temporaries (16 MiB each) whatever
# the chunk length.
TEMPORARY_SLICE_ELEMENTS = 2**22


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
    step = max(1, TEMPORARY_SLICE_ELEMENTS // max(B * H, 1))
    for start in range(0, T, step):
        end = min(start + step, T)
        if start == 0:
            before = torch.cat([previous[:, None].to(hidden.dtype), hidden[:, : end - 1]], dim=1)
        else:
            before = hidden[:, start - 1 : end - 1]
        torch.linalg.vector_norm(hidden[:, start:end].float() - before.float(), dim=-1, out=norms[:, start:end])
    return norms


class LagKVScorer(Scorer):
    """Lag-normalised key/value spread, per layer and KV head, averaged (see ``docs/method.md``).

    A token in lag chunk ``c = position // C`` (``c >= 1``) is normalised by the
    per-channel min/max of chunk ``c - 1``; chunk 0 uses the plain spread.
    State per layer, per sequence: the min/max of the lag chunk in progress
    (``acc``, chunk index ``acc_chunk``) and of the one before it (``ref``).
    A forward chunk costs O(T): one segment min/max per lag chunk it touches
    (``scatter_reduce`` by chunk offset), then a shift by one segment gives each
    token its reference; the float32 work runs in fixed-size slices of tokens.
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
        T = chunk.positions.shape[1]
        lag_chunk = chunk.positions // self.chunk_length
        # A sequence's real positions are consecutive, so its T tokens span at most T // C + 2 lag chunks:
        # segment `offset` is lag chunk `first + offset`; padding goes to a spare last segment.
        self.segments = T // self.chunk_length + 2
        self.first = torch.where(valid, lag_chunk, torch.iinfo(torch.int64).max).min(dim=1).values
        self.present = valid.any(dim=1)
        self.offset = torch.where(valid, lag_chunk - self.first[:, None], self.segments)
        self.last_offset = torch.where(valid, self.offset, -1).max(dim=1).values.clamp(min=0)
        self.normalised = valid & (lag_chunk >= 1)
        self.total = torch.zeros(chunk.positions.shape, dtype=torch.float32, device=chunk.positions.device)

    def observe_attention(self, layer: int, view: AttentionView) -> None:
        T = view.query_slots.shape[1]
        two, (B, H, _, D), device = 2, view.keys.shape, view.keys.device
        if self.acc_chunk[layer] is None:
            self._init_state(layer, (two, B, H, D), device)
        # Segment 0 continues the lag chunk in progress when it is the same one; its reference is then the
        # stored one, else the chunk just finished.
        continues = (self.acc_chunk[layer] == self.first)[None, :, None, None]
        seg_min = torch.full((two, B, H, self.segments + 1, D), float("inf"), device=device)
        seg_max = torch.full_like(seg_min, float("-inf"))
        seg_min[:, :, :, 0] = torch.where(continues, self.acc_min[layer], float("inf"))
        seg_max[:, :, :, 0] = torch.where(continues, self.acc_max[layer], float("-inf"))
        first_ref_min = torch.where(continues, self.ref_min[layer], self.acc_min[layer])[:, :, :, None]
        first_ref_max = torch.where(continues, self.ref_max[layer], self.acc_max[layer])[:, :, :, None]
        # Slices in stream order: a token's reference segment lies wholly before it, so it is complete once
        # the token's own slice is reduced. Slicing bounds the float32 temporaries, whatever T.
        step = max(1, TEMPORARY_SLICE_ELEMENTS // (two * B * H * D))
        for start in range(0, T, step):
            end = min(start + step, T)
            new_keys, new_values = view.new_tokens(view.keys, start, end), view.new_tokens(view.values, start, end)
            kv = torch.stack([new_keys, new_values]).float()  # [2, B, H, t, D]
            index = self.offset[None, :, None, start:end, None].expand_as(kv)
            seg_min.scatter_reduce_(3, index, kv, "amin")
            seg_max.scatter_reduce_(3, index, kv, "amax")
            # Entry o of these tables is the reference of segment o: segment o - 1, or first_ref for o = 0.
            lo = torch.cat([first_ref_min, seg_min], dim=3).gather(3, index)
            hi = torch.cat([first_ref_max, seg_max], dim=3).gather(3, index)
            # Lag chunk 0 has no reference: its tokens keep their raw values.
            normalised = self.normalised[None, :, None, start:end, None]
            spread = torch.where(normalised, (kv - lo) / (hi - lo + 1e-9), kv).std(dim=-1, unbiased=False)
            per_token = spread.sum(dim=0).mean(dim=1)  # keys + values, mean over heads: [B, t]
            self.total[:, start:end] += torch.where(self.chunk.valid[:, start:end], per_token, 0.0) / self.num_layers
        self._keep_last_segment(layer, torch.cat([first_ref_min, seg_min], 3), torch.cat([first_ref_max, seg_max], 3))
        return None

    def _init_state(self, layer: int, stat_shape: tuple[int, ...], device: torch.device) -> None:
        """``stat_shape`` ``[2, B, H, D]``: per-channel statistics of keys and values."""
        self.acc_min[layer] = torch.full(stat_shape, float("inf"), device=device)
        self.acc_max[layer] = torch.full(stat_shape, float("-inf"), device=device)
        self.ref_min[layer] = torch.zeros(stat_shape, device=device)
        self.ref_max[layer] = torch.zeros(stat_shape, device=device)
        self.acc_chunk[layer] = torch.full(stat_shape[1:2], -1, dtype=torch.int64, device=device)

    def _keep_last_segment(self, layer: int, table_min: torch.Tensor, table_max: torch.Tensor) -> None:
        """The last segment a sequence reached is its chunk in progress, its reference the entry before it
        (tables: ``[first_ref, segment 0, segment 1, ...]`` along dim 3)."""
        present = self.present[None, :, None, None]
        two, B, H, _, D = table_min.shape

        def entry(table: torch.Tensor, shift: int) -> torch.Tensor:
            index = (self.last_offset + shift)[None, :, None, None, None].expand(two, B, H, 1, D)
            return table.gather(3, index).squeeze(3)

        self.acc_min[layer] = torch.where(present, entry(table_min, 1), self.acc_min[layer])
        self.acc_max[layer] = torch.where(present, entry(table_max, 1), self.acc_max[layer])
        self.ref_min[layer] = torch.where(present, entry(table_min, 0), self.ref_min[layer])
        self.ref_max[layer] = torch.where(present, entry(table_max, 0), self.ref_max[layer])
        self.acc_chunk[layer] = torch.where(self.present, self.first + self.last_offset, self.acc_chunk[layer])

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
        norms = torch.linalg.vector_norm(view.new_tokens(view.keys), dim=-1, dtype=torch.float32)
        self.total -= norms.mean(dim=1) / self.num_layers
        return None

    def finish_chunk(self) -> torch.Tensor:
        return self.total


class RandomScorer(Scorer):
    """Uniform scores in ``[0, 1)`` hashed from (seed, sequence, position): reproducible runs, the same
    score however the stream is chunked, and no generator state, so a compiled step traces it."""

    def __init__(self, seed: int):
        self.seed = seed & _LOW_32

    def finish_chunk(self) -> torch.Tensor:
        positions = self.chunk.positions.clamp(min=0)
        row = torch.arange(positions.shape[0], device=positions.device)[:, None]
        key = (_multiply_low_32(positions & _LOW_32, 0x9E3779B1) ^ _multiply_low_32(row, 0x85EBCA6B)) ^ self.seed
        return (_mix_32(key) >> 8).float() / 2**24


_LOW_32 = 0xFFFFFFFF


def _multiply_low_32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``x * factor mod 2^32`` for int64 ``x`` in ``[0, 2^32)``, in 16-bit halves so no product
    overflows int64 (a wrapping overflow is not something every backend promises)."""
    low = (x & 0xFFFF) * factor
    high = (((x >> 16) * factor) & 0xFFFF) << 16
    return (low + high) & _LOW_32


def _mix_32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (MurmurHash3's finaliser) of int64 ``x`` in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _multiply_low_32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _multiply_low_32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


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
            query_slots=view.query_slots, scale=view.scale, window=view.window, slot_count=view.slot_count,
            check_positions=False,
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
