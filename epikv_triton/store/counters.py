"""The stream's counters: four shared by the batch, one tally set per sequence.

:class:`StreamCounters` hides where its values live. An eager chunk advances
them on the host, which is authoritative, and mirrors them to a device tensor
(a small host-to-device copy, nothing waits). A chunk traced by
``torch.compile`` must read nothing from Python that changes per step, so it
advances the device tensor in place and leaves the host copy stale; the next
host read fetches it back once.

:class:`SequenceCounters` are device tensors on every path: ``[B]`` per
sequence, updated in place.
"""

from __future__ import annotations

import torch

from .._static import static_address


class StreamCounters:
    """``fill`` (slots in use between chunks), ``stream_length`` (tokens per sequence so far, padding included:
    the mask's width), ``peak_fill`` and ``eviction_passes``; see the module docstring."""

    def __init__(self) -> None:
        self._host = [0, 0, 0, 0]  # fill, stream_length, peak_fill, eviction_passes
        self._device: torch.Tensor | None = None  # [4] int64, the same order
        self.host_stale = False

    @property
    def fill(self) -> int:
        return self._read(0)

    @property
    def stream_length(self) -> int:
        return self._read(1)

    @property
    def peak_fill(self) -> int:
        return self._read(2)

    @property
    def eviction_passes(self) -> int:
        return self._read(3)

    def _read(self, index: int) -> int:
        self.sync_host()
        return self._host[index]

    # ------------------------------------------------------------------ eager
    def advance(self, fill: int, num_tokens: int) -> None:
        """An eager chunk of ``num_tokens`` ended with ``fill`` slots in use."""
        self.sync_host()
        _, stream_length, peak_fill, passes = self._host
        self._host = [fill, stream_length + num_tokens, max(peak_fill, fill), passes]

    def evicted(self, fill: int) -> None:
        """An eager eviction left ``fill`` slots in use."""
        self.sync_host()
        self._host[0] = fill
        self._host[3] += 1

    def publish(self, device: torch.device) -> None:
        """Mirror the host values to the device tensor a compiled step reads."""
        values = torch.tensor(self._host)
        if self._device is None:
            self._device = static_address(values.to(device))
        else:
            self._device.copy_(values, non_blocking=True)

    def sync_host(self) -> None:
        """Read back what compiled steps advanced on the device (one sync); a no-op otherwise."""
        if not self.host_stale:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "the EpiKV cache's host counters (fill, tokens seen) cannot be read inside a compiled step: "
                "read them, or the cache's stats, between steps"
            )
        self._host = self._device.tolist()
        self.host_stale = False

    # --------------------------------------------------------------- compiled
    def begin_on_device(self) -> torch.Tensor:
        """The fill as a 0-d device tensor, for a compiled chunk (after an eager first chunk). From here on the
        host copy is stale: a host read inside the compiled step raises instead of baking in a constant."""
        self.host_stale = True
        return self._device[0]

    def advance_on_device(
        self, end: torch.Tensor, num_tokens: int, due: torch.Tensor, fill_after_eviction: int
    ) -> None:
        """A compiled chunk of ``num_tokens`` ended with ``end`` slots in use, evicting down to
        ``fill_after_eviction`` where the device flag ``due`` holds."""
        _, stream_length, peak_fill, passes = self._device.unbind()
        self._device.copy_(
            torch.stack([
                torch.where(due, fill_after_eviction, end), stream_length + num_tokens,
                torch.maximum(peak_fill, end), passes + due.long(),
            ])
        )


class SequenceCounters:
    """Per sequence ``[B]``, on the device: real tokens ``seen``, whether the last token seen was real
    (``last_valid``), ``tokens_evicted`` and ``slots_moved`` (slots compaction moved, all evictions together)."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.seen, self.tokens_evicted, self.slots_moved = (
            static_address(torch.zeros(batch, dtype=torch.int64, device=device)) for _ in range(3)
        )
        self.last_valid = static_address(torch.zeros(batch, dtype=torch.bool, device=device))

    @property
    def batch(self) -> int:
        return self.seen.shape[0]

    def count_tokens(self, valid: torch.Tensor) -> None:
        """A chunk's ``valid [B, T]`` real tokens have been stored."""
        self.last_valid.copy_(valid[:, -1])
        self.seen += valid.sum(dim=1)

    def count_eviction(self, evicted: torch.Tensor, moved: torch.Tensor) -> None:
        self.tokens_evicted += evicted
        self.slots_moved += moved
