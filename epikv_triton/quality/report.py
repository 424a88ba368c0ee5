"""From per-case scores to claims: means with bootstrap intervals, paired differences to the references with
a verdict, and their tables, JSON and plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .harness import REFERENCES, Metric, Policy, Scores, TaskResult
from .statistics import Interval, bootstrap_mean, paired_difference, verdict

PLOT_EXTRA = "pip install 'epikv-triton[plot]' (or: pip install matplotlib)"


@dataclass
class Comparison:
    difference: Interval  # mean of (method - reference) over the cases both have
    verdict: str


@dataclass
class Row:
    """One policy's summary of one metric."""

    metric: Metric
    policy: Policy
    cases: int
    value: Interval | None  # None when the metric applies to no case
    versus: dict[str, Comparison] = field(default_factory=dict)


def summarize(result: TaskResult, seed: int = 0) -> list[Row]:
    """A row per metric and policy; each non-reference policy compared with each reference at its budget."""
    by_policy = {scores.policy: scores for scores in result.scores}
    rows = []
    for metric in result.metrics:
        for scores in result.scores:
            values = scores.values[metric.name]
            present = [v for v in values if v is not None]
            row = Row(metric, scores.policy, len(present), bootstrap_mean(present, seed=seed) if present else None)
            for reference in REFERENCES:
                other = by_policy.get(Policy(reference, scores.policy.fraction))
                if scores.policy.fraction is None or other is None or reference == scores.policy.method:
                    continue
                pairs = [(a, b) for a, b in zip(values, other.values[metric.name]) if a is not None and b is not None]
                if pairs:
                    difference = paired_difference(*zip(*pairs), seed=seed)
                    row.versus[reference] = Comparison(difference, verdict(difference, metric.higher_is_better))
            rows.append(row)
    return rows


def _interval(interval: Interval, signed: bool) -> str:
    number = "{:+.3f}" if signed else "{:.3f}"
    return f"{number.format(interval.mean)} [{number.format(interval.low)}, {number.format(interval.high)}]"


def tables(result: TaskResult, rows: list[Row]) -> str:
    """One tabulate table per metric of the task, with the task's notes above the first."""
    from tabulate import tabulate

    facts = {**result.notes, "cases": len(result.cases), "wall time": f"{result.seconds:.0f} s"}
    notes = ", ".join(f"{name.replace('_', ' ')}: {value}" for name, value in facts.items())
    blocks = []
    for metric in result.metrics:
        table = []
        for row in (r for r in rows if r.metric is metric):
            value = "-" if row.value is None else _interval(row.value, False)
            line = [row.policy.method, row.policy.budget_label, row.cases, value]
            for reference in REFERENCES:
                versus = row.versus.get(reference)
                line += ["-", "-"] if versus is None else [_interval(versus.difference, True), versus.verdict]
            table.append(line)
        headers = ["method", "budget", "cases", f"{metric.name} [95% CI]"]
        for reference in REFERENCES:
            headers += [f"vs {reference} [95% CI]", "verdict"]
        title = f"{result.task}: {metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better): "
        blocks.append(title + metric.description + ("" if blocks else f"\n{notes}"))
        blocks[-1] += "\n" + tabulate(table, headers=headers, disable_numparse=True)
    return "\n\n".join(blocks)


def as_json(result: TaskResult, rows: list[Row]) -> dict:
    def interval(value: Interval | None) -> dict | None:
        return None if value is None else {"mean": value.mean, "low": value.low, "high": value.high}

    return {
        "task": result.task,
        "seconds": result.seconds,
        "notes": result.notes,
        "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better, "description": m.description}
                    for m in result.metrics],
        "cases": result.cases,
        "scores": [{"method": s.policy.method, "fraction": s.policy.fraction, "budgets": s.budgets, "values": s.values,
                    "outputs": s.outputs} for s in result.scores],
        "summary": [
            {"metric": r.metric.name, "method": r.policy.method, "fraction": r.policy.fraction, "cases": r.cases,
             "value": interval(r.value),
             "versus": {name: {**interval(c.difference), "verdict": c.verdict} for name, c in r.versus.items()}}
            for r in rows
        ],
    }


def task_result(saved: dict) -> TaskResult:
    """A :class:`TaskResult` back from its :func:`as_json` form (the summary is recomputed, not read)."""
    return TaskResult(
        task=saved["task"],
        metrics=tuple(Metric(**metric) for metric in saved["metrics"]),
        cases=saved["cases"],
        scores=[Scores(Policy(s["method"], s["fraction"]), s["budgets"], s["values"], s["outputs"])
                for s in saved["scores"]],
        notes=saved["notes"],
        seconds=saved["seconds"],
    )


def check_plotting() -> None:
    """Raise ``ImportError`` naming the extra to install when matplotlib is missing (before any long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def plot(summaries: list[tuple[TaskResult, list[Row]]], path: str | Path, title: str) -> None:
    """Each metric against the budget, one line per method with its 95% interval as a band; ``full`` (no
    budget) as a dashed horizontal line."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(result, rows, metric) for result, rows in summaries for metric in result.metrics]
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 3.9 * lines), squeeze=False)
    for axis, (result, all_rows, metric) in zip(axes.flat, panels):
        rows = [r for r in all_rows if r.metric is metric and r.value is not None]
        methods = list(dict.fromkeys(r.policy.method for r in rows))
        for index, method in enumerate(methods):
            points = sorted(
                ((r.policy.fraction, r.value) for r in rows if r.policy.method == method and r.policy.fraction),
                key=lambda point: point[0],
            )
            # tab20 and a marker cycle: a dozen methods stay distinguishable (tab10 repeats after ten).
            color, marker = plt.get_cmap("tab20")(index % 20), _MARKERS[index % len(_MARKERS)]
            if not points:  # full: no budget
                value = next(r.value for r in rows if r.policy.method == method)
                axis.axhline(value.mean, color=color, linestyle="--", label=method)
                axis.axhspan(value.low, value.high, color=color, alpha=0.08)
                continue
            x = [100 * fraction for fraction, _ in points]
            means, lows, highs = ([getattr(v, end) for _, v in points] for end in ("mean", "low", "high"))
            if len(points) > 1:
                axis.plot(x, means, marker=marker, color=color, label=method)
                axis.fill_between(x, lows, highs, color=color, alpha=0.12)
            else:  # one budget: methods side by side, each with its interval as an error bar
                spread = [x[0] + 0.6 * (index - len(methods) / 2)]
                errors = [[means[0] - lows[0]], [highs[0] - means[0]]]
                axis.errorbar(spread, means, yerr=errors, fmt=marker, capsize=3, color=color, label=method)
        axis.set_title(f"{result.task}: {metric.name}")
        axis.set_xticks(sorted({100 * r.policy.fraction for r in rows if r.policy.fraction}))
        axis.set_xlabel("budget (% of context)")
        axis.set_ylabel(f"{metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9), frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06, 1, 0.96))
    figure.savefig(path, dpi=120)
    plt.close(figure)
