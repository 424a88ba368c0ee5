"""``epikv-triton generate`` and ``compare``: one generation, or methods x budgets against the full cache.

``generate`` streams one generation under one method and budget and prints
its memory and speed; ``compare`` replays a prompt (or scores a text file)
under each policy and prints agreement, NLL gap, peak KV and tokens/s.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch

from .cli import Session, UsageError, encode_prompt, open_session
from .scoring import DEFAULT_METHOD

DEFAULT_PROMPT = (
    "A farmer has 17 sheep, buys 3 times as many goats as sheep, then sells 12 goats and "
    "gives away a third of the remaining animals. How many animals are left? "
    "Think step by step and explain every step in detail before giving the answer."
)
DEFAULT_COMPARE_METHODS = ["full", "streaming", "h2o", DEFAULT_METHOD, "epikv", "lag_kv"]
DEFAULT_COMPARE_BUDGETS = [64, 128]


def full_kv_bytes(model, tokens: int) -> int:
    """Bytes a full cache needs for ``tokens`` tokens: K and V of every layer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * element * tokens


def run_generate(args) -> dict:
    from . import evaluation, loading
    from .integrations import patching

    for flag in ("model", "method", "budget"):
        if len(getattr(args, flag) or []) > 1:
            raise UsageError(f"generate takes one --{flag}; use compare for several")
    method = (args.method or [DEFAULT_METHOD])[0]
    budget = (args.budget or [128])[0]
    new_tokens = args.max_new_tokens or 200
    session = open_session(args, (args.model or ["smollm2"])[0])
    model = session.loaded.model
    inputs = encode_prompt(session, args.prompt or DEFAULT_PROMPT)
    patching.patch(model, budget=budget, method=method, keep_prompt=args.keep_prompt)
    try:
        streamer = loading.text_streamer(session.loaded.tokenizer)
        result = evaluation.greedy_generation(model, inputs, new_tokens, streamer=streamer, fixed_length=False)
    finally:
        patching.unpatch(model)
    seen = inputs["input_ids"].shape[1] + len(result.tokens)
    kept = result.tokens_kept
    full = full_kv_bytes(model, seen)
    row = {
        "method": method, "budget": budget, "tokens_generated": len(result.tokens), "tokens_seen": seen,
        "tokens_kept": kept, "kv_bytes_held": result.peak_kv_bytes, "kv_bytes_full_cache": full,
        "tokens_per_s": result.tokens_per_second,
    }
    from tabulate import tabulate

    print()
    print(tabulate(
        [[method, budget, row["tokens_generated"], f"{kept}/{seen}", f"{mib(row['kv_bytes_held'])} / {mib(full)}",
          f"{row['tokens_per_s']:.1f}"]],
        headers=["method", "budget", "generated", "kept/seen", "KV MiB held / full", "tokens/s"],
    ))
    return {"command": "generate", "model": session.loaded.name, "device": str(session.device),
            "dtype": str(session.dtype).removeprefix("torch."), "prompt": args.prompt or DEFAULT_PROMPT, "result": row}


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def run_compare(args) -> dict:
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --text {args.text}: {error}") from None
        if not text.strip():
            raise UsageError(f"--text {args.text} is empty")
    runs = []
    for spec in args.model or ["smollm2"]:
        session = open_session(args, spec)
        runs.append(compare_one_model(args, session, text))
    return {"command": "compare", "runs": runs}


