"""The suite's pick across tasks, on results whose verdicts can be read off by hand."""

import json

import pytest

from epikv_triton.quality import report, standings
from epikv_triton.quality.harness import Metric, Policy, Scores, TaskResult

RECALL = Metric("recall", True, "higher is better")
GAP = Metric("nll_gap", False, "lower is better")


def task(name, metric, per_method, fraction=0.25):
    """A task whose every case gives each method the listed value (constant per method: zero-width intervals,
    so every nonzero difference is a verdict)."""
    cases = 4
    scores = [Scores(Policy("full", None), [10] * cases, {metric.name: [1.0] * cases})]
    scores += [Scores(Policy(method, fraction), [3] * cases, {metric.name: [value] * cases})
               for method, value in per_method.items()]
    result = TaskResult(name, (metric,), [{}] * cases, scores)
    return result, report.summarize(result)


def test_never_worse_beats_more_wins_with_a_loss():
    summaries = [
        task("retrieval", RECALL, {"random": 0.2, "streaming": 0.4, "steady": 0.4, "spiky": 0.9}),
        task("text", GAP, {"random": 0.3, "streaming": 0.2, "steady": 0.1, "spiky": 0.25}),
    ]
    ranked = standings.standings(summaries)[0.25]
    assert [s.method for s in ranked] == ["steady", "spiky"]
    steady, spiky = ranked
    # steady: recall ties streaming, beats random; gap beats both.
    assert steady.counts == {"better": 3, "tie": 1, "worse": 0} and steady.worse_on == []
    # spiky: recall beats both; gap beats random, loses to streaming.
    assert spiky.counts == {"better": 3, "tie": 0, "worse": 1}
    assert spiky.worse_on == ["text nll_gap vs streaming"]
    assert standings.pick(ranked).method == "steady"


def test_when_every_method_loses_somewhere_the_fewest_losses_win_then_the_registry_order():
    ranked = standings.standings([
        task("text", GAP, {"random": 0.2, "streaming": 0.2, "first": 0.3, "second": 0.3, "worst": 0.1}),
        task("reasoning", GAP, {"random": 0.2, "streaming": 0.2, "first": 0.1, "second": 0.1, "worst": 0.5}),
    ])[0.25]
    # first and second: worse twice, better twice; worst: better twice, worse twice as well -> order kept.
    assert [s.method for s in ranked] == ["first", "second", "worst"]
    ranked = standings.standings([
        task("text", GAP, {"random": 0.2, "streaming": 0.2, "first": 0.3, "second": 0.25}),
        task("reasoning", GAP, {"random": 0.2, "streaming": 0.3, "first": 0.3, "second": 0.1}),
    ])[0.25]
    assert [(s.method, s.counts["worse"]) for s in ranked] == [("second", 2), ("first", 3)]


def test_each_budget_is_ranked_alone_and_references_and_full_are_left_out():
    summaries = [
        task("text", GAP, {"random": 0.3, "streaming": 0.2, "a": 0.1, "b": 0.5}, fraction=0.25),
        task("text", GAP, {"random": 0.3, "streaming": 0.2, "a": 0.5, "b": 0.1}, fraction=0.5),
    ]
    ranked = standings.standings(summaries)
    assert list(ranked) == [0.25, 0.5]
    assert [s.method for s in ranked[0.25]] == ["a", "b"] and [s.method for s in ranked[0.5]] == ["b", "a"]
    table = standings.standings_table(ranked)
    assert "standings at 25%" in table and "the suite picks a" in table and "the suite picks b" in table
    saved = json.loads(json.dumps(standings.as_json(ranked)))
    assert [(entry["fraction"], entry["pick"]) for entry in saved] == [(0.25, "a"), (0.5, "b")]
    assert saved[0]["methods"][1] == {"method": "b", "better": 0, "tie": 0, "worse": 2,
                                      "worse_on": ["text nll_gap vs random", "text nll_gap vs streaming"]}


def test_a_run_of_references_only_has_no_standings_and_no_pick():
    assert standings.standings([task("text", GAP, {"random": 0.3, "streaming": 0.2})]) == {}
    with pytest.raises(ValueError, match="no method besides the references"):
        standings.pick([])
