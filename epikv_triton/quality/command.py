"""``epikv-triton quality``: the suite from the command line (``cli.py`` only registers it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import standings
from .harness import Runner
from .report import as_json, check_plotting, plot, summarize, tables, task_result
from .suite import TASKS, run_suite

#: One budget by default keeps the whole comparison of every registered method within 20 minutes of a 2-core
#: CPU for SmolLM2 (13.6 min measured); name more with ``--budget`` to draw a curve.
DEFAULT_FRACTIONS = (0.25,)


def budget_fraction(text: str) -> float:
    """``0.25`` or ``25%``: a budget as a fraction of each case's context, in (0, 1]."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.25 or 25%, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a budget fraction must be in (0, 1] (0.25 or 25%), got {text!r}")
    return value


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the platform tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import method_name, non_negative_int, positive_int

    parser.add_argument("--task", action="append", choices=list(TASKS), help="task to run (repeatable; default: all)")
    parser.add_argument(
        "--method", action="append", type=method_name,
        help="method to compare (repeatable; default: every registered one, with --quick the default method "
        "only); full, streaming and random always run",
    )
    parser.add_argument(
        "--budget", action="append", type=budget_fraction,
        help="KV budget as a fraction of each case's context, 0.25 or 25%% (repeatable; default 0.25)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smaller cases, and only the default method against the references unless --method names others: "
        "a few minutes on a CPU",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated cases and texts (default 0)")
    parser.add_argument(
        "--chunk", type=positive_int, default=32,
        help="tokens per forward reading a prompt or text (default 32; retrieval also reads each prompt whole)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward (default 16)")
    parser.add_argument(
        "--value-reserve", type=non_negative_int, default=0, metavar="N",
        help="every policy keeps N slots (at most its budget) for the tokens with the largest values (default 0)",
    )
    parser.add_argument("--plot", metavar="PATH", help="also plot each metric against the budget (needs matplotlib)")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (default), a local model folder, or a hub id")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float32 on CPU")
    parser.add_argument(
        "--threads", type=positive_int, default=usable_cores(),
        help=f"torch CPU threads (default: every core this process may use, here {usable_cores()})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every case, score and interval as JSON")
    parser.add_argument(
        "--from", dest="saved", metavar="PATH",
        help="run nothing: print the tables (and --plot) of a run saved with --json",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def run(args) -> dict:
    if args.plot:
        check_plotting()
    return replay(args) if args.saved else measure(args)


def measure(args) -> dict:
    from ..cli import open_session
    from ..integrations import patching
    from ..scoring import DEFAULT_METHOD, method_names

    tasks = list(dict.fromkeys(args.task or TASKS))
    methods = args.method or ([DEFAULT_METHOD] if args.quick else list(method_names()))
    fractions = args.budget or DEFAULT_FRACTIONS
    session = open_session(args, args.model)
    patching.check_supported(session.loaded.model)
    runner = Runner(session.loaded.model, session.loaded.tokenizer, chunk=args.chunk, batch_size=args.batch_size,
                    value_reserve=args.value_reserve)
    start = time.perf_counter()
    results = run_suite(runner, tasks, methods, fractions, seed=args.seed, quick=args.quick)
    report = {
        "command": "quality", "model": session.loaded.name, "device": str(session.device),
        "dtype": str(session.dtype).removeprefix("torch."),
        "settings": {"tasks": tasks, "methods": methods, "fractions": list(fractions), "quick": args.quick,
                     "seed": args.seed, "chunk": args.chunk, "batch_size": args.batch_size,
                     "value_reserve": args.value_reserve, "threads": args.threads},
        "seconds": time.perf_counter() - start,
    }
    summaries = [(result, summarize(result, seed=args.seed)) for result in results]
    return present(report, summaries, args.plot)


def replay(args) -> dict:
    """The tables and plot of a saved run; its intervals are recomputed with the seed it was run with."""
    try:
        saved = json.loads(Path(args.saved).read_text(encoding="utf-8"))
        results = [task_result(task) for task in saved["tasks"]]
        seed = saved["settings"]["seed"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{args.saved} is not a run saved by 'epikv-triton quality --json' ({error!r})") from None
    summaries = [(result, summarize(result, seed=seed)) for result in results]
    return present(saved, summaries, args.plot)


def present(report: dict, summaries: list, plot_path: str | None) -> dict:
    """Print the run's header, tables and standings; plot them to ``plot_path`` when given. Returns the run as
    JSON (the summaries and standings recomputed, so a replay of an older save gains them)."""
    settings = report["settings"]
    reserve = f", value_reserve={settings['value_reserve']}" if settings.get("value_reserve") else ""
    print(f"\n{report['model']} on {report['device']} ({report['dtype']}), prompts read {settings['chunk']} tokens "
          f"at a time, keep_prompt=False{reserve}; 95% paired bootstrap intervals over cases; "
          f"{report['seconds']:.0f} s")
    for result, rows in summaries:
        print("\n" + tables(result, rows))
    ranked = standings.standings(summaries)
    if ranked:
        print("\n" + standings.standings_table(ranked))
    if plot_path:
        plot(summaries, plot_path, f"{report['model']}: eviction quality against budget")
        print(f"Wrote {plot_path}", file=sys.stderr)
    return {**report, "tasks": [as_json(result, rows) for result, rows in summaries],
            "standings": standings.as_json(ranked)}
