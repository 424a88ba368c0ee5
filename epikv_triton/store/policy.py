"""What a slot store keeps and when: prompt protection, capacity, the eviction cadence and plan.

Transformers-free and tensor-light: the policy decides, the buffers and the
chunks act. Capacity is ``budget + evict_every`` slots, enough for decoding
and for any chunk of at most ``evict_every`` tokens; ``budget + C`` when the
first chunk (``C`` tokens) is the first of a prompt read in chunks (the
declared prompt is longer than it); ``budget + max(C, evict_every)`` when the
caller names its chunk length ``C`` up front (``chunk_size``). A chunk longer
than any planned for grows the buffers once, to exactly what it needs.
``full`` allocates the expected stream length when it is known, and otherwise
grows geometrically.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..config import EpiKVConfig


class RetentionPolicy:
    """The decisions of one stream; :meth:`reset` starts a new one.

    ``declared_prompt_lengths``: real prompt tokens per sequence when the caller
    knows them (``generate`` does; one length serves every sequence); otherwise
    the first chunk is the prompt. ``expected_length``: tokens per sequence the
    caller expects to stream, a bound for the prompt check and ``full``'s size.
    ``chunk_size``: the longest chunk the caller will feed.
    """

    def __init__(
        self,
        config: EpiKVConfig,
        declared_prompt_lengths: Sequence[int] | None = None,
        expected_length: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        positive_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1
        if chunk_size is not None and not positive_int:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.config = config
        self.expected_length = expected_length
        self.chunk_size = chunk_size
        self.declared_prompt_lengths = (
            None if declared_prompt_lengths is None else [int(n) for n in declared_prompt_lengths]
        )
        self.reset()
        if self.declared_prompt_lengths is not None:
            self.check_prompt(expected_length)  # up front when the caller says how long the stream gets

    def reset(self) -> None:
        self.prompt_lengths = self.declared_prompt_lengths
        self._protected_prefix: torch.Tensor | None = None
        self._prompt_checked = False

    # ------------------------------------------------------------------ prompt
    def fit_declared_prompts(self, batch: int) -> None:
        """One declared length serves every sequence of the first chunk's batch."""
        declared = self.declared_prompt_lengths
        if declared is None or len(declared) == batch:
            return
        if len(declared) != 1:
            raise ValueError(f"{len(declared)} prompt lengths were declared for a batch of {batch} sequences")
        self.prompt_lengths = declared * batch

    def check_prompt(self, stream_end: int | None, positions: torch.Tensor | None = None) -> None:
        """``keep_prompt=True`` keeps the whole prompt and the recent window once evictions start: refuse
        a prompt that leaves them no room, but only when the stream may outgrow the budget (``stream_end``
        tokens per sequence; ``None``: no bound known), so a budget that holds everything runs any prompt
        (``expected_length`` is then a promise: a chunk that passes the budget is checked, eagerly).
        Without a declared prompt, the first chunk (``positions``) is the prompt: one host read."""
        config = self.config
        if self._prompt_checked or not (config.keep_prompt and config.evicts):
            return
        if stream_end is not None and stream_end <= config.budget:
            return
        prompt_lengths = self.prompt_lengths
        if prompt_lengths is None:
            prompt_lengths = (positions >= 0).sum(dim=1).tolist()
        check_prompt_fits(config, prompt_lengths)
        self._prompt_checked = True

    def record_prompt(self, seen: torch.Tensor) -> None:
        """After the first chunk: without a declared prompt, that chunk was the prompt (``seen [B]``). The
        protected prefix is made now, on the device, so a compiled step finds it."""
        if self.prompt_lengths is None:
            self.prompt_lengths = seen.tolist()
        if self.config.keep_prompt:
            self.protected_prefix(seen.device)

    def protected_prefix(self, device: torch.device) -> int | torch.Tensor:
        """Positions below this are always kept: the prompt lengths ``[B]`` as a device tensor made once per
        stream under ``keep_prompt`` (no host-to-device copy per eviction; :meth:`check_prompt` vetted them),
        otherwise the ``sink`` tokens."""
        if not self.config.keep_prompt:
            return self.config.sink
        if self._protected_prefix is None:
            self._protected_prefix = torch.tensor(self.prompt_lengths, dtype=torch.int64, device=device)
        return self._protected_prefix

    # ---------------------------------------------------------------- capacity
    def capacity_for(self, fill: int, num_tokens: int, first_chunk: torch.Tensor | None = None) -> int:
        """Slots to allocate (or grow to) for a chunk of ``num_tokens`` after ``fill`` slots in use.
        ``first_chunk``: the real tokens ``valid [B, T]`` of the stream's first chunk, at the first allocation
        (a prompt read in chunks then gets room for its later chunks); ``None`` when growing."""
        needed = fill + num_tokens
        config = self.config
        if config.evicts:
            room = max(config.evict_every, self.chunk_size or 0)
            if first_chunk is not None and self._prompt_continues(first_chunk):
                room = max(room, num_tokens)  # every later chunk of the read fits beside the budget
            return max(config.budget + room, needed)
        if self.expected_length is not None and self.expected_length >= needed:
            return self.expected_length
        return max(2 * needed, 64)

    def _prompt_continues(self, chunk_valid: torch.Tensor) -> bool:
        """The declared prompt of some sequence is longer than its real tokens in the first chunk: the prompt
        is being read in chunks. One host read, at the first allocation only."""
        if self.prompt_lengths is None:
            return False  # undeclared: the first chunk is the prompt
        in_chunk = chunk_valid.sum(dim=1).tolist()
        return any(declared > read for declared, read in zip(self.prompt_lengths, in_chunk))

    # ---------------------------------------------------------------- eviction
    def eviction_due(self, fill: int) -> bool:
        """The cadence: evict once ``budget + evict_every`` slots are in use."""
        return self.config.evicts and fill >= self.config.budget + self.config.evict_every

    def plan(
        self, pos: torch.Tensor, scores: torch.Tensor, fill_after: int, largest_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which of the slots ``pos``/``scores [B, used]`` stay: the kept mask ``[B, used]``, the real tokens
        before ``[B]`` and the compaction plan ``[B, used - fill_after]`` (see :func:`ops.compaction_plan`).
        ``largest_values [B, used]`` (each slot's largest value norm) chooses the value reserve, when the
        config has one."""
        config = self.config
        protect = self.protected_prefix(pos.device)
        keep = ops.select_slots(
            scores, pos, config.budget, protect_prefix=protect, recent=config.recent, reserve=config.value_reserve,
            reserve_scores=largest_values,
        )
        return keep, (pos >= 0).sum(dim=1), ops.compaction_plan(keep, fill_after)


def check_prompt_fits(config: EpiKVConfig, prompt_lengths: Sequence[int]) -> None:
    """``keep_prompt=True`` keeps every prompt token and the recent window: both must fit the budget."""
    longest = max(prompt_lengths, default=0)
    if longest + config.recent > config.budget:
        raise ValueError(
            f"keep_prompt=True keeps the whole prompt, but the longest prompt ({longest} tokens) plus the recent "
            f"window ({config.recent}) exceeds the budget ({config.budget}): raise the budget, or pass "
            "keep_prompt=False (keeps only the first sink tokens) to read a long prompt with bounded memory"
        )
