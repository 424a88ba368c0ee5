"""Every call into transformers' continuous-batching engine (``transformers.generation.continuous_batching``).

The engine is internal to transformers and moves between releases (this
module is checked against 5.23 and 5.25); like :mod:`.internals` for the rest
of the integration, it is the one place that touches it. What it relies on:

* the manager builds its batch processor in ``_create_batch_processor`` (once,
  then reuses it), holding the paged cache (``cache``), the batch inputs
  (``inputs_and_outputs.prepare_batch_tensors``, called once per forward with
  the scheduled requests, before the forward) and a full-attention allocator;
* a request's ``position_offset`` is both its cached-token count (read/write
  indices, key lengths, pages needed) and the position of its next token: an
  evicting request's offset counts the tokens it holds, and the positions are
  shifted back by its evictions in the forward (see :mod:`.continuous_batching`);
* the allocator's ``get_read_indices(request, 0, n)`` names the physical rows of
  a request's first ``n`` cached tokens in every layer's token view
  (``_kv_token_views``), and its ``block_table`` / ``pool`` own its pages;
  ``needs_new_blocks`` / ``allocate_cache_to_request`` are what the scheduler
  asks before admitting or growing a request, ``update`` receives each layer's
  new keys and values (off the decode fast path), ``free_blocks`` ends a request;
* every attention layer calls the function ``AttentionInterface`` maps the
  model's ``config._attn_implementation`` to, with the packed queries (after
  RoPE) and ``scaling``, and the layer's new keys are in its pages when it
  returns (written by ``update`` before it, or by a flash kernel in it).

Every hook is an attribute set on the engine's own objects (this manager, its
processor, its allocator), never on a transformers class, except one: the
attention function the engine runs is registered again, through the public
``AttentionInterface.register``, wrapped by :func:`observe_attention_calls`;
the wrapper calls the original and then an observer that does nothing outside
a patched model's engine forward.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: Attention implementations the engine accepts (it switches ``eager`` to ``paged|eager`` itself).
_ENGINE_ATTENTION = ("paged|eager", "sdpa")


@dataclass(frozen=True)
class ScheduledRequest:
    """One request of the batch about to run: the engine's record of it and its share of the batch."""

    state: Any  # the engine's RequestState
    query_length: int

    @property
    def request_id(self) -> str:
        return self.state.request_id

    @property
    def prompt_length(self) -> int:
        return len(self.state.initial_tokens)

    @property
    def max_new_tokens(self) -> int | None:
        return getattr(self.state, "max_new_tokens", None)


def engine_config(continuous_batching_config: Any, generation_config: Any, observe_keys: bool) -> Any:
    """A copy of the caller's ``ContinuousBatchingConfig`` (or a default one) with prefix sharing, async batching and
    CUDA graphs off: a shared block would be evicted under its other readers, an async engine prepares the next batch
    before this one's eviction has shrunk its requests, and a replayed graph skips the Python hooks that score and
    evict. ``observe_keys``: the decode fast path is off too, since its kernels write the keys themselves, past
    :func:`on_keys`. Asking for any of these (or for a compiled forward) is refused."""
    from transformers import ContinuousBatchingConfig

    config = ContinuousBatchingConfig() if continuous_batching_config is None else copy.copy(continuous_batching_config)
    asked = {
        "use_async_batching=True": config.use_async_batching,
        "use_cuda_graph": config.use_cuda_graph not in (None, False, (False, False)),
        "varlen_compile_config / decode_compile_config": config.varlen_compile_config or config.decode_compile_config,
        "default_compile_level": getattr(config, "default_compile_level", 0),
        "a compile_config in the generation config": getattr(generation_config, "compile_config", None),
    }
    refused = [name for name, value in asked.items() if value]
    if refused:
        raise NotImplementedError(
            f"continuous batching with {', '.join(refused)} cannot evict on a model patched by epikv_triton: eviction "
            "runs in Python hooks between the engine's batches, which an async, graph-replayed or compiled engine "
            "skips. Leave these settings unset"
        )
    config.allow_block_sharing = False
    config.use_async_batching = False
    config.use_cuda_graph = False
    if observe_keys:
        config.max_blocks_per_request = 0
    return config


