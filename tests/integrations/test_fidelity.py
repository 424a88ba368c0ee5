"""The kept set, step by step, re-derived from docs/method.md with plain Python written here.

The test taps the patched model with its own hooks (decoder-layer outputs;
keys and values recomputed from each attention's input and RoPE tables),
scores every token with the formulas of 2.1 / 2.3, replays the eviction
policy of 2.4 and compares the positions it keeps with the library's after
every forward pass.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from .models import CACHE, greedy, patched_copy, prompts, tiny_model

BUDGET, RECENT, WINDOW, LAG_CHUNK = 24, 4, 16, 16
NUM_LAYERS, NEW_TOKENS = 5, 80


class Tap:
    """Everything the reference needs, per forward pass: layer outputs, keys, values, kept positions."""

    def __init__(self, model: torch.nn.Module):
        self.hidden: list[dict[int, torch.Tensor]] = []
        self.keys: list[dict[int, torch.Tensor]] = []
        self.values: list[dict[int, torch.Tensor]] = []
        self.kept: list[list[list[int]]] = []
        layers = model.model.layers
        model.model.register_forward_pre_hook(self._new_forward)
        model.register_forward_hook(lambda module, args, out: self.kept.append(getattr(out, CACHE).kept_positions()))
        for index, layer in enumerate(layers):
            layer.register_forward_hook(lambda module, args, out, i=index: self.hidden[-1].__setitem__(i, out.double()))
            layer.self_attn.register_forward_pre_hook(
                lambda module, args, kwargs, i=index: self._keys_values(module, i, kwargs), with_kwargs=True
            )

    def _new_forward(self, module, args):
        self.hidden.append({})
        self.keys.append({})
        self.values.append({})

    def _keys_values(self, attention, index, kwargs):
        x = kwargs["hidden_states"].double()
        cos, sin = (t.double()[:, :, None] for t in kwargs["position_embeddings"])  # [B, T, 1, D]
        B, T, _ = x.shape
        k = _linear64(attention.k_proj, x).view(B, T, -1, attention.head_dim)
        v = _linear64(attention.v_proj, x).view(B, T, -1, attention.head_dim)
        half = k.shape[-1] // 2
        rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        self.keys[-1][index] = k * cos + rotated * sin  # [B, T, Hkv, D]
        self.values[-1][index] = v

    def stream(self, per_forward: list[dict[int, torch.Tensor]], layer: int, b: int, pad: int) -> torch.Tensor:
        """Sequence ``b``'s real tokens, in order: ``[tokens, ...]``."""
        return torch.cat([step[layer][b] for step in per_forward], dim=0)[pad:]


