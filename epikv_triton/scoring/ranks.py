"""The tensor-parallel ranks one stream is split over: each holds some KV heads, and all must keep the same tokens.

Under tensor parallelism every rank sees the same tokens and the same residual stream (up to the rounding of
the all-reduces after ``o_proj`` and ``down_proj``), but only its own KV heads. A score averaged over KV heads is
then a per-rank share, and even a score of the residual stream can differ in its last bits between ranks; a rank
that selected from its own scores would keep its own tokens. :meth:`RankGroup.mean` is the one exchange: every
rank's values are gathered and averaged in rank order, so each rank computes the same bits from the same inputs
(which an all-reduce promises only in practice). Each rank holds the same number of KV heads, so the mean over
ranks of each rank's mean over its heads is the mean over every head.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RankGroup:
    """The ranks of ``group`` (a ``torch.distributed`` process group of tensor-parallel ranks), or one process
    when ``group`` is ``None``. ``bytes_received`` counts what :meth:`mean` and :meth:`max` gathered from the
    other ranks."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.bytes_received = 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` averaged over the ranks, bit-identical on every rank; ``x`` itself on one process.

        One all-gather of ``x`` (``(size − 1) · x.numel()`` elements received), then the sum in rank order:
        every rank runs the same additions on the same gathered values.
        """
        if self.size == 1:
            return x
        parts = self._gather(x)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total / self.size

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``x`` over the ranks (exact, so the same on every rank and equal to the
        maximum over every head on one device); ``x`` itself on one process. One all-gather, as :meth:`mean`."""
        if self.size == 1:
            return x
        return torch.stack(self._gather(x)).amax(dim=0)

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self.bytes_received += (self.size - 1) * x.numel() * x.element_size()
        return parts


#: One process: :meth:`RankGroup.mean` returns its argument and counts nothing.
SINGLE_PROCESS = RankGroup()
