"""Generated problems and the reading of an answer from a solution."""

import re

import pytest

from epikv_triton.quality.problems import extract_answer, make_problems


@pytest.mark.parametrize(
    "text, answer",
    [
        ("4 + 3 = 7. 7 + 5 = 12.\nAnswer: 12", 12),
        ("Answer: 12\nThen 5 more.", 12),  # the marker's line wins over later numbers
        ("The answer is 20 - 8 = 12.", 12),  # the last integer on the marker's line
        ("Step one gives 7, the answer: 1,250 apples", 1250),  # thousands separators
        ("first answer: 3\nsecond ANSWER: 9", 9),  # the last marker, any case
        ("Answer:\n42", 42),  # nothing on the marker's line: the last integer of the text
        ("So 3 + 4 = 7", 7),  # no marker
        ("The answer is unclear.", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_problems_are_seeded_and_their_answers_follow_from_the_question():
    pairs = make_problems(6, seed=4)
    assert pairs == make_problems(6, seed=4) and pairs != make_problems(6, seed=5)
    for example, problem in pairs:
        for item in (example, problem):
            numbers = [int(n) for n in re.findall(r"\d+", item.question)]
            assert sum(numbers) == item.answer
            assert extract_answer(item.solution) == item.answer
        assert example.question.count("Add") == problem.question.count("Add") in (2, 3)
    assert [problem.question.count("Add") for _, problem in make_problems(3, seed=0, steps=(4,))] == [4, 4, 4]
