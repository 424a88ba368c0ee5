"""``lag_kv``: keys/values normalised by the previous ``C``-chunk's per-channel range, spread over channels
(``docs/method.md`` section 3)."""

from __future__ import annotations

import torch

from . import base
from .base import AttentionView, ChunkInfo, Scorer


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
        step = max(1, base.TEMPORARY_SLICE_ELEMENTS // (two * B * H * D))
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

