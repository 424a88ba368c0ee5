"""``keydiff`` and the key redundancy of ``rkv``: how alike a slot's key is to the other keys in the cache
(``docs/method.md`` section 5).

Both reduce to the mean unit key of the slots in use, ``m = mean_j k_j / ‖k_j‖``: one pass to form it and one
to dot every unit key with it, O(S·D) per layer and KV head rather than the O(S²·D) of a pairwise similarity
matrix. The float32 work runs in fixed-size slices of slots (``base.TEMPORARY_SLICE_ELEMENTS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import base
from .base import AttentionView, ChunkInfo, Scorer


class KeyDiffScorer(Scorer):
    """KeyDiff: minus the cosine similarity of each slot's key to the mean unit key of the slots in use, per
    layer and KV head, averaged over both; every slot in use is rescored at each chunk, since the mean moves."""

    rescores_slots = True

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def begin_chunk(self, chunk: ChunkInfo) -> None:
        super().begin_chunk(chunk)
        self.held: torch.Tensor | None = None  # the slots in use, the same for every layer

    def observe_attention(self, layer: int, view: AttentionView) -> torch.Tensor:
        if self.held is None:
            self.held = slots_in_use(view)
        dot, anchor_norm = cosine_to_mean_unit_key(view.keys, self.held)
        similarity = dot / anchor_norm.clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # cos(k_j, m)
        return torch.where(self.held, -similarity.mean(dim=1) / self.num_layers, float("nan"))

    def finish_chunk(self) -> None:
        return None


def slots_in_use(view: AttentionView) -> torch.Tensor:
    """``[B, S]`` bool: the slots of ``view`` that hold a real token (padding, empty and, in a compiled step,
    slots past ``slot_count`` do not)."""
    return ops.slots.slots_in_use(view.pos, view.slot_count) >= 0


def cosine_to_mean_unit_key(keys: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k̂_j · m`` ``[B, H, S]`` and ``‖m‖`` ``[B, H]``, float32, where ``k̂ = k / ‖k‖`` and ``m`` is the mean
    unit key of the slots ``held [B, S]`` (``keys [B, H, S, D]``; zero for a sequence holding none; a zero key
    counts as a zero unit key). Two passes over the slices of slots, the second skipped when one slice holds
    them all."""
    slices = _slot_slices(keys)
    total = torch.zeros(keys.shape[0], keys.shape[1], 1, keys.shape[3], dtype=torch.float32, device=keys.device)
    for start, end in slices:
        unit = F.normalize(keys[:, :, start:end].float(), dim=-1)
        total += held[:, None, None, start:end].to(torch.float32) @ unit  # masked sum over the slots: [B, H, 1, D]
    anchor = total / held.sum(dim=1).clamp(min=1)[:, None, None, None]
    dots = [
        (unit if len(slices) == 1 else F.normalize(keys[:, :, start:end].float(), dim=-1)) @ anchor.transpose(-1, -2)
        for start, end in slices
    ]
    return torch.cat(dots, dim=2).squeeze(-1), anchor.squeeze(2).norm(dim=-1)


def _slot_slices(keys: torch.Tensor) -> list[tuple[int, int]]:
    """Slot ranges whose float32 copy of ``keys [B, H, S, D]`` stays within ``base.TEMPORARY_SLICE_ELEMENTS``."""
    B, H, S, D = keys.shape
    step = max(1, base.TEMPORARY_SLICE_ELEMENTS // (B * H * D))
    return [(start, min(start + step, S)) for start in range(0, S, step)]