def switch_attention(model: torch.nn.Module, original: str) -> None:
    """Give the model an attention implementation the engine accepts (``"epikv"`` is not one): the model's own one
    before patching when the engine takes it, else ``sdpa``."""
    name = "paged|eager" if original == "eager" else original
    model.set_attn_implementation(name if name in _ENGINE_ATTENTION or "flash" in name else "sdpa")


def restore_attention_on_stop(manager: Any, attention: str) -> None:
    """The manager restores the implementation it switched from when it stops; it did not switch (we did): make it
    restore ``attention``."""
    manager._original_attn_impl = attention


def on_batch_processor(manager: Any, install: Callable[[Any], None]) -> None:
    """Run ``install(processor)`` on the batch processor the manager builds (on its generation thread, before the
    first batch). The manager reuses it across runs: ``install`` sees each processor once."""
    if getattr(manager, "_epikv_watched", False):
        return
    create = manager._create_batch_processor

    def create_and_install() -> Any:
        processor = create()
        if not getattr(processor, "_epikv_installed", False):
            install(processor)
            processor._epikv_installed = True
        return processor

    manager._create_batch_processor = create_and_install
    manager._epikv_watched = True


def full_attention_allocator(processor: Any) -> FullAttentionCacheAllocator:
    """The processor's one allocator; a model with other kinds of layers (sliding window, MLA) is refused."""
    allocators = list(processor.cache.cache_allocators.values())
    if len(allocators) != 1 or type(allocators[0]) is not FullAttentionCacheAllocator:
        kinds = ", ".join(type(a).__name__ for a in allocators)
        raise NotImplementedError(
            f"continuous batching with eviction needs a model whose layers all use full attention (got {kinds})"
        )
    return allocators[0]


def on_batch(processor: Any, record: Callable[[list[ScheduledRequest]], None]) -> None:
    """Call ``record`` with the requests of every batch, in batch order, before the engine prepares its inputs."""
    inputs = processor.inputs_and_outputs
    prepare = inputs.prepare_batch_tensors

    @functools.wraps(prepare)
    def prepare_and_record(*args: Any, **kwargs: Any) -> Any:
        requests = kwargs.get("requests_in_batch", args[0] if args else None)
        record([ScheduledRequest(future.state, future.query_length) for future in requests])
        return prepare(*args, **kwargs)

    inputs.prepare_batch_tensors = prepare_and_record


def on_keys(allocator: FullAttentionCacheAllocator, observe: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
    """Call ``observe(layer, keys, values)`` with each layer's new keys and values ``[N, Hkv, D]`` (the packed batch,
    after RoPE) as the engine writes them."""
    update = allocator.update

    @functools.wraps(update)
    def observe_and_update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any) -> Any:
        observe(layer_idx, key_states, value_states)
        return update(key_states, value_states, layer_idx, *args)

    allocator.update = observe_and_update


#: What an observer of attention calls receives: the attention module, its packed ``[1, Hq, N, D]`` queries and the
#: scale the call was given (``None``: the function's default).
AttentionObserver = Callable[[torch.nn.Module, torch.Tensor, "float | None"], None]


def observe_attention_calls(config: Any, observe: AttentionObserver) -> None:
    """Make the attention function the engine runs for ``config`` (the model's config, as the engine switched it)
    call ``observe`` after each call. Registered once per name (the model's layers look the function up by name at
    every call, so this covers the forward about to run); the wrapper stays registered and passes every other
    model's calls straight through, since ``observe`` ignores them."""
    name = config._attn_implementation
    if name != "paged|eager":
        name = name.removeprefix("paged|")  # how the interface resolves the deprecated prefix
    attention = ALL_ATTENTION_FUNCTIONS[name]
    if getattr(attention, "epikv_observer", None) is observe:
        return

    @functools.wraps(attention)
    def attend_and_observe(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
        *args: Any, **kwargs: Any,
    ) -> Any:
        output = attention(module, query, key, value, mask, *args, **kwargs)
        observe(module, query, kwargs.get("scaling", getattr(module, "scaling", None)))
        return output

    attend_and_observe.epikv_observer = observe
    AttentionInterface.register(name, attend_and_observe)


