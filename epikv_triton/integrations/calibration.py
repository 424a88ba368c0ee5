"""``calibrate``: record a Hugging Face model reading calibration text, then choose its ``epikv`` bands.

The recording (``docs/method.md`` section 8) is one no-grad pass per window of
text with the full cache and eager attention (the implementation that hands
back attention probabilities): forward hooks on the decoder layers give every
layer's ``diff_l[t]``, hooks on their attention modules and value projections
(``self_attn.v_proj``, which every supported family has) the oracle.
:func:`epikv_triton.calibration.choose` then picks the bands.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..calibration import Calibration, Window, choose, future_reads, oracle_of_reads
from ..scoring.bands import step_norms
from . import internals
from .families import family_of
from .state import state_of


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str],
    *,
    window_tokens: int = 1024,
    min_distance: int = 64,
    keep_fraction: float = 0.25,
    **settings: Any,
) -> Calibration:
    """Choose this model's ``epikv`` bands, weights and signs from ``texts``; ``.config`` is the result.

    ``texts`` (joined by blank lines) are tokenized by ``tokenizer`` (any callable returning
    ``{"input_ids": [...]}``) and read in windows of ``window_tokens`` tokens, each a fresh
    stream, so memory stays bounded; a few thousand tokens of text like the model's workload
    are enough for a first choice. A token's importance is how much the queries at least
    ``min_distance`` tokens later read from it, attention weighted by value norm (:func:`record`),
    the reads a bounded cache must keep once the token has left the recent window. ``keep_fraction`` is the share of
    tokens counted as kept (the cache's budget over the context); ``settings`` are the other
    :class:`~epikv_triton.EpiKVConfig` keywords of the returned config (``budget``, ...).

    Save the choice with ``calibration.config.save(path)``, use it with
    ``epikv_triton.patch(model, config=calibration.config)``; ``calibration.summary()``
    compares it with the default bands.
    """
    windows = record(model, tokenizer, texts, window_tokens=window_tokens, min_distance=min_distance)
    return choose(windows, keep_fraction=keep_fraction, **settings)


def record(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str],
    *,
    window_tokens: int = 1024,
    min_distance: int = 64,
) -> list[Window]:
    """Every layer's residual-stream change and each token's future reads (the oracle of
    :func:`epikv_triton.calibration.oracle_of_reads`), one :class:`Window` per window of text.

    The model must not be patched; its attention implementation is restored afterwards.
    """
    if state_of(model) is not None:
        raise ValueError(
            "calibrate records the full-cache run of an unpatched model: call epikv_triton.unpatch(model) first"
        )
    if min_distance < 1 or window_tokens < 4 * min_distance:
        raise ValueError(
            f"need min_distance >= 1 and window_tokens >= 4 * min_distance, got {min_distance} and {window_tokens}"
        )
    ids = tokenizer(texts if isinstance(texts, str) else "\n\n".join(texts))["input_ids"]
    starts = [start for start in range(0, len(ids), window_tokens) if len(ids) - start >= 4 * min_distance]
    if not starts:
        raise ValueError(
            f"the calibration text is {len(ids)} tokens; calibrate needs at least 4 * min_distance = "
            f"{4 * min_distance} (a few thousand give a steadier choice)"
        )
    layers = family_of(model).decoder_layers(model)
    device = next(model.parameters()).device
    original = internals.attention_implementation(model)
    model.set_attn_implementation("eager")
    try:
        return [
            _record_window(model, layers, torch.tensor([ids[start : start + window_tokens]], device=device),
                           min_distance)
            for start in starts
        ]
    finally:
        model.set_attn_implementation(original)


def _record_window(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, min_distance: int) -> Window:
    T = input_ids.shape[1]
    diffs = torch.full((len(layers), T), math.nan)
    reads = torch.zeros(T, dtype=torch.float64)
    value_norms: dict[int, torch.Tensor] = {}

    def on_layer(index: int, module: nn.Module, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        diffs[index, 1:] = step_norms(hidden, hidden[:, 0])[0, 1:].cpu()

    def on_values(index: int, head_dim: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        value_norms[index] = output[0].unflatten(-1, (-1, head_dim)).float().norm(dim=-1).T  # [KV heads, T]

    def on_attention(index: int, module: nn.Module, args: tuple, output: Any) -> None:
        probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probabilities is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention probabilities under eager attention")
        heads = probabilities.shape[1]
        norms = value_norms.pop(index)
        norms = norms.repeat_interleave(heads // norms.shape[0], dim=0)  # each query head's KV head
        reads.add_(future_reads(probabilities[0], norms, min_distance).cpu())

    hooks = []
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        hooks.append(layer.register_forward_hook(functools.partial(on_layer, index)))
        hooks.append(attention.v_proj.register_forward_hook(functools.partial(on_values, index, attention.head_dim)))
        hooks.append(attention.register_forward_hook(functools.partial(on_attention, index)))
    try:
        with torch.inference_mode():
            model.get_decoder()(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return Window(diffs, oracle_of_reads(reads, len(layers), min_distance))
