"""Each task end to end on a tiny random Llama: the structure of what it reports, and ``full`` equal to the
unpatched model (NLL gap 0, agreement 1), then the command line."""

import dataclasses
import json

import pytest

from epikv_triton import cli
from epikv_triton.quality import reasoning, report, retrieval, suite, text
from epikv_triton.quality.harness import Policy, Runner, policies

TASKS = {
    "retrieval": (retrieval, retrieval.Settings(depths=(0.5,), lengths=(300,), answer_tokens=4)),
    "reasoning": (reasoning, reasoning.Settings(problems=3, max_new_tokens=6)),
    "text": (text, text.Settings(windows=2, window=96)),
}


@pytest.fixture
def runner(tiny_llama, char_tokenizer):
    return Runner(tiny_llama, char_tokenizer, chunk=16, batch_size=2, show_progress=False)


@pytest.mark.parametrize("name", TASKS)
def test_task_end_to_end(runner, name):
    task, settings = TASKS[name]
    plan = policies(["h2o", "epikv"], [0.3])
    assert [p.method for p in plan] == ["full", "random", "streaming", "h2o", "epikv"]
    result = task.run(runner, plan, settings, seed=0)

    assert result.task == name and [s.policy for s in result.scores] == plan
    for scores in result.scores:
        assert set(scores.values) == {m.name for m in result.metrics}
        assert all(len(values) == len(result.cases) for values in scores.values.values())
        assert len(scores.budgets) == len(result.cases)
    full = result.scores[0].values
    if "nll_gap" in full:
        assert max(abs(gap) for gap in full["nll_gap"]) < 1e-5
        assert full["agreement"] == [1.0] * len(result.cases)
        bounded = result.scores[-1].values
        assert max(bounded["nll_gap"]) > 1e-3 and min(bounded["agreement"]) < 1  # eviction did change something

    rows = report.summarize(result)
    assert len(rows) == len(result.metrics) * len(plan)
    versus = {(row.metric.name, row.policy.method): set(row.versus) for row in rows}
    assert versus[(result.metrics[0].name, "full")] == set()
    assert versus[(result.metrics[0].name, "random")] == {"streaming"}
    assert versus[(result.metrics[0].name, "epikv")] == {"random", "streaming"}
    assert "vs streaming [95% CI]" in report.tables(result, rows)
    json.dumps(report.as_json(result, rows))


def test_full_retrieval_answers_are_the_unpatched_models(runner):
    cases = retrieval.build_cases(runner.tokenizer, TASKS["retrieval"][1], seed=0)
    prompts = [case.input_ids for case in cases]
    unpatched = runner.generate(prompts, 6)
    with runner.patched(Policy("full", None), 300):
        assert runner.generate(prompts, 6) == unpatched


def test_accuracy_counts_only_what_the_full_cache_solves(runner, monkeypatch):
    # A random model solves nothing; declare every answer 7 and make the even problems' answer 7.
    real = reasoning.make_problems

    def problems(count, seed, steps):
        return [(example, dataclasses.replace(problem, answer=7 + index % 2))
                for index, (example, problem) in enumerate(real(count, seed, steps))]

    monkeypatch.setattr(reasoning, "make_problems", problems)
    monkeypatch.setattr(reasoning, "extract_answer", lambda text: 7)
    settings = reasoning.Settings(problems=4, max_new_tokens=4)
    result = reasoning.run(runner, policies(["epikv"], [0.5]), settings, seed=0)
    assert result.notes["full_cache_solved"] == "2/4"
    for scores in result.scores:
        assert scores.values["accuracy"] == [1.0, None, 1.0, None]


