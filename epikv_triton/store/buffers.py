"""The slot buffers: every layer's keys and values in one tensor, with per-slot metadata.

* ``kv [2, L, B, Hkv, capacity, D]``: keys (plane 0) and values (plane 1) of
  every layer, so one :func:`ops.compact_slots_` call compacts all layers (as
  the ``[2L, B, Hkv, used, D]`` view).
* ``pos [B, capacity]`` int64: each slot's absolute position, ``-1`` = empty or padding.
* ``scores [B, capacity]`` float32: each slot's score (NaN = never kept first).
* ``previous_kv [2, L, B, Hkv, D]``: the key and value of the last token of the
  previous chunk, which the first new token's delta norms compare against.

Slot order carries no meaning (visibility is by position). Allocation is
once, at the first chunk; growing copies into new buffers. Everything that
lives as long as the buffers is marked static for compiled steps.
"""

from __future__ import annotations

import torch

from .. import ops
from .._static import static_address


class SlotBuffers:
    """See the module docstring. Empty until :meth:`allocate`."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.kv: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.previous_kv: torch.Tensor | None = None

    @property
    def allocated(self) -> bool:
        return self.kv is not None

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def allocate(self, like: torch.Tensor, capacity: int) -> None:
        """Buffers of ``capacity`` slots for keys shaped like ``like [B, Hkv, T, D]`` (its dtype and device)."""
        B, H, _, D = like.shape
        options = dict(dtype=like.dtype, device=like.device)
        self.kv = static_address(torch.zeros(2, self.num_layers, B, H, capacity, D, **options))
        self.pos = static_address(torch.full((B, capacity), -1, dtype=torch.int64, device=like.device))
        self.scores = static_address(torch.full((B, capacity), float("nan"), dtype=torch.float32, device=like.device))
        self.previous_kv = static_address(torch.zeros(2, self.num_layers, B, H, D, **options))

    def grow(self, capacity: int, fill: int) -> None:
        """New buffers of ``capacity`` slots holding the first ``fill`` slots of the old ones (both exist
        briefly)."""
        kv, pos, scores, previous_kv = self.kv, self.pos, self.scores, self.previous_kv
        self.allocate(kv[0, 0], capacity)
        self.kv[:, :, :, :, :fill] = kv[:, :, :, :, :fill]
        self.pos[:, :fill] = pos[:, :fill]
        self.scores[:, :fill] = scores[:, :fill]
        self.previous_kv = previous_kv

    def compact(self, used: int, destination: torch.Tensor) -> None:
        """Move slot ``used - W + j`` of every layer to ``destination[:, j]`` (``[B, W]``, from
        :func:`ops.compaction_plan`), with its position and score; clears the released slots."""
        _, L, B, H, capacity, D = self.kv.shape
        planes = self.kv.view(2 * L, B, H, capacity, D)[:, :, :, :used]
        ops.compact_slots_(planes, self.pos[:, :used], self.scores[:, :used], destination)

    def largest_value_norms(self, used: int) -> torch.Tensor:
        """``[B, used]`` float32: each slot's largest ``‖v‖`` over layers and KV heads."""
        values = self.kv[1, :, :, :, :used]  # [L, B, Hkv, used, D]
        return torch.linalg.vector_norm(values.float(), dim=-1).amax(dim=(0, 2))

    def kept_positions(self, fill: int) -> list[list[int]]:
        """Sorted real positions of each sequence's first ``fill`` slots."""
        return [sorted(p for p in row if p >= 0) for row in self.pos[:, :fill].tolist()]

    def kept_counts(self, fill: int) -> list[int]:
        return (self.pos[:, :fill] >= 0).sum(dim=1).tolist()

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer and KV head."""
        _, L, _, H, _, D = self.kv.shape
        return 2 * L * H * D * self.kv.element_size()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the K/V, position and score buffers."""
        return self.kv.numel() * self.kv.element_size() + self.pos.numel() * 8 + self.scores.numel() * 4
