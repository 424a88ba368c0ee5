"""Every private transformers call the integration makes, in one place.

These are not public API and may move between releases; CI runs the floor
(5.23) and the newest release, and this module is where a change lands.
Each wrapper says why the private call is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def attention_implementation(model: nn.Module) -> str:
    """The name ``model`` attends with (``config._attn_implementation``), to restore it on unpatch."""
    return model.config._attn_implementation


def merged_generation_config(model: nn.Module, given: Any, kwargs: dict) -> Any:
    """The generation config ``generate`` would use: model defaults, ``given`` and ``kwargs`` merged by
    transformers' own code (a copy; nothing is modified). Needed to refuse unsupported modes before any work."""
    generation_config, _ = model._prepare_generation_config(given, **kwargs)
    return generation_config


def inferred_padding_mask(model: nn.Module, generation_config: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The 2D padding mask ``generate`` infers from ``pad_token_id`` when the caller gave none, computed with
    its own code (on ``generation_config``, a copy, which it annotates; ``None`` kwargs: no warnings, generate
    gives its own). Needed to count each prompt's real tokens for ``keep_prompt``."""
    model._prepare_special_tokens(generation_config, None, inputs.device)
    return model._prepare_attention_mask_for_generation(inputs, generation_config, {})


def will_compile_forward(model: nn.Module, model_kwargs: dict, generation_config: Any) -> bool:
    """Whether ``generate`` will run its forwards through the compiled call with these kwargs."""
    return model._valid_auto_compile_criteria(model_kwargs, generation_config)
