"""The model families a patch supports: one table, one entry per ``config.model_type``.

An entry says where the decoder layers are (a forward hook on each sees the
residual stream after it, ``h_l``) and which layers attend through a sliding
window. Everything else is shared: every supported family's attention modules
call ``Cache.update`` with post-RoPE keys and then the registered attention
function, which is where keys, values and their delta norms come from.
Adding a family whose layers follow that pattern is one entry in
:data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


def decoder_layers_of_base_model(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a ``*ForCausalLM`` (``model.layers`` of the base model itself)."""
    return model.get_decoder().layers


def no_sliding_windows(config: object) -> list[int | None]:
    return [None] * config.num_hidden_layers


def windows_from_layer_types(config: object) -> list[int | None]:
    """Qwen-style: ``config.layer_types[i] == "sliding_attention"`` sees ``config.sliding_window`` tokens."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [config.sliding_window if kind == "sliding_attention" else None for kind in layer_types]


@dataclass(frozen=True)
class Family:
    """``decoder_layers(model)``: the decoder layers in order, each with a ``self_attn`` module;
    ``sliding_windows(config)``: per layer, its sliding window or ``None``."""

    decoder_layers: Callable[[nn.Module], nn.ModuleList] = decoder_layers_of_base_model
    sliding_windows: Callable[[object], list[int | None]] = no_sliding_windows


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    # Llama's layout; with use_sliding_window, layers from max_window_layers on are marked sliding_attention.
    "qwen2": Family(sliding_windows=windows_from_layer_types),
    # Qwen2's layout plus per-head q/k norms, applied before RoPE, so the cache still gets the keys attention uses.
    "qwen3": Family(sliding_windows=windows_from_layer_types),
}


def family_of(model: nn.Module) -> Family:
    """The family of ``model``; ``NotImplementedError`` naming the supported model types otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"epikv_triton.patch supports model types {', '.join(sorted(FAMILIES))}; got {model_type!r}"
        )
    return FAMILIES[model_type]
