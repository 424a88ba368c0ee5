"""Qwen3: Qwen2's layout plus per-head q/k norms (applied before RoPE, so the cache
still receives the keys attention uses); sliding layers as in Qwen2 (``layer_types``)."""

from .adapter import ModelAdapter, base_model_layers, windows_from_layer_types

ADAPTER = ModelAdapter("qwen3", base_model_layers, windows_from_layer_types)
