"""What ``patch`` changed on one model: a record on the modules themselves.

It lives on the model and on each attention module (attribute
:data:`STATE_ATTRIBUTE`), and the hooks and ``generate`` wrapper reach it
through ``functools.partial``: ``copy.deepcopy`` of a patched model then copies
one consistent record along with the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..config import EpiKVConfig
from .transformers_cache import EpiKVCache

STATE_ATTRIBUTE = "_epikv_patch"


@dataclass(eq=False)  # hashed by identity: the key of the forward in progress (see .forward)
class PatchState:
    """A patched model's settings and what ``unpatch`` must undo."""

    config: EpiKVConfig
    num_layers: int
    windows: list[int | None]  # per layer: its sliding window or None
    cache_keyword: str  # what the installed transformers calls the cache argument
    original_attn_implementation: str
    # The instance's own ``generate`` / ``prepare_inputs_for_generation`` / ``init_continuous_batching`` /
    # ``generate_batch`` attributes before patching, if any.
    own_generate: Any
    own_prepare_inputs: Any
    own_init_continuous_batching: Any = None
    own_generate_batch: Any = None
    # The process group of the tensor-parallel ranks the model is sharded over, or None (see .placement).
    tensor_parallel_group: Any = None
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    attention_modules: list[nn.Module] = field(default_factory=list)
    # The eviction of the last continuous-batching engine started on the model (see .continuous_batching), or None.
    engine_session: Any = None

    def new_cache(
        self,
        prompt_lengths: Sequence[int] | None = None,
        expected_length: int | None = None,
        chunk_size: int | None = None,
        compiled_generation: bool = False,
    ) -> EpiKVCache:
        return EpiKVCache(
            self.config, self.num_layers, prompt_lengths, expected_length, chunk_size, compiled_generation,
            self.tensor_parallel_group,
        )

    def accepts(self, cache: EpiKVCache) -> bool:
        """``cache`` was made for a model of this depth with these settings, over the same tensor-parallel ranks."""
        return (
            cache.config == self.config and cache.num_layers == self.num_layers
            and cache.tensor_parallel_group is self.tensor_parallel_group
        )


def state_of(module: nn.Module) -> PatchState | None:
    """The patch record of a patched model or attention module, else ``None``."""
    return vars(module).get(STATE_ATTRIBUTE)
