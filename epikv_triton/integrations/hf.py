"""``patch`` / ``unpatch`` / ``new_cache``: bounded-cache generation for Hugging Face models.

How a patched model runs one forward pass (one chunk of new tokens):

1. A forward pre-hook on the decoder stack takes the ``EpiKVCache`` from the
   call's cache keyword (``cache``, or ``past_key_values`` before
   transformers 5.24; see :mod:`.keywords`), or makes a fresh one, derives the new tokens'
   absolute positions from ``position_ids`` / the 2D padding mask (``-1`` for
   padding) and opens a chunk in the slot store. When the caller gave no
   ``position_ids`` it passes these positions on, so RoPE and visibility agree.
2. Each attention layer calls ``Cache.update`` (in-place slot write), then the
   ``"epikv"`` attention function registered in transformers'
   ``AttentionInterface``: attention over the slots by ``ops.slot_attention``,
   visibility from the slots' own positions (HF's mask is not used, so the name
   is deliberately *not* registered in ``AttentionMaskInterface``: HF then
   skips building a mask nobody reads). Key/value delta norms feed ``kv``.
3. Forward hooks on the band layers hand the residual stream to the scorer.
4. A forward hook on the decoder stack closes the chunk: scores are fixed and
   the cache evicts when it is over its cadence.

``model.generate`` is wrapped per instance to inject a fresh cache per call
and to reject beam search and assisted decoding up front.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.generation import GenerationMode

from ..config import EpiKVConfig
from ..scoring import make_scorer
from . import llama, qwen2, qwen3
from .adapter import ModelAdapter
from .cache import EpiKVCache
from .keywords import cache_keyword, pop_cache

ATTENTION_NAME = "epikv"
ADAPTERS: dict[str, ModelAdapter] = {a.model_type: a for a in (llama.ADAPTER, qwen2.ADAPTER, qwen3.ADAPTER)}
SUPPORTED_GENERATION_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


@dataclass
class _Patch:
    """What ``patch`` changed on one model, so ``unpatch`` can undo exactly that."""

    config: EpiKVConfig
    num_layers: int
    windows: list[int | None]
    cache_keyword: str  # what the installed transformers calls the cache argument
    original_attn_implementation: str
    # The instance's own ``generate`` / ``prepare_inputs_for_generation`` attributes before patching, if any.
    own_generate: Any
    own_prepare_inputs: Any
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    attention_modules: list[nn.Module] = field(default_factory=list)
    active: EpiKVCache | None = None  # the cache of the forward pass in progress

    def new_cache(
        self,
        prompt_lengths: Sequence[int] | None = None,
        expected_length: int | None = None,
        chunk_size: int | None = None,
        compiled_generation: bool = False,
    ) -> EpiKVCache:
        return EpiKVCache(
            self.config, self.num_layers, prompt_lengths, expected_length, chunk_size, compiled_generation
        )


_PATCHES: "weakref.WeakKeyDictionary[nn.Module, _Patch]" = weakref.WeakKeyDictionary()
_PATCH_OF_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, _Patch]" = weakref.WeakKeyDictionary()


def patch(model: nn.Module, **settings: Any) -> nn.Module:
    """Make ``model`` keep at most ``budget`` tokens of KV cache per sequence; returns ``model``.

    ``settings`` are :class:`~epikv_triton.EpiKVConfig` keywords. Patching again
    with the same settings does nothing; with different ones it raises (call
    :func:`unpatch` first). Only this model instance changes.
    """
    config = EpiKVConfig(**settings)
    existing = _PATCHES.get(model)
    if existing is not None:
        if existing.config == config:
            return model
        raise ValueError(
            f"this model is already patched with {existing.config}; call epikv_triton.unpatch(model) "
            "before patching it with different settings"
        )
    adapter = _adapter_for(model)
    num_layers = model.config.num_hidden_layers
    # Built before touching the model, so bands that do not fit its depth fail here, leaving it as it was.
    hidden_layers = make_scorer(config, num_layers).hidden_layers
    decoder = model.get_decoder()
    state = _Patch(
        config=config,
        num_layers=num_layers,
        windows=adapter.sliding_windows(model.config),
        cache_keyword=cache_keyword(decoder),
        original_attn_implementation=model.config._attn_implementation,
        own_generate=vars(model).get("generate"),
        own_prepare_inputs=vars(model).get("prepare_inputs_for_generation"),
    )
    AttentionInterface.register(ATTENTION_NAME, epikv_attention)
    model.set_attn_implementation(ATTENTION_NAME)

    layers = adapter.decoder_layers(model)
    state.hooks.append(decoder.register_forward_pre_hook(functools.partial(_begin_forward, state), with_kwargs=True))
    state.hooks.append(decoder.register_forward_hook(functools.partial(_end_forward, state), always_call=True))
    for index in hidden_layers:
        state.hooks.append(layers[index].register_forward_hook(functools.partial(_observe_hidden, state, index)))
    for layer in layers:
        _PATCH_OF_ATTENTION[layer.self_attn] = state
        state.attention_modules.append(layer.self_attn)
    if hasattr(model, "generate"):
        model.generate = functools.partial(_generate, state, model, type(model).generate.__get__(model))
        model.prepare_inputs_for_generation = functools.partial(
            _prepare_inputs, state, type(model).prepare_inputs_for_generation.__get__(model)
        )
    _PATCHES[model] = state
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original attention, no hooks, the original ``generate``. Returns ``model``."""
    state = _PATCHES.pop(model, None)
    if state is None:
        raise ValueError("this model is not patched by epikv_triton")
    for handle in state.hooks:
        handle.remove()
    for module in state.attention_modules:
        _PATCH_OF_ATTENTION.pop(module, None)
    model.set_attn_implementation(state.original_attn_implementation)
    for name, own in (("generate", state.own_generate), ("prepare_inputs_for_generation", state.own_prepare_inputs)):
        if name in vars(model):
            delattr(model, name)
        if own is not None:
            setattr(model, name, own)
    return model


