"""Qwen2: Llama's layout; with ``use_sliding_window``, layers from ``max_window_layers`` on
are marked ``sliding_attention`` in ``config.layer_types`` and see ``config.sliding_window`` tokens."""

from .adapter import ModelAdapter, base_model_layers, windows_from_layer_types

ADAPTER = ModelAdapter("qwen2", base_model_layers, windows_from_layer_types)
