"""Across tasks: each method's verdicts against the references, counted, and the method the suite picks.

A verdict is one (task, metric, reference) comparison at one budget: ``better``, ``tie`` or ``worse`` by the
paired interval (:func:`.statistics.verdict`). The pick at a budget is the method that is never worse and better
most often; when every method is worse somewhere, the one worse least often, then better most often. A tie on
both counts goes to the method registered first, so a method must beat an earlier one to displace it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .harness import REFERENCES, TaskResult
from .report import Row

VERDICTS = ("better", "tie", "worse")


@dataclass
class Standing:
    """One method's verdicts at one budget, over every task, metric and reference."""

    method: str
    fraction: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    worse_on: list[str] = field(default_factory=list)  # "task metric vs reference" of each worse verdict

    @property
    def rank_key(self) -> tuple[int, int]:
        return self.counts["worse"], -self.counts["better"]


def standings(summaries: Sequence[tuple[TaskResult, list[Row]]]) -> dict[float, list[Standing]]:
    """Per budget fraction, each compared method's :class:`Standing`, best first (the references are left out:
    each is only compared with the other)."""
    table: dict[tuple[str, float], Standing] = {}
    for result, rows in summaries:
        for row in rows:
            policy = row.policy
            if policy.fraction is None or policy.method in REFERENCES:
                continue
            standing = table.setdefault((policy.method, policy.fraction), Standing(policy.method, policy.fraction))
            for reference, comparison in row.versus.items():
                standing.counts[comparison.verdict] += 1
                if comparison.verdict == "worse":
                    standing.worse_on.append(f"{result.task} {row.metric.name} vs {reference}")
    by_fraction: dict[float, list[Standing]] = {}
    for standing in table.values():  # in the order the rows list the methods: the registry's
        by_fraction.setdefault(standing.fraction, []).append(standing)
    return {fraction: sorted(group, key=lambda s: s.rank_key) for fraction, group in sorted(by_fraction.items())}


def pick(ranked: Sequence[Standing]) -> Standing:
    """The suite's choice among ``ranked`` (one budget's standings, best first)."""
    if not ranked:
        raise ValueError("no method besides the references was compared")
    return ranked[0]


def standings_table(ranked_by_fraction: dict[float, list[Standing]]) -> str:
    """One tabulate table per budget: each method's counts of verdicts, best first, with the pick named."""
    from tabulate import tabulate

    blocks = []
    for fraction, ranked in ranked_by_fraction.items():
        rows = [[s.method, *(s.counts[v] for v in VERDICTS), "; ".join(s.worse_on) or "-"] for s in ranked]
        title = (f"standings at {100 * fraction:g}%: verdicts against {' and '.join(REFERENCES)} over every task "
                 f"and metric, never worse first, then most often better; the suite picks {pick(ranked).method}")
        blocks.append(title + "\n" + tabulate(rows, headers=["method", *VERDICTS, "worse on"], disable_numparse=True))
    return "\n\n".join(blocks)


def as_json(ranked_by_fraction: dict[float, list[Standing]]) -> list[dict]:
    return [
        {"fraction": fraction, "pick": pick(ranked).method,
         "methods": [{"method": s.method, **s.counts, "worse_on": s.worse_on} for s in ranked]}
        for fraction, ranked in ranked_by_fraction.items()
    ]
