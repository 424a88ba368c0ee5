"""epikv_triton.calibrate on real forward passes, and patch(model, config=...)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import epikv_triton
from epikv_triton.config import EpiKVConfig
from epikv_triton.integrations.calibration import record

from .models import greedy, patched_copy, prompts, stories_model, tiny_model
from .reference import record_steps

TEXT = "The quick brown fox jumps over the lazy dog; 0123456789. " * 30


def byte_tokenizer(text: str) -> dict:
    """The tiny models' vocabulary is 256 ids: one per byte."""
    return {"input_ids": list(text.encode())}


@pytest.mark.parametrize("family", ["llama", "qwen2-sliding"])
def test_the_recording_is_each_layers_change_and_the_value_weighted_reads_from_far_later(family):
    model = tiny_model(family)
    distance = 8
    windows = record(model, byte_tokenizer, TEXT[:100], window_tokens=64, min_distance=distance)
    assert [w.diffs.shape for w in windows] == [(3, 64), (3, 36)]  # the tail (36 >= 4 * 8 tokens) is kept

    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    reference.model.norm = torch.nn.Identity()  # the last hidden state is then the last layer's output
    ids = torch.tensor([byte_tokenizer(TEXT[:100])["input_ids"][:64]])
    out = reference(input_ids=ids, output_hidden_states=True, output_attentions=True)
    window = windows[0]
    for layer in range(3):
        hidden = out.hidden_states[layer + 1][0]
        assert math.isnan(window.diffs[layer, 0])
        torch.testing.assert_close(window.diffs[layer, 1:], (hidden[1:] - hidden[:-1]).norm(dim=-1))
    # Each query head reads the value of its KV head: v_proj of the layer's normed input, one norm per KV head.
    reads = torch.zeros(64, dtype=torch.float64)
    for layer, module in enumerate(reference.model.layers):
        values = module.self_attn.v_proj(module.input_layernorm(out.hidden_states[layer]))[0]
        value_norms = values.unflatten(-1, (-1, module.self_attn.head_dim)).norm(dim=-1).detach().double()  # [T, 2]
        p = out.attentions[layer][0].detach().double()  # [4 heads, T, T]; heads 0, 1 read KV head 0
        for h in range(4):
            for t in range(64):
                reads[t] += value_norms[t, h // 2] * sum(p[h, q, t] * (q + 1) for q in range(t + distance, 64)) / 4
    T = ids.shape[1]
    for t in range(T):
        if 1 <= t <= T - 2 * distance:
            expected = float(reads[t]) / (3 * (T - t - distance))  # per layer, per far query
            assert window.oracle[t].item() == pytest.approx(expected, rel=1e-5)
        else:
            assert math.isnan(window.oracle[t])
    assert model.config._attn_implementation == "sdpa"  # restored
    assert not any(
        layer._forward_hooks or layer.self_attn._forward_hooks or layer.self_attn.v_proj._forward_hooks
        for layer in model.model.layers
    )


def test_calibrate_end_to_end_gives_a_config_patch_accepts():
    model = tiny_model("llama", num_layers=4)
    calibration = epikv_triton.calibrate(model, byte_tokenizer, [TEXT, TEXT[::-1]], window_tokens=256,
                                         min_distance=16, budget=32, recent=8)
    config = calibration.config
    assert (config.method, config.budget, config.recent) == ("epikv", 32, 8)
    assert config.resolve_bands(4) == config.bands
    assert calibration.windows == 14  # 3,482 bytes: 13 windows of 256 and a tail of 154 >= 4 · 16
    assert 0.0 <= calibration.objective <= 1.0
    inputs = prompts(2)
    by_config = greedy(patched_copy(model, config=EpiKVConfig.from_json(config.to_json())), inputs, 60)
    by_keywords_model = patched_copy(model, method="epikv", budget=32, recent=8, bands=config.bands,
                                     weights=config.weights)
    by_keywords = greedy(by_keywords_model, inputs, 60)
    assert torch.equal(by_config, by_keywords)


def test_an_empty_band_of_weight_zero_keeps_what_a_band_of_weight_zero_keeps():
    def kept(bands, weights):
        model = patched_copy(tiny_model("llama"), method="epikv", budget=16, recent=4, bands=bands, weights=weights)
        steps = record_steps(model)
        greedy(model, prompts(2), 40)
        return [step["kept"] for step in steps]

    assert kept(((), (2,)), (0, 1)) == kept(((0,), (2,)), (0, 1))
    assert kept(((), (2,)), (0, 1)) != kept(((0,), (2,)), (1, 1))  # the weights do steer eviction here


def test_calibrate_on_a_real_model_and_tokenizer():
    model, tokenizer = stories_model("stories260k")
    text = " ".join(f"Once upon a time there was a {animal} who liked to {verb}." for animal in
                    ("cat", "dog", "bird", "fish") for verb in ("run", "sing", "play", "jump", "read")) * 4
    calibration = epikv_triton.calibrate(model, tokenizer, text, window_tokens=256, min_distance=32)
    assert calibration.baselines["epikv"] is not None  # 5 layers hold the default bands
    assert calibration.objective >= calibration.baselines["epikv"]
    assert model.config._attn_implementation != "eager"


def test_patch_takes_a_config_or_keywords():
    model = tiny_model("llama")
    config = EpiKVConfig(budget=16, recent=4, method="knorm")
    patched = patched_copy(model, config=config)
    assert epikv_triton.patch(patched, config=config) is patched  # the same settings again: nothing to do
    assert epikv_triton.patch(patched, budget=16, recent=4, method="knorm") is patched
    inputs = prompts(2)
    assert torch.equal(greedy(patched, inputs, 40), greedy(patched_copy(model, budget=16, recent=4, method="knorm"),
                                                           inputs, 40))
    with pytest.raises(ValueError, match="either config= or keyword settings, not both.*budget"):
        patched_copy(model, config=config, budget=32)
    with pytest.raises(TypeError, match="config must be an epikv_triton.EpiKVConfig, got dict"):
        patched_copy(model, config={"budget": 16})


def test_calibrate_refuses_what_it_cannot_record():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs at least 4 \\* min_distance = 64"):
        epikv_triton.calibrate(model, byte_tokenizer, "too short", min_distance=16)
    with pytest.raises(ValueError, match="window_tokens >= 4 \\* min_distance"):
        epikv_triton.calibrate(model, byte_tokenizer, TEXT, window_tokens=100, min_distance=64)
    with pytest.raises(ValueError, match="calibration chooses bands"):
        epikv_triton.calibrate(model, byte_tokenizer, TEXT, window_tokens=256, bands=([0], [1]))
    with pytest.raises(ValueError, match="unpatched model: call epikv_triton.unpatch"):
        epikv_triton.calibrate(patched_copy(model, budget=16), byte_tokenizer, TEXT)