def new_cache(
    model: nn.Module,
    prompt_length: int | Sequence[int] | None = None,
    expected_length: int | None = None,
    chunk_size: int | None = None,
) -> EpiKVCache:
    """A fresh bounded cache for a hand-written forward loop over ``model`` (patched).

    Feed it chunks of any length with ``model(input_ids=chunk, cache=cache, use_cache=True)``
    (``past_key_values=cache`` before transformers 5.24; :func:`.keywords.cache_keyword`
    tells which); it evicts between chunks exactly as ``generate`` does.
    ``prompt_length`` (real tokens: one int for every sequence, or one per sequence) tells
    ``keep_prompt=True`` how much to protect when the prompt is read in several
    chunks; by default the first chunk is the prompt. ``expected_length`` (tokens
    per sequence the loop will feed) lets ``method="full"`` allocate once
    instead of growing. ``chunk_size`` (the longest chunk the loop will feed)
    makes the cache allocate ``budget + max(chunk_size, evict_every)`` slots
    once, so a chunked read never grows it and never holds two buffers.
    """
    state = _PATCHES.get(model)
    if state is None:
        raise ValueError("new_cache needs a model patched by epikv_triton.patch(model, ...)")
    if isinstance(prompt_length, int):
        prompt_length = [prompt_length]
    return state.new_cache(prompt_length, expected_length, chunk_size)


# ---------------------------------------------------------------- forward path
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
    """The ``"epikv"`` attention function: ``ops.slot_attention`` over the cache's slots.

    ``key``/``value`` are what ``EpiKVCache.update`` returned; positions, the
    sliding window and the previous chunk's last key come from the cache and
    the adapter, not from ``attention_mask``. Returns ``[B, T, Hq, D]``.
    """
    state = _PATCH_OF_ATTENTION.get(module)
    if state is None or state.active is None:
        raise RuntimeError(
            "the 'epikv' attention function only runs inside a model patched by epikv_triton.patch; "
            "call epikv_triton.unpatch(model) to use another attention implementation"
        )
    if dropout > 0:
        raise ValueError("EpiKV attention is inference-only: attention dropout must be 0 (call model.eval())")
    layer = module.layer_idx
    out = state.active.slots.attend(layer, query, key, value, scale=scaling, window=state.windows[layer])
    return out.transpose(1, 2), None


