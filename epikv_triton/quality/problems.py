"""Multi-step arithmetic problems generated from a seed, each with its integer answer and a worked solution,
and the reading of an answer back out of a model's own solution."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INSTRUCTION = "Solve the problem step by step. End with a line of the form 'Answer: <number>'."

# Chains of additions of one-digit numbers: a 135M-parameter model solves about half of the two-step ones and
# a third of the three-step ones with the full cache when a worked example of the same form comes first
# (mixing in subtraction drops it to a few percent), which leaves solved problems to measure what eviction
# takes away.
STEPS = (2, 3)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    solution: str  # a worked solution, one equation per step, ending in "Answer: <answer>"


def make_problem(steps: int, rng: random.Random) -> Problem:
    """Start from a number and add ``steps`` more, one-digit numbers throughout."""
    value = rng.randint(2, 9)
    words, equations = [f"Start with {value}."], []
    for _ in range(steps):
        amount = rng.randint(1, 9)
        words.append(f"Add {amount}.")
        equations.append(f"{value} + {amount} = {value + amount}.")
        value += amount
    return Problem(" ".join(words) + " What is the result?", value, " ".join(equations) + f"\nAnswer: {value}")


def make_problems(count: int, seed: int, steps: tuple[int, ...] = STEPS) -> list[tuple[Problem, Problem]]:
    """``count`` pairs (worked example, problem) of the same number of steps, the step counts taken in turn."""
    rng = random.Random(f"problems/{seed}")
    pairs = []
    for index in range(count):
        length = steps[index % len(steps)]
        pairs.append((make_problem(length, rng), make_problem(length, rng)))
    return pairs


# A number with thousands separators ("1,250"), or plain digits. Every answer here is a non-negative integer,
# so a minus sign is read as subtraction ("20 -8"), never as part of a number.
_INTEGER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")
_ANSWER_MARKER = re.compile(r"answer", re.IGNORECASE)


def extract_answer(text: str) -> int | None:
    """The integer a worked solution gives as its answer, ``None`` when it states none.

    The last integer on the line of the last "answer" marker (any case: "Answer: 12", "the answer is
    20 - 8 = 12"), otherwise the last integer of the whole text.
    """
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        line = text[markers[-1].end() :].split("\n", 1)[0]
        on_line = _INTEGER.findall(line)
        if on_line:
            return int(on_line[-1].replace(",", ""))
    found = _INTEGER.findall(text)
    return int(found[-1].replace(",", "")) if found else None