def compare_one_model(args, session: Session, text: str | None) -> dict:
    from tabulate import tabulate
    from tqdm.auto import tqdm

    from . import evaluation, loading
    from .integrations import patching

    model = session.loaded.model
    methods = args.method or DEFAULT_COMPARE_METHODS
    budgets = args.budget or DEFAULT_COMPARE_BUDGETS
    patching.check_supported(model)
    policies = [(m, None) for m in methods if m == "full"]
    policies += [(m, b) for m in methods if m != "full" for b in budgets]

    if text is None:
        inputs = encode_prompt(session, args.prompt or DEFAULT_PROMPT)
        context, new_tokens, chunk = inputs["input_ids"], args.max_new_tokens or 256, 1
        workload = {
            "kind": "generation", "prompt": args.prompt or DEFAULT_PROMPT, "context_tokens": context.shape[1],
            "scored_tokens": new_tokens,
        }
    else:
        ids = session.loaded.tokenizer(text, return_tensors="pt")["input_ids"][:, : args.max_tokens + 1]
        ids = ids.to(session.device)
        if ids.shape[1] < 2:
            raise UsageError(f"--text {args.text} has fewer than 2 tokens")
        context, continuation, chunk = ids[:, :1], ids[:, 1:], args.chunk
        workload = {
            "kind": "text", "text_file": args.text, "context_tokens": 1, "scored_tokens": continuation.shape[1],
            "chunk": chunk,
        }

    progress = tqdm(total=len(policies) + 1, desc=f"compare {session.loaded.name}", unit="run", file=sys.stderr)
    plain_cache = functools.partial(loading.plain_cache, model)  # the reference: HF's own dynamic cache
    if text is None:
        reference_run = evaluation.greedy_generation(model, inputs, new_tokens)
        continuation = torch.tensor([reference_run.tokens], device=session.device)
        reference = evaluation.teacher_forced(model, context, continuation, plain_cache, chunk)
        reference_speed, reference_peak = reference_run.tokens_per_second, reference_run.peak_kv_bytes
    else:
        reference, seconds = timed(evaluation.teacher_forced, model, context, continuation, plain_cache, chunk)
        reference_speed, reference_peak = continuation.shape[1] / seconds, reference.peak_kv_bytes
    progress.update()

    results = []
    for method, budget in policies:
        progress.set_postfix_str(f"{method} {budget or ''}".strip())
        patching.patch(model, budget=budget or max(budgets), method=method, keep_prompt=args.keep_prompt)
        try:
            # The scored stream protects the same prompt as the generate run beside it: the context, even though
            # it is fed a chunk at a time (a chunk of one token would otherwise be taken for the whole prompt).
            cache_factory = functools.partial(
                patching.new_cache, model, prompt_length=context.shape[1],
                expected_length=context.shape[1] + continuation.shape[1], chunk_size=chunk,
            )
            if text is None:
                run = evaluation.greedy_generation(model, inputs, new_tokens)
                scored = evaluation.teacher_forced(model, context, continuation, cache_factory, chunk)
                match = evaluation.agreement(continuation[0].tolist(), run.tokens)
                speed, peak = run.tokens_per_second, run.peak_kv_bytes
            else:
                scored, seconds = timed(evaluation.teacher_forced, model, context, continuation, cache_factory, chunk)
                match = evaluation.agreement(reference.predictions, scored.predictions)
                speed, peak = continuation.shape[1] / seconds, scored.peak_kv_bytes
        finally:
            patching.unpatch(model)
        results.append({
            "method": method, "budget": budget, "agreement": match.fraction, "first_divergence": match.first_divergence,
            "nll": scored.nll, "nll_gap": scored.nll - reference.nll, "peak_kv_bytes": peak,
            "kv_fraction_of_full": peak / reference_peak if reference_peak else None, "tokens_per_s": speed,
        })
        progress.update()
    progress.close()

    rows = [[
        "full (HF cache)", "-", "1.000", "-", f"{reference.nll:.4f}", "0.0000", mib(reference_peak), "100%",
        f"{reference_speed:.1f}",
    ]]
    for r in results:
        rows.append([
            r["method"], r["budget"] or "-", f"{r['agreement']:.3f}",
            "-" if r["first_divergence"] is None else r["first_divergence"],
            f"{r['nll']:.4f}", f"{r['nll_gap'] + 0.0:+.4f}" if abs(r["nll_gap"]) >= 5e-5 else "0.0000",
            mib(r["peak_kv_bytes"]),
            f"{100 * r['kv_fraction_of_full']:.0f}%" if r["kv_fraction_of_full"] is not None else "-",
            f"{r['tokens_per_s']:.1f}",
        ])
    print(f"\n{session.loaded.name} | {workload['kind']} workload: {workload['context_tokens']} context tokens, "
          f"{workload['scored_tokens']} scored | {session.device}, {str(session.dtype).removeprefix('torch.')}")
    headers = ["method", "budget", "agreement", "first diff", "NLL", "NLL gap", "peak KV MiB", "KV vs full", "tokens/s"]
    print(tabulate(rows, headers=headers))
    return {
        "model": session.loaded.name, "device": str(session.device), "dtype": str(session.dtype).removeprefix("torch."),
        "workload": workload,
        "reference": {
            "method": "full (HF cache)", "nll": reference.nll, "peak_kv_bytes": reference_peak,
            "tokens_per_s": reference_speed,
        },
        "results": results,
    }


def timed(function, *args):
    """``function(*args)`` and the seconds it took."""
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start
