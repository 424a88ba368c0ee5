"""transformers' continuous batching (``generate_batch``) on a patched model: refused, clearly, before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import epikv_triton

from .models import tiny_model

REQUESTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]]


def generation_config() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)


@pytest.mark.parametrize("entry", ["generate_batch", "init_continuous_batching"])
def test_patched_model_refuses_continuous_batching(entry):
    """Without this, transformers answers with its own advice ("use 'paged|eager'"), which would read every
    request into a full paged cache: the refusal says what to do with a patched model instead."""
    model = epikv_triton.patch(tiny_model("llama"), budget=8, method="kv")
    call = getattr(model, entry)
    arguments = {"inputs": REQUESTS} if entry == "generate_batch" else {}
    with pytest.raises(NotImplementedError, match=r"continuous batching.*model\.generate.*unpatch\(model\)"):
        call(generation_config=generation_config(), **arguments)
    assert model.config._attn_implementation == "epikv"  # refused before the engine switched the attention


def test_unpatch_restores_continuous_batching():
    model = tiny_model("llama")
    original = model.init_continuous_batching
    epikv_triton.patch(model, budget=8, method="kv")
    assert "init_continuous_batching" in vars(model)
    epikv_triton.unpatch(model)
    assert "init_continuous_batching" not in vars(model)
    assert model.init_continuous_batching == original


def test_instance_entry_point_survives_patch_and_unpatch():
    """An ``init_continuous_batching`` the instance already had is what unpatch puts back."""
    model = tiny_model("llama")

    def own(*args, **kwargs):
        return "own"

    model.init_continuous_batching = own
    epikv_triton.patch(model, budget=8, method="kv")
    with pytest.raises(NotImplementedError):
        model.init_continuous_batching()
    epikv_triton.unpatch(model)
    assert model.init_continuous_batching is own
    assert torch.is_grad_enabled()
