"""Retrieval: a key stated once inside a long haystack, asked for at the end.

The prompt is plain text (no chat template) and is read through the bounded cache two ways, each its own
metric:

- ``whole``: in one forward, compressed once at its end, so the question is among the queries a scorer
  reads (SnapKV's setting for long prompts; the cache briefly holds the whole prompt);
- ``streamed``: ``chunk`` tokens at a time, compressed as it is read (peak memory bounded by the budget
  plus a chunk), so whether the key survives is decided before the question arrives.

A case is recalled when the greedy answer contains the key. Every prompt of a given length has exactly that
many tokens, so cases batch without padding.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass

from . import corpora
from .harness import Metric, Policy, Runner, Scores, TaskResult, batches, progress, token_budget

#: How the prompt is read, and the metric of each way.
READS = {
    "whole": Metric(
        "whole_recall", True,
        "fraction of cases whose greedy answer contains the key; prompt read in one forward, compressed at its end",
    ),
    "streamed": Metric(
        "streamed_recall", True,
        "fraction of cases whose greedy answer contains the key; prompt read and compressed a chunk at a time",
    ),
}

_LABELS = {"number": "number", "word": "word", "identifier": "identifier"}


@dataclass(frozen=True)
class Settings:
    haystacks: tuple[str, ...] = corpora.HAYSTACKS
    key_kinds: tuple[str, ...] = corpora.KEY_KINDS
    depths: tuple[float, ...] = (0.25, 0.75)  # where the needle sits, as a fraction of the haystack
    lengths: tuple[int, ...] = (512, 1024)  # prompt tokens
    answer_tokens: int = 12
    reads: tuple[str, ...] = tuple(READS)

    def __post_init__(self):
        unknown = [read for read in self.reads if read not in READS]
        if unknown or not self.reads:
            raise ValueError(f"reads must name some of {', '.join(READS)}, got {self.reads}")

    @classmethod
    def quick(cls) -> Settings:
        return cls(lengths=(384,))


@dataclass(frozen=True)
class Case:
    haystack: str
    key_kind: str
    key: str
    depth: float
    input_ids: tuple[int, ...]
    needle_at: int  # index in input_ids of the needle's first token

    def describe(self) -> dict:
        described = asdict(self)
        described["length"] = len(described.pop("input_ids"))
        return described


def phrases(key_kind: str, key: str) -> tuple[str, str, str]:
    """The needle, the question and the start of the answer for a key of ``key_kind``.

    Quoting the key (and opening the quote in the answer) lifted SmolLM2's full-cache recall of 1024-token
    prompts from 24/27 to 27/27 against the same sentences unquoted.
    """
    label = _LABELS[key_kind]
    return (
        f'\nThe secret {label} is "{key}". Remember it: the secret {label} is "{key}".\n',
        f"\n\nWhat is the secret {label} mentioned in the text above?",
        f'\nThe secret {label} is "',
    )


def build_case(tokenizer, units: list[str], haystack: str, key_kind: str, depth: float, length: int,
               rng: random.Random) -> Case:
    """A prompt of exactly ``length`` tokens: the haystack ``units`` from a random point on, the needle at the
    unit boundary nearest to ``depth`` of the haystack, then the question and the start of the answer."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = corpora.make_key(key_kind, rng)
    needle, question, answer = (tokenizer(p, add_special_tokens=False)["input_ids"] for p in phrases(key_kind, key))
    prefix = tokenizer("")["input_ids"]  # the tokenizer's BOS, if it adds one
    room = length - len(prefix) - len(needle) - len(question) - len(answer)
    if room < 16:
        raise ValueError(f"a {length}-token prompt leaves no room for a haystack around the needle and question")
    stream, starts = corpora.token_stream(tokenizer, units, room, start=rng.randrange(len(units)))
    haystack_ids, at = insert_needle(stream, starts, needle, depth)
    return Case(haystack, key_kind, key, depth, tuple(prefix + haystack_ids + question + answer), len(prefix) + at)


def insert_needle(stream: list[int], starts: list[int], needle: list[int], depth: float) -> tuple[list[int], int]:
    """``stream`` with ``needle`` inserted at the unit start (or the end) nearest to ``depth`` of its length,
    and where the needle begins."""
    at = min([*starts, len(stream)], key=lambda start: abs(start - depth * len(stream)))
    return stream[:at] + needle + stream[at:], at


def build_cases(tokenizer, settings: Settings, seed: int) -> list[Case]:
    """One case per haystack x depth x length; key kinds taken in turn, each case drawn from its own seed."""
    units = {kind: corpora.units(kind, seed) for kind in settings.haystacks}
    grid = itertools.product(settings.haystacks, settings.depths, settings.lengths)
    return [
        build_case(tokenizer, units[haystack], haystack, settings.key_kinds[index % len(settings.key_kinds)], depth,
                   length, random.Random(f"retrieval/{seed}/{index}"))
        for index, (haystack, depth, length) in enumerate(grid)
    ]


def recalled(answer: str, key: str) -> bool:
    """Whether ``answer`` states ``key`` as a whole token (any case): "48213" is not found in "148213"."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", answer, re.IGNORECASE) is not None


def run(runner: Runner, plan: list[Policy], settings: Settings, seed: int) -> TaskResult:
    cases = build_cases(runner.tokenizer, settings, seed)
    by_length = {}
    for index, case in enumerate(cases):
        by_length.setdefault(len(case.input_ids), []).append(index)
    groups = [(length, part) for length, indices in by_length.items() for part in batches(indices, runner.batch_size)]
    metrics = tuple(READS[read] for read in settings.reads)
    scores = []
    with progress(len(plan) * len(groups) * len(metrics), "retrieval", runner.show_progress) as bar:
        for policy in plan:
            bar.set_postfix_str(policy.label)
            recall = {metric.name: [None] * len(cases) for metric in metrics}
            budgets, answers = [0] * len(cases), [{} for _ in cases]
            for read in settings.reads:
                for length, indices in groups:
                    budget = token_budget(policy.fraction, length)
                    with runner.patched(policy, budget):
                        generated = runner.generate(
                            [cases[i].input_ids for i in indices], settings.answer_tokens,
                            prefill_chunk=length if read == "whole" else runner.chunk,
                        )
                    for i, tokens in zip(indices, generated):
                        answers[i][read], budgets[i] = runner.decode(tokens), budget
                        recall[READS[read].name][i] = float(recalled(answers[i][read], cases[i].key))
                    bar.update()
            scores.append(Scores(policy, budgets, recall, answers))
    return TaskResult("retrieval", metrics, [case.describe() for case in cases], scores)