def cached_rows(allocator: FullAttentionCacheAllocator, request_id: str, length: int) -> torch.Tensor:
    """``[length]`` int64: the rows of every layer's token views that hold the request's first ``length`` cached
    tokens, in the order of its pages (the same in every layer: one block table per request)."""
    keys = allocator._kv_token_views[0][0]
    return torch.tensor(allocator.get_read_indices(request_id, 0, length), dtype=torch.int64, device=keys.device)


def cached_keys_and_values(
    allocator: FullAttentionCacheAllocator, layer: int, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, Hkv, len(rows), D]`` each: the keys and values at ``rows`` (:func:`cached_rows`) of layer ``layer``."""
    keys, values = allocator._kv_token_views[layer]
    return tuple(view.index_select(0, rows).transpose(0, 1)[None] for view in (keys, values))


def engine_cache(kwargs: dict) -> PagedAttentionCache | None:
    """The engine's paged cache among a forward's keyword arguments (the engine passes it as ``cache``)."""
    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if isinstance(value, PagedAttentionCache):
            return value
    return None


def move_slots(
    allocator: FullAttentionCacheAllocator, request_id: str, used: int, sources: torch.Tensor,
    destinations: torch.Tensor,
) -> None:
    """Copy the keys and values of the request's cached tokens ``sources`` onto ``destinations`` (indices among its
    first ``used`` tokens), in every layer."""
    if sources.numel() == 0:
        return
    rows = cached_rows(allocator, request_id, used)
    source_rows, destination_rows = rows[sources.to(rows.device)], rows[destinations.to(rows.device)]
    for keys, values in allocator._kv_token_views.values():
        for view in (keys, values):
            view.index_copy_(0, destination_rows, view.index_select(0, source_rows))


def reserve_pages(allocator: FullAttentionCacheAllocator, pages_per_request: int) -> None:
    """Every request takes ``pages_per_request`` pages when it is admitted (more only if a chunk needs them), so the
    scheduler admits a request only when its whole bounded footprint fits: an admitted request never starves, and
    the engine never offloads or restarts it (a restarted request would re-read its generated tokens as a prompt,
    which ``generate`` never does)."""
    page = allocator.tokens_per_page
    table = allocator.block_table

    def blocks_needed(request_id: str, past_length: int, query_length: int) -> int:
        held = len(table.get(request_id, ()))
        needed = -(-(past_length + query_length) // page)
        if request_id not in table:
            needed = max(needed, pages_per_request)
        return max(0, needed - held)

    def allocate(request_id: str, past_length: int, query_length: int) -> None:
        blocks = blocks_needed(request_id, past_length, query_length)
        table.setdefault(request_id, []).extend(allocator.pool.get_free_blocks(allocator.index, blocks))

    allocator.needs_new_blocks = blocks_needed
    allocator.allocate_cache_to_request = allocate


def set_cached_length(state: Any, kept: int) -> None:
    """After an eviction the request holds its first ``kept`` cached tokens: the engine's count says so."""
    state.position_offset = kept


def page_ids(allocator: FullAttentionCacheAllocator, request_id: str) -> list[int]:
    """The blocks (one page per layer each) the request holds, in order."""
    return list(allocator.block_table.get(request_id, ()))


def pages_in_use(allocator: FullAttentionCacheAllocator) -> int:
    """Blocks the requests hold now (prefix sharing is off: no block is held twice)."""
    return sum(map(len, allocator.block_table.values()))


def pool_pages(allocator: FullAttentionCacheAllocator) -> int:
    """Blocks the pool has in all."""
    return allocator.num_blocks


def on_request_freed(allocator: FullAttentionCacheAllocator, forget: Callable[[str], None]) -> None:
    """Call ``forget(request_id)`` when the engine frees a request's pages (finished or cancelled)."""
    free_blocks = allocator.free_blocks

    @functools.wraps(free_blocks)
    def free_and_forget(request_id: str, *args: Any, **kwargs: Any) -> Any:
        forget(request_id)
        return free_blocks(request_id, *args, **kwargs)

    allocator.free_blocks = free_and_forget