def test_command_line_quick_run(model_folder, tmp_path, capsys):
    path = tmp_path / "quality.json"
    status = cli.main(["quality", "--model", str(model_folder), "--quick", "--method", "epikv", "--task", "text",
                       "--task", "retrieval", "--budget", "30%", "--json", str(path)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "retrieval: whole_recall" in printed and "retrieval: streamed_recall" in printed
    assert "text: nll_gap" in printed and "text: agreement" in printed
    written = json.loads(path.read_text())
    assert written["settings"]["fractions"] == [0.3] and written["settings"]["quick"] is True
    assert [task["task"] for task in written["tasks"]] == ["text", "retrieval"]
    methods = {(s["method"], s["fraction"]) for s in written["tasks"][0]["scores"]}
    assert methods == {("full", None), ("random", 0.3), ("streaming", 0.3), ("epikv", 0.3)}


def test_quick_defaults_to_the_default_method_at_a_quarter(model_folder, tmp_path):
    from epikv_triton.scoring import DEFAULT_METHOD

    path = tmp_path / "quality.json"
    assert cli.main(["quality", "--model", str(model_folder), "--quick", "--task", "text", "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    methods = {(s["method"], s["fraction"]) for s in written["tasks"][0]["scores"]}
    assert methods == {("full", None), ("random", 0.25), ("streaming", 0.25), (DEFAULT_METHOD, 0.25)}


def test_a_saved_run_replays_to_the_same_tables_and_json(model_folder, tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert cli.main(["quality", "--model", str(model_folder), "--quick", "--task", "text", "--task", "retrieval",
                     "--method", "knorm", "--json", str(first)]) == 0
    measured = capsys.readouterr().out
    assert cli.main(["quality", "--from", str(first), "--json", str(second)]) == 0
    assert capsys.readouterr().out == measured
    assert json.loads(second.read_text()) == json.loads(first.read_text())


def test_a_value_reserve_reaches_every_policy_and_the_saved_settings(runner, model_folder, tmp_path, capsys):
    from epikv_triton.integrations.state import state_of

    reserved = dataclasses.replace(runner, value_reserve=10)
    with reserved.patched(Policy("epikv", 0.5), budget=16):
        assert state_of(reserved.model).config.value_reserve == 10
    with reserved.patched(Policy("streaming", 0.5), budget=8):
        assert state_of(reserved.model).config.value_reserve == 8  # at most the budget
    path = tmp_path / "quality.json"
    assert cli.main(["quality", "--model", str(model_folder), "--quick", "--task", "text", "--value-reserve", "3",
                     "--json", str(path)]) == 0
    assert "value_reserve=3" in capsys.readouterr().out
    assert json.loads(path.read_text())["settings"]["value_reserve"] == 3


def test_a_file_that_is_not_a_saved_run_is_one_line(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text('{"tasks": [{"task": "text"}]}')
    assert cli.main(["quality", "--from", str(path)]) == 2
    assert "is not a run saved by 'epikv-triton quality --json'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--budget", "1.5"], "must be in (0, 1]"),
        (["--budget", "quarter"], "expected a fraction"),
        (["--task", "poetry"], "invalid choice"),
        (["--method", "magic"], "unknown method"),
        (["--value-reserve", "-2"], "non-negative integer"),
    ],
)
def test_bad_input_is_one_line(arguments, message, capsys):
    assert cli.main(["quality", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_a_method_the_model_cannot_run_fails_before_any_work(tmp_path, char_tokenizer, capsys):
    from ..integrations.models import tiny_model

    shallow = tiny_model("llama", num_layers=2)
    runner = Runner(shallow, char_tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="bands"):
        suite.run_suite(runner, ["text"], ["epikv"], [0.5])
    assert "text" not in capsys.readouterr().err  # no progress bar started


def test_plot_without_matplotlib_names_the_extra(model_folder, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert cli.main(["quality", "--model", str(model_folder), "--quick", "--plot", "out.png"]) == 2
    assert "epikv-triton[plot]" in capsys.readouterr().err


def test_plot_is_written(runner, tmp_path):
    pytest.importorskip("matplotlib")
    task, settings = TASKS["text"]
    result = task.run(runner, policies(["epikv"], [0.3, 0.6]), settings, seed=0)
    report.plot([(result, report.summarize(result))], tmp_path / "plot.png", "tiny")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
