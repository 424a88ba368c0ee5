"""The masking-only reference: what eviction must equal, token for token.

The unpatched model keeps every token in a ``DynamicCache`` and only *hides*
the ones the patched run evicted (an additive mask per step, built from the
kept positions the patched cache reported after every forward). Sliding-window
layers get the same mask narrowed to the window. If eviction frees a slot,
moves another, or attends differently in any way, the tokens diverge.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from .models import CACHE, cached


def record_steps(model: torch.nn.Module) -> list[dict]:
    """After every forward of ``model``: what its cache holds, how big its buffer is, how many slots moved."""
    steps: list[dict] = []

    def hook(module, args, output):
        cache = getattr(output, CACHE)
        stats = cache.stats()
        steps.append(
            dict(
                kept=cache.kept_positions(),
                seq_length=cache.get_seq_length(),
                slots_used=stats.slots_used,
                capacity=stats.capacity,
                seen=[s.tokens_seen for s in stats.sequences],
                evicted=[s.tokens_evicted for s in stats.sequences],
                moved=[s.slots_moved for s in stats.sequences],
                evictions=stats.eviction_passes,
            )
        )

    model.register_forward_hook(hook)
    return steps


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def sampling_choice(temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``generate(do_sample=True, top_k=0, temperature=t)`` draws from the global generator."""

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    return choose


def masked_reference(
    model: torch.nn.Module,
    inputs: dict,
    kept_after_step: list,
    new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor] = greedy_choice,
) -> torch.Tensor:
    """Tokens of the unpatched ``model`` keeping every token but hiding the ones the patched run evicted.

    Stream slot ``j`` of sequence ``b`` holds position ``j - pad[b]``; before
    forward ``i`` the patched cache held ``kept_after_step[i - 1]`` plus the new
    token. Set the global seed before calling when ``choose`` samples.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, P = ids.shape
    pad = (mask == 0).sum(dim=1)
    window = getattr(model.config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or [])
    # Sliding layers keep every key too (the window is in the mask), so every layer is a plain full one.
    cache = DynamicCache() if sliding else DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), **cached(cache))
    tokens = [choose(out.logits[:, -1])]
    for step in range(1, new_tokens):
        length = P + step
        visible = torch.zeros(B, length, dtype=torch.bool)
        for b in range(B):
            visible[b, [int(pad[b]) + p for p in kept_after_step[step - 1][b]]] = True
        visible[:, -1] = True
        attention_mask = _additive(visible)
        if sliding:
            # Padding sits only before the prompt, so slot distance is position distance.
            in_window = torch.arange(length) > length - 1 - window
            attention_mask = {"full_attention": attention_mask, "sliding_attention": _additive(visible & in_window)}
        position = (P - pad + step - 1)[:, None]
        out = model(
            input_ids=tokens[-1][:, None], attention_mask=attention_mask, position_ids=position, **cached(cache)
        )
        tokens.append(choose(out.logits[:, -1]))
    return torch.stack(tokens, dim=1)


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape[0], 1, 1, visible.shape[1]).masked_fill(
        ~visible[:, None, None], torch.finfo(torch.float32).min
    )
