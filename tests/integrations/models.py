"""Tiny random-weight models of each supported family, and the real stories260k models.

Models are built from configs (no downloads); the real ones come from the
folder named by ``EPIKV_TEST_MODELS`` and are skipped when it is unset or absent.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import epikv_triton

#: What the installed transformers calls the cache argument and output field (``cache`` from 5.24 on).
CACHE = epikv_triton.cache_keyword(LlamaForCausalLM)
SLIDING_WINDOW = 8

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=None,  # greedy runs of fixed length, comparable step by step with hand-written loops
)


def tiny_model(family: str, num_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A random-weight model in eval mode: ``llama``, ``qwen2``, ``qwen2-sliding`` (window 8 from layer 1),
    ``qwen3``."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=num_layers, **_COMMON))
    elif family in ("qwen2", "qwen2-sliding"):
        sliding = dict(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)
        config = Qwen2Config(num_hidden_layers=num_layers, **_COMMON, **(sliding if family == "qwen2-sliding" else {}))
        model = Qwen2ForCausalLM(config)
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=num_layers, head_dim=16, **_COMMON))
    else:
        raise ValueError(family)
    return model.eval()


def cached(cache) -> dict:
    """``{CACHE: cache}``: the forward keywords that pass ``cache`` on the installed transformers."""
    return {CACHE: cache}


def patched_copy(model: torch.nn.Module, **settings) -> torch.nn.Module:
    """A patched deep copy: the original stays the unpatched reference."""
    return epikv_triton.patch(copy.deepcopy(model), **settings)


def prompts(batch: int, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random prompts; with ``batch == 2`` the second is left-padded by 5 tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, _COMMON["vocab_size"], (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch == 2:
        input_ids[1, :5] = _COMMON["pad_token_id"]
        attention_mask[1, :5] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def greedy(model: torch.nn.Module, inputs: dict, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)


def real_model_folder(name: str) -> Path:
    """``$EPIKV_TEST_MODELS/<name>`` (the real stories260k models), or a skip saying what is missing."""
    root = os.environ.get("EPIKV_TEST_MODELS")
    if not root:
        pytest.skip("EPIKV_TEST_MODELS is not set: point it at the folder of the real stories260k models")
    folder = Path(root) / name
    if not folder.is_dir():
        pytest.skip(f"real model folder {folder} is absent (EPIKV_TEST_MODELS={root})")
    return folder


def stories_model(name: str) -> tuple[torch.nn.Module, object]:
    """A real stories260k model and its tokenizer, or a skip naming the missing folder."""
    model = AutoModelForCausalLM.from_pretrained(real_model_folder(name), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fixed-length runs, as with the tiny models
    tokenizer = AutoTokenizer.from_pretrained(real_model_folder("stories260k"))
    return model, tokenizer
