"""A patched 2-layer model through the Triton kernels (Triton's interpreter on CPU): same tokens as the twins.

Slow under the interpreter (seconds), so it stays tiny: one sequence, a few
decode steps, a budget that forces evictions.
"""

from __future__ import annotations

import torch

from .models import greedy, patched_copy, prompts, tiny_model
from .reference import masked_reference, record_steps


def test_triton_kernels_match_torch_twins_end_to_end(monkeypatch):
    model = tiny_model("llama", num_layers=2)
    settings = dict(method="epikv", budget=8, recent=2, keep_prompt=False, bands=([0], [1]))
    inputs = prompts(1, length=6)
    expected = greedy(patched_copy(model, **settings), inputs, 6)  # EPIKV_BACKEND=torch (conftest)
    monkeypatch.setenv("EPIKV_BACKEND", "triton")
    patched = patched_copy(model, **settings)
    assert torch.equal(greedy(patched, inputs, 6), expected)


def test_triton_eviction_equals_masking_reference(monkeypatch):
    """Two left-padded sequences through the kernels, evicting every step: hole-filling compaction on the
    Triton path hides exactly what the masking-only reference hides."""
    model = tiny_model("llama", num_layers=2)
    inputs = prompts(2, length=8)
    monkeypatch.setenv("EPIKV_BACKEND", "triton")
    patched = patched_copy(model, method="epikv", budget=8, recent=2, keep_prompt=False, bands=([0], [1]))
    steps = record_steps(patched)
    generated = greedy(patched, inputs, 8)[:, 8:]
    assert steps[-1]["evictions"] >= 6 and all(m > 0 for m in steps[-1]["moved"])
    model.set_attn_implementation("eager")
    assert torch.equal(generated, masked_reference(model, inputs, [s["kept"] for s in steps], 8))