def _begin_forward(state: _Patch, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    cache = pop_cache(kwargs)
    if cache is None:
        cache = state.new_cache()
    elif not isinstance(cache, EpiKVCache):
        raise TypeError(
            f"a model patched by epikv_triton needs an EpiKVCache as {state.cache_keyword}, got "
            f"{type(cache).__name__}: pass epikv_triton.new_cache(model), or nothing"
        )
    elif cache.config != state.config:
        raise ValueError("this EpiKVCache was made for other settings: build it with epikv_triton.new_cache(model)")
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
    positions = cache.slots.next_positions(batch, num_tokens, mask, position_ids, device=inputs.device)
    cache.slots.begin_chunk(positions)
    if position_ids is None:
        kwargs["position_ids"] = positions.clamp(min=0)
    state.active = cache
    return args, kwargs


def _end_forward(state: _Patch, module: nn.Module, args: tuple, output: Any) -> None:
    cache, state.active = state.active, None
    if cache is not None and cache.slots.chunk is not None and output is not None:
        cache.slots.end_chunk()


def _observe_hidden(state: _Patch, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
    hidden = output[0] if isinstance(output, tuple) else output
    state.active.slots.observe_hidden(layer, hidden)


# --------------------------------------------------------------------- generate
def _generate(state: _Patch, model: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with a fresh EpiKVCache per call; unsupported modes raise before any work."""
    cache = pop_cache(kwargs)
    generation_config = _checked_generation_config(model, kwargs)
    if cache is None:
        prompt_lengths = _prompt_lengths(args, kwargs)
        if prompt_lengths is not None:
            # generate repeats each prompt num_return_sequences times before the prefill.
            copies = generation_config.num_return_sequences or 1
            prompt_lengths = [n for n in prompt_lengths for _ in range(copies)]
        cache = state.new_cache(
            prompt_lengths,
            _expected_length(args, kwargs, generation_config),
            getattr(generation_config, "prefill_chunk_size", None),
            # transformers compiles the decode step only over a cache that says it may.
            compiled_generation=generation_config.compile_config is not None and not generation_config.disable_compile,
        )
    kwargs[state.cache_keyword] = cache
    return original(*args, **kwargs)


def _prepare_inputs(state: _Patch, original: Any, *args: Any, **kwargs: Any) -> dict:
    """``prepare_inputs_for_generation``, then the step's padding mask as ``[B, T]``: the decoder pre-hook
    reads only the new tokens' columns, and a fixed width keeps a compiled decode step's shapes static
    (transformers would otherwise pass the growing 2D mask, or, for a compileable cache, masks built
    for its own attention functions, which drop the padding this cache needs)."""
    inputs = original(*args, **kwargs)
    if isinstance(inputs.get(state.cache_keyword), EpiKVCache):
        mask = kwargs.get("attention_mask")
        new_tokens = inputs.get("input_ids")
        if new_tokens is None:
            new_tokens = inputs["inputs_embeds"]
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            inputs["attention_mask"] = mask[:, -new_tokens.shape[1] :].contiguous()  # a fixed stride, too
        else:
            inputs.pop("attention_mask", None)
    return inputs


def _checked_generation_config(model: nn.Module, kwargs: dict) -> Any:
    """The generation config this call will use; raises for modes a bounded cache cannot serve."""
    settings = {k: v for k, v in kwargs.items() if k not in ("generation_config", "assistant_model")}
    # transformers' own merge of model defaults, generation_config and kwargs (a copy; nothing is modified).
    generation_config, _ = model._prepare_generation_config(kwargs.get("generation_config"), **settings)
    mode = generation_config.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in SUPPORTED_GENERATION_MODES:
        raise NotImplementedError(
            f"generate with {mode.value.replace('_', ' ')} is not supported by a model patched by epikv_triton: "
            "the bounded cache evicts tokens for good, so it cannot fork beams or roll back drafted tokens. "
            "Use greedy decoding or sampling (num_beams=1, no assistant), or unpatch the model."
        )
    if generation_config.cache_implementation is not None:
        raise NotImplementedError(
            f"cache_implementation={generation_config.cache_implementation!r} cannot be used with a model patched by "
            "epikv_triton: it brings its own bounded cache, which is not compileable. Drop cache_implementation."
        )
    return generation_config


def _expected_length(args: tuple, kwargs: dict, generation_config: Any) -> int | None:
    """Prompt width plus the tokens ``generate`` may add: the most a full cache can need."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(inputs, torch.Tensor) or generation_config.max_new_tokens is None:
        return None
    return inputs.shape[1] + generation_config.max_new_tokens


def _prompt_lengths(args: tuple, kwargs: dict) -> list[int] | None:
    """Real prompt tokens per sequence, so ``keep_prompt`` protects the prompt even when it is read in chunks."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if not isinstance(inputs, torch.Tensor):
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        return mask.sum(dim=1).tolist()
    return [inputs.shape[1]] * inputs.shape[0]


def check_supported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming the supported model types unless ``model`` is one of them."""
    _adapter_for(model)


def _adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"epikv_triton.patch supports model types {', '.join(sorted(ADAPTERS))}; got {model_type!r}"
        )
    return ADAPTERS[model_type]
