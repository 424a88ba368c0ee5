"""Haystacks, needles and recall."""

import random
from contextlib import contextmanager

import pytest

from epikv_triton.quality import corpora, retrieval
from epikv_triton.quality.harness import Runner, policies, token_budget


@pytest.mark.parametrize(
    "answer, key, found",
    [
        (" 48213. Remember", "48213", True),
        (" 148213", "48213", False),  # a longer number is not the key
        (' "Falcon".', "falcon", True),  # any case, quotes around it
        (" falconry", "falcon", False),
        (" rocket_lemon_42 is", "rocket_lemon_42", True),
        (" rocket_lemon_421", "rocket_lemon_42", False),
        (" the secret word", "falcon", False),
    ],
)
def test_recalled(answer, key, found):
    assert retrieval.recalled(answer, key) is found


@pytest.mark.parametrize("depth, at", [(0.0, 0), (0.3, 3), (0.5, 6), (0.75, 6), (0.85, 10), (1.0, 10)])
def test_needle_goes_to_the_nearest_unit_start(depth, at):
    stream, starts = list(range(10)), [0, 3, 6]  # units of 3, 3 and 4 tokens
    placed, where = retrieval.insert_needle(stream, starts, [-1, -2], depth)
    assert where == at and placed == stream[:at] + [-1, -2] + stream[at:]


@pytest.mark.parametrize("haystack", corpora.HAYSTACKS)
def test_case_has_its_length_its_needle_at_its_depth_and_is_seeded(char_tokenizer, haystack):
    units = corpora.units(haystack, seed=0)
    case = retrieval.build_case(char_tokenizer, units, haystack, "identifier", 0.4, 1500, random.Random(1))
    assert len(case.input_ids) == 1500
    needle, _, answer = (char_tokenizer(phrase)["input_ids"] for phrase in retrieval.phrases("identifier", case.key))
    assert list(case.input_ids[case.needle_at : case.needle_at + len(needle)]) == needle
    assert list(case.input_ids[-len(answer) :]) == answer
    # Characters are tokens here: the needle sits at a unit start within half the longest unit of the target.
    room = 1500 - sum(len(phrase) for phrase in retrieval.phrases("identifier", case.key))
    assert abs(case.needle_at - 0.4 * room) <= max(len(unit) for unit in units) / 2 + 1
    again = retrieval.build_case(char_tokenizer, units, haystack, "identifier", 0.4, 1500, random.Random(1))
    other = retrieval.build_case(char_tokenizer, units, haystack, "identifier", 0.4, 1500, random.Random(2))
    assert again == case and other.input_ids != case.input_ids


def test_cases_cover_the_grid_with_every_key_kind(char_tokenizer):
    settings = retrieval.Settings(depths=(0.2, 0.8), lengths=(300, 400))
    cases = retrieval.build_cases(char_tokenizer, settings, seed=0)
    assert [(c.haystack, c.depth, len(c.input_ids)) for c in cases] == [
        (h, d, n) for h in corpora.HAYSTACKS for d in (0.2, 0.8) for n in (300, 400)
    ]
    assert {c.key_kind for c in cases} == set(corpora.KEY_KINDS)


def test_a_prompt_too_short_for_the_question_is_refused(char_tokenizer):
    with pytest.raises(ValueError, match="no room"):
        retrieval.build_case(char_tokenizer, corpora.units("filler", 0), "filler", "number", 0.5, 100, random.Random(0))


@pytest.mark.parametrize("kind", corpora.KEY_KINDS)
def test_keys(kind):
    key = corpora.make_key(kind, random.Random(0))
    assert key == corpora.make_key(kind, random.Random(0))
    assert {"number": key.isdigit() and len(key) == 5, "word": key in corpora.WORDS,
            "identifier": key.count("_") == 2 and key[-2:].isdigit()}[kind]


class ReadsRecorder(Runner):
    """A runner without a model: answers with a case's key only when its prompt is read in one forward, and
    records each call's budget and prefill chunk."""

    def __init__(self, tokenizer, cases):
        super().__init__(model=None, tokenizer=tokenizer, chunk=16, batch_size=4, show_progress=False)
        self.keys = {case.input_ids: case.key for case in cases}
        self.calls = []

    @contextmanager
    def patched(self, policy, budget):
        self.budget = budget
        yield

    def generate(self, prompts, new_tokens, prefill_chunk=None):
        self.calls.append((self.budget, len(prompts), len(prompts[0]), prefill_chunk))
        whole = prefill_chunk == len(prompts[0])
        return [self.tokenizer(f" {self.keys[tuple(prompt)] if whole else 'lost'}.")["input_ids"] for prompt in prompts]


def test_each_read_is_its_own_metric_over_the_same_cases(char_tokenizer):
    # Keys the character tokenizer spells back (it has no underscore for identifiers).
    settings = retrieval.Settings(key_kinds=("number", "word"), depths=(0.5,), lengths=(300, 400))
    runner = ReadsRecorder(char_tokenizer, retrieval.build_cases(char_tokenizer, settings, seed=0))
    plan = policies(["tova"], [0.25])
    result = retrieval.run(runner, plan, settings, seed=0)
    assert [m.name for m in result.metrics] == ["whole_recall", "streamed_recall"]
    for scores in result.scores:
        assert scores.values == {"whole_recall": [1.0] * 6, "streamed_recall": [0.0] * 6}
        assert [set(answer) for answer in scores.outputs] == [{"whole", "streamed"}] * 6
        assert scores.budgets == [token_budget(scores.policy.fraction, n) for n in (300, 400) * 3]
    # Per policy: both reads of each length group (3 cases each, one batch): whole prompt, then 16-token chunks.
    per_policy = [(300, 3, 300, 300), (400, 3, 400, 400), (300, 3, 300, 16), (400, 3, 400, 16)]
    expected = [(token_budget(p.fraction, n), b, n, chunk) for p in plan for _, b, n, chunk in per_policy]
    assert runner.calls == expected


def test_reads_are_checked():
    with pytest.raises(ValueError, match="reads must name some of whole, streamed"):
        retrieval.Settings(reads=("whole", "sideways"))
    with pytest.raises(ValueError, match="reads must name"):
        retrieval.Settings(reads=())
    assert retrieval.Settings(reads=("streamed",)).reads == ("streamed",)
