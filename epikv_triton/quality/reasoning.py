"""Reasoning: the model's own chain of thought on generated problems with known answers.

The unpatched model (full cache) solves each problem greedily; its solution is the *trace*. Each policy
then reads the same prompt and trace teacher-forced (prompt in chunks, trace token by token, as decoding
would), giving the NLL gap to the full cache and the agreement of its greedy predictions with the trace,
and solves again freely the problems the full cache got right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .harness import Metric, Policy, Runner, Scores, TaskResult, batches, progress, token_budget
from .problems import INSTRUCTION, STEPS, Problem, extract_answer, make_problems

METRICS = (
    Metric("nll_gap", False, "NLL (nats/token) of the full cache's own solution, minus the full cache's NLL"),
    Metric("agreement", True, "fraction of solution tokens the greedy prediction matches, teacher-forced"),
    Metric("accuracy", True, "problems solved again, on those the full cache solves"),
)


@dataclass(frozen=True)
class Settings:
    problems: int = 16
    steps: tuple[int, ...] = STEPS  # additions per problem, taken in turn
    max_new_tokens: int = 48  # the longest solution; SmolLM2's take 20 to 40 tokens

    @classmethod
    def quick(cls) -> Settings:
        return cls(problems=8, steps=(2,), max_new_tokens=40)


def prompt(tokenizer, example: Problem, problem: Problem) -> list[int]:
    """A worked example, then the problem: as chat turns when the tokenizer has a chat template (an
    instruction-tuned model answers there), else as plain text."""
    if getattr(tokenizer, "chat_template", None):
        turns = [
            {"role": "user", "content": f"{example.question}\n{INSTRUCTION}"},
            {"role": "assistant", "content": example.solution},
            {"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"},
        ]
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = (
        f"Question: {example.question}\n{INSTRUCTION}\nSolution: {example.solution}\n\n"
        f"Question: {problem.question}\n{INSTRUCTION}\nSolution:"
    )
    return tokenizer("")["input_ids"] + tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class _Batch:
    """Prompts left-padded to ``width`` columns, each followed by its trace (right-padded, unmasked, as
    ``generate`` feeds a finished sequence)."""

    indices: Sequence[int]
    tokens: torch.Tensor
    mask: torch.Tensor
    width: int
    trace_lengths: list[int]

    def trace_means(self, per_token: torch.Tensor) -> list[float]:
        """The mean of ``per_token [B, n]`` over each row's trace columns."""
        return [float(per_token[row, self.width : self.width + n].mean()) for row, n in enumerate(self.trace_lengths)]


def _layout(runner: Runner, indices: Sequence[int], prompts: list[list[int]], traces: list[list[int]]) -> _Batch:
    input_ids, mask = runner.left_padded([prompts[i] for i in indices])
    longest = max(len(traces[i]) for i in indices)
    following = torch.full((len(indices), longest), runner.pad_id, dtype=torch.long, device=input_ids.device)
    for row, i in enumerate(indices):
        following[row, : len(traces[i])] = torch.tensor(traces[i], dtype=torch.long)
    tokens = torch.cat([input_ids, following], dim=1)
    return _Batch(indices, tokens, torch.cat([mask, torch.ones_like(following)], dim=1), input_ids.shape[1],
                  [len(traces[i]) for i in indices])


def _read_traces(runner: Runner, layouts: list[_Batch], prompts: list[list[int]], bounded: bool, bar) -> tuple:
    """Per problem, the NLL of its trace and the fraction of trace tokens predicted greedily. ``bounded``: through
    the patched model's cache, prompt in chunks and trace token by token; otherwise through a plain cache."""
    nll, agreement = [0.0] * len(prompts), [0.0] * len(prompts)
    for batch in layouts:
        cache = None
        if bounded:
            cache = runner.bounded_cache(batch.tokens.shape[1], [len(prompts[i]) for i in batch.indices])
        decode_from = batch.width if bounded else None
        forced = runner.forced(batch.tokens, batch.mask, cache, scored_from=batch.width, decode_from=decode_from)
        matches = (forced.predictions == batch.tokens).float()
        for i, value, match in zip(batch.indices, batch.trace_means(-forced.log_probs), batch.trace_means(matches)):
            nll[i], agreement[i] = value, match
        bar.update()
    return nll, agreement


def _solutions(runner: Runner, prompts: list[list[int]], indices: Sequence[int], settings: Settings) -> list:
    """Greedy solutions of the problems ``indices``, in that order."""
    return [
        solution
        for part in batches(indices, runner.batch_size)
        for solution in runner.generate([prompts[i] for i in part], settings.max_new_tokens)
    ]


def run(runner: Runner, plan: list[Policy], settings: Settings, seed: int) -> TaskResult:
    pairs = make_problems(settings.problems, seed, settings.steps)
    answers = [problem.answer for _, problem in pairs]
    prompts = [prompt(runner.tokenizer, example, problem) for example, problem in pairs]
    everything = range(len(pairs))
    groups = list(batches(everything, runner.batch_size))
    with progress((len(plan) + 1) * (len(groups) + 1), "reasoning", runner.show_progress) as bar:
        bar.set_postfix_str("full-cache solutions")
        traces = _solutions(runner, prompts, everything, settings)
        solved = [i for i in everything if extract_answer(runner.decode(traces[i])) == answers[i]]
        bar.update()
        layouts = [_layout(runner, indices, prompts, traces) for indices in groups]
        reference_nll, _ = _read_traces(runner, layouts, prompts, False, bar)

        context = round(sum(len(p) + len(t) for p, t in zip(prompts, traces)) / len(pairs))
        scores = []
        for policy in plan:
            bar.set_postfix_str(policy.label)
            budget = token_budget(policy.fraction, context)
            accuracy, outputs = [None] * len(pairs), [None] * len(pairs)
            with runner.patched(policy, budget):
                nll, agreement = _read_traces(runner, layouts, prompts, True, bar)
                for i, solution in zip(solved, _solutions(runner, prompts, solved, settings)):
                    outputs[i] = runner.decode(solution)
                    accuracy[i] = float(extract_answer(outputs[i]) == answers[i])
                bar.update()
            nll_gap = [value - reference for value, reference in zip(nll, reference_nll)]
            values = {"nll_gap": nll_gap, "agreement": agreement, "accuracy": accuracy}
            scores.append(Scores(policy, [budget] * len(pairs), values, outputs))
    cases = [
        {"question": problem.question, "answer": problem.answer, "full_cache_solution": runner.decode(trace),
         "full_cache_solved": i in solved, "prompt_tokens": len(prompts[i]), "solution_tokens": len(trace)}
        for i, ((_, problem), trace) in enumerate(zip(pairs, traces))
    ]
    notes = {"full_cache_solved": f"{len(solved)}/{len(pairs)}", "mean_context_tokens": context}
    return TaskResult("reasoning", METRICS, cases, scores, notes)
