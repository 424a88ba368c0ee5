"""The suite: every chosen task over the same policies, on one model."""

from __future__ import annotations

import time
from collections.abc import Sequence

from . import reasoning, retrieval, text
from .harness import Runner, TaskResult, policies

TASKS = {"retrieval": retrieval, "reasoning": reasoning, "text": text}


def run_suite(
    runner: Runner, tasks: Sequence[str], methods: Sequence[str], fractions: Sequence[float], seed: int = 0,
    quick: bool = False,
) -> list[TaskResult]:
    """Run ``tasks`` (names in :data:`TASKS`) for ``methods`` at ``fractions`` of each case's context, plus
    ``full``, ``streaming`` and ``random``; ``quick`` takes each task's smaller settings."""
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    plan = policies(methods, fractions)
    runner.check(plan)
    results = []
    for name in tasks:
        task = TASKS[name]
        start = time.perf_counter()
        result = task.run(runner, plan, task.Settings.quick() if quick else task.Settings(), seed)
        result.seconds = time.perf_counter() - start
        results.append(result)
    return results
