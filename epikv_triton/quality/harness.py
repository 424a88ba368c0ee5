"""What every task shares: the policies a run compares, the per-case scores it records, and the model calls
(bounded by a patch, batched, prompts read in chunks) it makes.

A *policy* is a method at a budget given as a fraction of each case's context; ``full`` has no budget.
The model is patched for one policy at a time and unpatched after, so the unpatched model is the reference
that ``full`` must match.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .. import evaluation, loading

#: Baselines every run includes: ``full`` (what the model can do at all) and the two references that every
#: other method's difference is reported against.
FULL = "full"
REFERENCES = ("random", "streaming")


@dataclass(frozen=True)
class Metric:
    """What a task measures per case; ``description`` says how, for the table's title."""

    name: str
    higher_is_better: bool
    description: str


@dataclass(frozen=True)
class Policy:
    """A method at a budget, given as a fraction of each case's context (``None`` for ``full``)."""

    method: str
    fraction: float | None

    @property
    def budget_label(self) -> str:
        return "-" if self.fraction is None else f"{100 * self.fraction:g}%"

    @property
    def label(self) -> str:
        return self.method if self.fraction is None else f"{self.method} {self.budget_label}"


@dataclass
class Scores:
    """One policy's per-case values of each metric (``None``: the metric does not apply to that case)."""

    policy: Policy
    budgets: list[int]  # the token budget of each case
    values: dict[str, list[float | None]] = field(default_factory=dict)
    outputs: list[str | dict | None] | None = None  # the text each case generated (by way, if several)


@dataclass
class TaskResult:
    """Everything a task measured: its cases and each policy's scores on them."""

    task: str
    metrics: tuple[Metric, ...]
    cases: list[dict]  # what each case is, JSON-ready
    scores: list[Scores]
    notes: dict = field(default_factory=dict)  # task-level facts worth printing (full-cache accuracy, ...)
    seconds: float = 0.0  # wall time of the task, references included


def policies(methods: Sequence[str], fractions: Sequence[float]) -> list[Policy]:
    """``full`` once, then every other method at every fraction; ``full`` and the references are always in."""
    if not fractions:
        raise ValueError("give at least one budget fraction")
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"a budget is a fraction of the context in (0, 1], got {fraction}")
    others = [m for m in dict.fromkeys(methods) if m != FULL and m not in REFERENCES]
    return [Policy(FULL, None)] + [Policy(m, f) for f in sorted(set(fractions)) for m in (*REFERENCES, *others)]


def token_budget(fraction: float | None, context: int) -> int:
    """Tokens kept per sequence: ``fraction`` of ``context`` rounded half up, at least 1 (all of it for ``full``)."""
    return context if fraction is None else max(1, math.floor(fraction * context + 0.5))


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress(total: int, description: str, enabled: bool = True):
    """A progress bar on stderr (silent when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="run", file=sys.stderr, disable=not enabled, leave=False)


@dataclass
class Runner:
    """The model under test and how it is driven: prompts read ``chunk`` tokens at a time, ``batch_size``
    sequences per call; every policy with ``value_reserve`` slots (at most its budget) for the largest values."""

    model: torch.nn.Module
    tokenizer: object
    chunk: int = 32
    batch_size: int = 16
    show_progress: bool = True
    value_reserve: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def stop_ids(self) -> set[int]:
        """Tokens that end a generation (the model's generation config, else the tokenizer's EOS)."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    @contextmanager
    def patched(self, policy: Policy, budget: int):
        """The model bounded to ``budget`` tokens per sequence by ``policy.method`` for the ``with`` block.

        ``keep_prompt=False``: a long prompt is compressed like everything else (only the sink tokens are kept).
        """
        import epikv_triton

        epikv_triton.patch(
            self.model, budget=budget, method=policy.method, keep_prompt=False,
            value_reserve=min(self.value_reserve, budget),
        )
        try:
            yield
        finally:
            epikv_triton.unpatch(self.model)

    def check(self, plan: Sequence[Policy]) -> None:
        """Patch and unpatch the model once per method, so a method it cannot run (bands too deep for a shallow
        model, ...) fails before any work."""
        for method in dict.fromkeys(policy.method for policy in plan):
            with self.patched(Policy(method, None), budget=64):
                pass

    def bounded_cache(self, expected_length: int, prompt_lengths: Sequence[int] | None = None):
        """A fresh cache of the patched model for a forward loop over sequences of up to ``expected_length``
        tokens (``prompt_lengths``: the real prompt tokens of each sequence, when they start with a prompt)."""
        import epikv_triton

        prompts = None if prompt_lengths is None else list(prompt_lengths)
        return epikv_triton.new_cache(self.model, prompts, expected_length=expected_length, chunk_size=self.chunk)

    def left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[B, longest]`` of prompts padded on the left."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(
        self, prompts: Sequence[Sequence[int]], new_tokens: int, prefill_chunk: int | None = None
    ) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (one batch), each cut after its first stop token; the prompts read
        ``prefill_chunk`` tokens at a time (default ``chunk``)."""
        input_ids, attention_mask = self.left_padded(prompts)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                prefill_chunk_size=prefill_chunk or self.chunk, pad_token_id=self.pad_id,
            )
        stops = self.stop_ids()
        continuations = []
        for row in output[:, input_ids.shape[1] :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            continuations.append(row[:end])
        return continuations

    def forced(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache, scored_from: int,
        decode_from: int | None = None,
    ) -> evaluation.ForcedPass:
        """Teacher-forced read of ``tokens`` through ``cache`` (a plain cache when ``None``), scoring the columns
        from ``scored_from`` on: the first ``decode_from`` columns ``chunk`` at a time, the rest token by token."""
        if cache is None:
            cache = loading.plain_cache(self.model)
        return evaluation.forced_pass(
            self.model, tokens, cache, self.chunk, attention_mask, decode_from=decode_from, scored_from=scored_from
        )

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
