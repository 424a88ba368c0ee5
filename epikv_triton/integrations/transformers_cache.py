"""EpiKVCache: the transformers ``Cache`` face of a :class:`~epikv_triton.store.SlotStore`.

One layer object per decoder layer, all sharing one slot store. ``update``
writes the new keys/values in place and returns views of the slots in use;
``get_seq_length`` counts tokens *seen* (what generate and RoPE need), while
``get_mask_sizes`` reports the physical key length. Operations that assume
the cache holds every past token (``crop``, beam reordering) raise.

The forward hooks and the attention function talk to the cache through its
chunk methods (``open_chunk``, ``attend``, ``observe_hidden``, ``close_chunk``),
never to the store behind it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import EpiKVConfig
from ..store import CacheStats, SlotStore


class EpiKVLayer(CacheLayerMixin):
    """One decoder layer's view of the shared slot store.

    ``_layer_type`` stays ``None`` so transformers does not register this class
    in its process-global layer mappings.
    """

    is_croppable = False
    is_sliding = False
    # The store allocates itself at the first write, for every layer at once.
    supports_early_init = False

    def __init__(self, store: SlotStore, layer_idx: int, compileable: bool):
        super().__init__()
        self.store = store
        self.layer_idx = layer_idx
        # Whether ``generate`` may compile its decode step over this cache: only when the caller asked for
        # it (``compile_config``). The decode step traces to one graph either way (see the store's chunks).
        self.is_compileable = compileable

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("EpiKVLayer is allocated by its slot store on the first update, never ahead of time")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.store.chunk_open:
            # Only a patched model's forward opens a chunk before its layers write.
            raise RuntimeError(
                "an EpiKVCache only works with the model it was made for, patched by epikv_triton.patch: this model "
                "is not patched (or was unpatched). Pass no cache, or patch the model"
            )
        keys, values = self.store.write(self.layer_idx, key_states, value_states)
        self.is_initialized = True
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.fill + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.stream_length

    def get_max_length(self) -> int:
        return -1  # generation length is unbounded; memory is bounded by the budget instead

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _unsupported("beam search (reorder_cache)")


class EpiKVCache(Cache):
    """Bounded KV cache for a patched model; build it with ``epikv_triton.new_cache(model)``."""

    def __init__(
        self,
        config: EpiKVConfig,
        num_layers: int,
        prompt_lengths: Sequence[int] | None = None,
        expected_length: int | None = None,
        chunk_size: int | None = None,
        compiled_generation: bool = False,
        tensor_parallel_group: dist.ProcessGroup | None = None,
    ):
        self.store = SlotStore(config, num_layers, prompt_lengths, expected_length, chunk_size, tensor_parallel_group)
        super().__init__(layers=[EpiKVLayer(self.store, i, compiled_generation) for i in range(num_layers)])

    @property
    def config(self) -> EpiKVConfig:
        return self.store.config

    @property
    def num_layers(self) -> int:
        return self.store.num_layers

    @property
    def tensor_parallel_group(self) -> dist.ProcessGroup | None:
        """The tensor-parallel ranks whose caches keep the same tokens as this one, or ``None``."""
        return self.store.tensor_parallel_group

    # ------------------------------------------------------- one forward pass
    @property
    def chunk_open(self) -> bool:
        """A forward over this cache began and has not ended (it is running, or it raised midway)."""
        return self.store.chunk_open

    def open_chunk(
        self,
        batch: int,
        num_tokens: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Begin a forward of ``num_tokens`` new tokens per sequence; returns their positions ``[B, T]``
        (``-1`` = padding), from ``position_ids`` or the 2D padding mask."""
        positions = self.store.next_positions(batch, num_tokens, attention_mask, position_ids, device=device)
        self.store.begin_chunk(positions)
        return positions

    def attend(
        self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float | None,
        window: int | None,
    ) -> torch.Tensor:
        """Attention of the chunk's ``query [B, Hq, T, D]`` over what ``update`` returned; ``[B, Hq, T, D]``."""
        return self.store.attend(layer, query, keys, values, scale=scale, window=window)

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """The output ``[B, T, H]`` of decoder layer ``layer`` (the residual stream) for the chunk."""
        self.store.observe_hidden(layer, hidden)

    def close_chunk(self) -> None:
        """End the forward: scores fixed, eviction when due."""
        self.store.end_chunk()

    # ------------------------------------------------------------ inspection
    def stats(self) -> CacheStats:
        """Per sequence: tokens seen, kept, evicted, KV bytes held; and the physical buffer."""
        return self.store.stats()

    def kept_positions(self) -> list[list[int]]:
        """Sorted absolute positions of the tokens each sequence holds."""
        return self.store.kept_positions()

    def reset(self) -> None:
        self.store.reset()
        for layer in self.layers:
            layer.is_initialized = False

    # ----------------------------------------------------------- refusals
    def crop(self, tokens_to_remove: int) -> None:
        raise _unsupported("crop (assisted decoding, prompt-lookup or any rollback)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _unsupported("beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise _unsupported("expanding the batch of a cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise _unsupported("selecting batch rows of a cache")


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"EpiKVCache does not support {what}: it evicts tokens for good, so it cannot roll back or fork "
        "sequences. Use greedy decoding or sampling (no beams, no assistant model), or unpatch the model."
    )
