"""One forward pass of a patched model: the hooks and the ``"epikv"`` attention function.

1. A forward pre-hook on the decoder stack (:func:`begin_forward`) takes the
   ``EpiKVCache`` from the call's cache keyword (``cache``, or
   ``past_key_values`` before transformers 5.24; see :mod:`.keywords`), or makes
   a fresh one, and opens a chunk: the new tokens' absolute positions come from
   ``position_ids`` or the 2D padding mask (``-1`` for padding). When the caller
   gave no ``position_ids`` it passes these positions on, so RoPE and
   visibility agree.
2. Each attention layer calls ``Cache.update`` (an in-place slot write), then
   :func:`epikv_attention`, registered in transformers' ``AttentionInterface``:
   attention over the slots, visibility from the slots' own positions. HF's
   mask is not used, so the name is deliberately *not* registered in
   ``AttentionMaskInterface``: HF then skips building a mask nobody reads.
3. Forward hooks on the layers a scorer reads (:func:`observe_hidden`) hand it
   the residual stream.
4. A forward hook on the decoder stack (:func:`end_forward`) closes the chunk:
   scores are fixed and the cache evicts when it is over its cadence.

A forward of transformers' continuous-batching engine keeps its paged cache
and its attention; the hooks talk to the engine session of
:mod:`.continuous_batching` instead of a cache, and, for a method that scores
from attention, so does every attention call the engine makes
(:func:`observe_engine_attention`).

A forward with ``use_cache=False`` and no cache is plain attention over the
chunk (a throwaway ``full`` cache: no scoring, no eviction). The cache of the
forward in progress is per thread, so threads may share a patched model.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..config import EpiKVConfig
from . import engine
from .keywords import pop_cache
from .state import PatchState, state_of
from .transformers_cache import EpiKVCache

ATTENTION_NAME = "epikv"

# Per thread, the cache of each patched model's forward in progress: two threads may run one patched model
# at once, each over its own cache. (A plain attribute, so a compiled decode step traces it.)
_ACTIVE = threading.local()


def _active_caches() -> dict[PatchState, EpiKVCache]:
    caches = getattr(_ACTIVE, "caches", None)
    if caches is None:
        caches = _ACTIVE.caches = {}
    return caches


def epikv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"epikv"`` attention function: attention over the cache's slots.

    ``key``/``value`` are what ``EpiKVCache.update`` returned; positions, the
    sliding window and the previous chunk's last key come from the cache and
    the model's family, not from ``attention_mask``. Returns ``[B, T, Hq, D]``.
    """
    state = state_of(module)
    cache = None if state is None else _active_caches().get(state)
    if cache is None:
        raise RuntimeError(
            "the 'epikv' attention function only runs inside a model patched by epikv_triton.patch; "
            "call epikv_triton.unpatch(model) to use another attention implementation"
        )
    if dropout > 0:
        raise ValueError("EpiKV attention is inference-only: attention dropout must be 0 (call model.eval())")
    layer = module.layer_idx
    out = cache.attend(layer, query, key, value, scale=scaling, window=state.windows[layer])
    return out.transpose(1, 2), None


def begin_forward(state: PatchState, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the decoder stack: the cache for this forward, and its chunk opened."""
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        raise ValueError(
            "a model patched by epikv_triton does not compute attention weights (output_attentions=True): "
            "epikv_triton.unpatch(model) to inspect them"
        )
    session = state.engine_session
    if session is not None and engine.engine_cache(kwargs) is not None:
        # A forward of transformers' continuous-batching engine: its paged cache stays; the session evicts.
        session.begin_forward(kwargs)
        if session.reads_cache:
            engine.observe_attention_calls(module.config, observe_engine_attention)
        _active_caches()[state] = session
        return args, kwargs
    cache = _cache_for(state, module, kwargs)
    kwargs[state.cache_keyword] = cache
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs["inputs_embeds"]
    batch, num_tokens = inputs.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
        raise ValueError(
            "a model patched by epikv_triton takes a 2D padding mask [batch, tokens] (or none): "
            "visibility comes from the cache's slot positions"
        )
    position_ids = kwargs.get("position_ids")
    positions = cache.open_chunk(batch, num_tokens, mask, position_ids, device=inputs.device)
    if position_ids is None:
        kwargs["position_ids"] = positions.clamp(min=0)
    _active_caches()[state] = cache
    return args, kwargs


def _cache_for(state: PatchState, module: nn.Module, kwargs: dict) -> EpiKVCache:
    """The caller's cache (checked), or a fresh one; removes it from ``kwargs`` under either keyword."""
    cache = pop_cache(kwargs)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if (module.config.use_cache if use_cache is None else use_cache) is False:
            # Nothing will read a cache after this forward (a loss or perplexity pass): plain attention over
            # the chunk, with no scoring and no prompt to protect.
            return EpiKVCache(EpiKVConfig(budget=state.config.budget, method="full"), state.num_layers)
        return state.new_cache()
    if not isinstance(cache, EpiKVCache):
        raise TypeError(
            f"a model patched by epikv_triton needs an EpiKVCache as {state.cache_keyword}, got "
            f"{type(cache).__name__}: pass epikv_triton.new_cache(model), or nothing"
        )
    if not state.accepts(cache):
        raise ValueError(
            "this EpiKVCache was made for another model or other settings: build it with epikv_triton.new_cache(model)"
        )
    return cache


def end_forward(state: PatchState, module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook of the decoder stack (always called): closes the chunk of a forward that finished."""
    cache = _active_caches().pop(state, None)
    # When the forward raised (output None), its chunk stays open: the cache then refuses the next one.
    # (A KeyboardInterrupt skips this hook altogether, with the same effect; the next forward replaces the entry.)
    if cache is not None and cache.chunk_open and output is not None:
        cache.close_chunk()


def observe_hidden(state: PatchState, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook of a decoder layer the scorer reads: its output is the residual stream ``h_layer``."""
    hidden = output[0] if isinstance(output, tuple) else output
    _active_caches()[state].observe_hidden(layer, hidden)


def observe_engine_attention(module: nn.Module, query: torch.Tensor, scale: float | None) -> None:
    """After an attention call of the continuous-batching engine: the packed queries go to the session of the
    forward in progress, when this is a patched model's engine forward (any other call is none of ours)."""
    state = state_of(module)
    session = None if state is None else state.engine_session
    if session is not None and _active_caches().get(state) is session:
        session.observe_attention(module.layer_idx, query, scale)