def _linear64(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return torch.nn.functional.linear(x, layer.weight.double(), bias)


def rolling_z(values: list[float | None], window: int) -> list[float]:
    """2.1: z of each pushed value over the last ``window`` pushed values; 0 for no value or < 2 values."""
    pushed: list[float] = []
    out = []
    for x in values:
        if x is None:
            out.append(0.0)
            continue
        pushed = (pushed + [x])[-window:]
        if len(pushed) < 2:
            out.append(0.0)
        else:
            out.append((x - statistics.fmean(pushed)) / (statistics.pstdev(pushed) + 1e-6))
    return out


def epikv_scores(tap: Tap, b: int, pad: int, bands, weights) -> list[float]:
    band_values = []
    for band in bands:
        diffs = [
            torch.linalg.vector_norm(torch.diff(tap.stream(tap.hidden, layer, b, pad), dim=0), dim=-1)
            for layer in band
        ]
        mean = torch.stack(diffs).mean(dim=0).tolist()
        band_values.append(rolling_z([None] + mean, WINDOW))  # the first token has no previous one
    return [weights[0] * za - weights[1] * zb for za, zb in zip(*band_values)]


def lag_kv_scores(tap: Tap, b: int, pad: int) -> list[float]:
    per_layer = []
    for layer in range(NUM_LAYERS):
        spread = 0
        for x in (tap.stream(tap.keys, layer, b, pad), tap.stream(tap.values, layer, b, pad)):  # [n, H, D]
            std = torch.empty(x.shape[:2], dtype=torch.float64)
            for t in range(x.shape[0]):
                c = t // LAG_CHUNK
                if c == 0:
                    std[t] = x[t].std(dim=-1, unbiased=False)
                else:
                    previous = x[(c - 1) * LAG_CHUNK : c * LAG_CHUNK]
                    lo, hi = previous.amin(dim=0), previous.amax(dim=0)
                    std[t] = ((x[t] - lo) / (hi - lo + 1e-9)).std(dim=-1, unbiased=False)
            spread = spread + std
        per_layer.append(spread.mean(dim=1))
    return torch.stack(per_layer).mean(dim=0).tolist()


def replay_kept_sets(scores: list[list[float]], chunk_sizes, pads, prompt_lengths, keep_prompt, sink) -> list:
    """2.4 with ``evict_every = 1``: after each forward, once the slots in use reach ``budget + 1``, keep
    the protected tokens (prompt or sink; the ``recent`` newest) and then the highest scores (ties: older)."""
    batch = len(scores)
    kept = [set() for _ in range(batch)]
    seen = [0] * batch
    slots_used = 0
    history = []
    for forward, size in enumerate(chunk_sizes):
        slots_used += size
        for b in range(batch):
            real = size - pads[b] if forward == 0 else size
            kept[b] |= set(range(seen[b], seen[b] + real))
            seen[b] += real
        if slots_used >= BUDGET + 1:
            slots_used = BUDGET
            for b in range(batch):
                prefix = prompt_lengths[b] if keep_prompt else sink
                protected = {p for p in kept[b] if p < prefix or p >= seen[b] - RECENT}
                rest = sorted(kept[b] - protected, key=lambda p: (-scores[b][p], p))
                kept[b] = protected | set(rest[: BUDGET - len(protected)])
        history.append([sorted(k) for k in kept])
    return history


@pytest.mark.parametrize(
    "method, keep_prompt",
    [("epikv", True), ("epikv_flat", True), ("epikv", False), ("lag_kv", True)],
)
def test_kept_set_matches_independent_derivation(method, keep_prompt):
    model = patched_copy(
        tiny_model("llama", num_layers=NUM_LAYERS),
        budget=BUDGET, recent=RECENT, window=WINDOW, lag_chunk=LAG_CHUNK, method=method, keep_prompt=keep_prompt,
    )
    tap = Tap(model)
    inputs = prompts(2)
    greedy(model, inputs, NEW_TOKENS)

    pads = (inputs["attention_mask"] == 0).sum(dim=1).tolist()
    prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
    # 2.1 at 5 layers: A = round(1.1)..round(2.05) = 1..2, B = round(2.8)..round(3.9) = 3..4;
    # EpiKV-Flat: round(5 * 10/32) = 2 and round(5 * 21/32) = 3.
    bands, weights = {"epikv": (((1, 2), (3, 4)), (1.29, 1.0)), "epikv_flat": (((2,), (3,)), (1.0, 1.0))}.get(
        method, (None, None)
    )
    if method == "lag_kv":
        scores = [lag_kv_scores(tap, b, pads[b]) for b in range(2)]
    else:
        scores = [epikv_scores(tap, b, pads[b], bands, weights) for b in range(2)]
    chunk_sizes = [step[0].shape[1] for step in tap.hidden]
    expected = replay_kept_sets(scores, chunk_sizes, pads, prompt_lengths, keep_prompt, sink=4)
    assert len(expected) == NEW_TOKENS
    evicting_steps = sum(1 for step in expected if len(step[0]) == BUDGET)
    assert evicting_steps > NEW_TOKENS // 2
    for step, (mine, theirs) in enumerate(zip(expected, tap.kept)):
        assert theirs == mine, f"forward {step}"
