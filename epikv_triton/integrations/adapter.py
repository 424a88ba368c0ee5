"""What the integration needs to know about a model family, in one small record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Where a family keeps the pieces EpiKV hooks into.

    ``decoder_layers(model)``: the decoder layers, in order; a forward hook on
    each sees the residual stream after it (``h_l``). Their ``self_attn``
    modules call ``Cache.update`` with post-RoPE keys and then the registered
    attention function, which is where keys, values and their delta norms come
    from. ``sliding_windows(config)``: per layer, the sliding window or ``None``.
    """

    model_type: str
    decoder_layers: Callable[[nn.Module], nn.ModuleList]
    sliding_windows: Callable[[object], list[int | None]]


def base_model_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` for a ``*ForCausalLM``, ``model.layers`` for the base model itself."""
    return model.get_decoder().layers


def no_sliding_windows(config: object) -> list[int | None]:
    return [None] * config.num_hidden_layers


def windows_from_layer_types(config: object) -> list[int | None]:
    """Qwen-style configs: ``layer_types[i] == "sliding_attention"`` uses ``config.sliding_window``."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [config.sliding_window if kind == "sliding_attention" else None for kind in layer_types]
