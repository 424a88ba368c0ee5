"""Llama: decoder layers at ``model.model.layers``, full attention everywhere."""

from .adapter import ModelAdapter, base_model_layers, no_sliding_windows

ADAPTER = ModelAdapter("llama", base_model_layers, no_sliding_windows)
