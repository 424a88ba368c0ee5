"""Text: teacher-forced NLL of long plain texts, many windows each.

Each window is read ``chunk`` tokens at a time through the bounded cache; the second half of the window
is scored, where a budget of up to half the window is already evicting. The reference is the unpatched
model over the same window; agreement is that of the greedy predictions with the reference's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from . import corpora
from .harness import Metric, Policy, Runner, Scores, TaskResult, batches, progress, token_budget

METRICS = (
    Metric("nll_gap", False, "NLL (nats/token) of the window's second half, minus the full cache's"),
    Metric("agreement", True, "fraction of the second half's greedy predictions equal to the full cache's"),
)

TEXTS = ("prose", "code")


@dataclass(frozen=True)
class Settings:
    texts: tuple[str, ...] = TEXTS
    windows: int = 4  # per text
    window: int = 512  # tokens

    @classmethod
    def quick(cls) -> Settings:
        return cls(windows=2, window=384)


def build_windows(tokenizer, settings: Settings, seed: int) -> list[tuple[str, list[int]]]:
    """``settings.windows`` consecutive windows of each text, from a seeded starting point."""
    if settings.window < 4:
        raise ValueError(f"a window needs at least 4 tokens, got {settings.window}")
    windows = []
    for kind in settings.texts:
        units = corpora.units(kind, seed)
        start = random.Random(f"text/{seed}/{kind}").randrange(len(units))
        stream, _ = corpora.token_stream(tokenizer, units, settings.windows * settings.window, start=start)
        windows += [(kind, stream[i : i + settings.window]) for i in range(0, len(stream), settings.window)]
    return windows


def run(runner: Runner, plan: list[Policy], settings: Settings, seed: int) -> TaskResult:
    windows = build_windows(runner.tokenizer, settings, seed)
    count, length = len(windows), settings.window
    scored = slice(length // 2, length)
    groups = [
        (indices, torch.tensor([windows[i][1] for i in indices], device=runner.device))
        for indices in batches(range(count), runner.batch_size)
    ]
    with progress(len(groups) * (len(plan) + 1), "text", runner.show_progress) as bar:
        bar.set_postfix_str("full cache")
        reference_nll, reference_predictions = [0.0] * count, [None] * count
        for indices, tokens in groups:
            forced = runner.forced(tokens, None, None, scored_from=scored.start)
            for row, i in enumerate(indices):
                reference_nll[i] = -float(forced.log_probs[row, scored].mean())
                reference_predictions[i] = forced.predictions[row, scored]
            bar.update()
        scores = []
        for policy in plan:
            bar.set_postfix_str(policy.label)
            budget = token_budget(policy.fraction, length)
            nll_gap, agreement = [0.0] * count, [0.0] * count
            with runner.patched(policy, budget):
                for indices, tokens in groups:
                    forced = runner.forced(tokens, None, runner.bounded_cache(length), scored_from=scored.start)
                    for row, i in enumerate(indices):
                        nll_gap[i] = -float(forced.log_probs[row, scored].mean()) - reference_nll[i]
                        same = forced.predictions[row, scored] == reference_predictions[i]
                        agreement[i] = float(same.float().mean())
                    bar.update()
            scores.append(Scores(policy, [budget] * count, {"nll_gap": nll_gap, "agreement": agreement}))
    cases = [{"text": kind, "index": index, "tokens": length, "full_cache_nll": nll}
             for index, ((kind, _), nll) in enumerate(zip(windows, reference_nll))]
    return TaskResult("text", METRICS, cases, scores)
