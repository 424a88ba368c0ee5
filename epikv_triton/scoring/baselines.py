"""The baselines that need no band or lag state (``docs/method.md`` section 4).

* ``knorm``: minus the mean key norm (low-norm keys are kept, as KnormPress).
* ``random``: uniform, hashed from the seed, the sequence and the position.
* ``streaming``: the position itself, so the kept set is the sink plus the
  most recent tokens (StreamingLLM). ``full`` shares it; it never evicts.
"""

from __future__ import annotations

import torch

from .base import AttentionView, ChunkInfo, Scorer


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
