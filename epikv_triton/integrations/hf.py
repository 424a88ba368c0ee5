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
and to reject beam search and assisted decoding up front. A forward with
``use_cache=False`` and no cache is plain attention over the chunk (a
throwaway ``full`` cache: no scoring, no eviction).

The patch state lives on the modules (so ``copy.deepcopy`` of a patched model
works), and the cache of the forward in progress is per thread (so threads may
share a patched model, each over its own cache).
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
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


@dataclass(eq=False)  # hashed by identity: the key of the forward in progress, see _ACTIVE
class _Patch:
    """What ``patch`` changed on one model, so ``unpatch`` can undo exactly that.

    It lives on the modules themselves (``_STATE`` attribute of the model and of each attention module),
    and the hooks and ``generate`` wrapper reach it through ``functools.partial``: ``copy.deepcopy`` of a
    patched model then copies one consistent patch along with the modules.
    """

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


_STATE = "_epikv_patch"
# Per thread, the cache of each patched model's forward in progress: two threads may run one patched model
# at once, each over its own cache. (A plain attribute, so a compiled decode step traces it.)
_ACTIVE = threading.local()


def _state_of(module: nn.Module) -> _Patch | None:
    return vars(module).get(_STATE)


def _active_caches() -> dict[_Patch, EpiKVCache]:
    caches = getattr(_ACTIVE, "caches", None)
    if caches is None:
        caches = _ACTIVE.caches = {}
    return caches


def patch(model: nn.Module, **settings: Any) -> nn.Module:
    """Make ``model`` keep at most ``budget`` tokens of KV cache per sequence; returns ``model``.

    ``settings`` are :class:`~epikv_triton.EpiKVConfig` keywords. Patching again
    with the same settings does nothing; with different ones it raises (call
    :func:`unpatch` first). Only this model instance changes.
    """
    config = EpiKVConfig(**settings)
    existing = _state_of(model)
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
        setattr(layer.self_attn, _STATE, state)
        state.attention_modules.append(layer.self_attn)
    if hasattr(model, "generate"):
        # An instance-level wrapper the model already had stays in the call chain.
        generate = state.own_generate or type(model).generate.__get__(model)
        prepare_inputs = state.own_prepare_inputs or type(model).prepare_inputs_for_generation.__get__(model)
        model.generate = _wrapper(_generate, state, model, generate)
        model.prepare_inputs_for_generation = _wrapper(_prepare_inputs, state, prepare_inputs)
    setattr(model, _STATE, state)
    return model


def _wrapper(function: Any, *arguments: Any) -> functools.partial:
    """``functools.partial(function, *arguments)`` that presents itself as its last argument, the wrapped
    callable: transformers reads the parameters of ``prepare_inputs_for_generation`` (``inputs_embeds``
    is refused unless it is one), tools read those of ``generate``. A partial, unlike a closure,
    is deep-copied along with the model it is bound to."""
    return functools.update_wrapper(functools.partial(function, *arguments), arguments[-1])


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original attention, no hooks, the original ``generate``. Returns ``model``."""
    state = _state_of(model)
    if state is None:
        raise ValueError("this model is not patched by epikv_triton")
    delattr(model, _STATE)
    for handle in state.hooks:
        handle.remove()
    for module in state.attention_modules:
        delattr(module, _STATE)
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

    One cache serves one stream: a forward that raises midway leaves it
    unusable (it refuses the next chunk; build a new one or ``reset()`` it).
    """
    state = _state_of(model)
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
    state = _state_of(module)
    cache = None if state is None else _active_caches().get(state)
    if cache is None:
        raise RuntimeError(
            "the 'epikv' attention function only runs inside a model patched by epikv_triton.patch; "
            "call epikv_triton.unpatch(model) to use another attention implementation"
        )
    if dropout > 0:
        raise ValueError("EpiKV attention is inference-only: attention dropout must be 0 (call model.eval())")
    layer = module.layer_idx
    out = cache.slots.attend(layer, query, key, value, scale=scaling, window=state.windows[layer])
    return out.transpose(1, 2), None


def _begin_forward(state: _Patch, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        raise ValueError(
            "a model patched by epikv_triton does not compute attention weights (output_attentions=True): "
            "epikv_triton.unpatch(model) to inspect them"
        )
    cache = pop_cache(kwargs)
    use_cache = kwargs.get("use_cache")
    if cache is None:
        if (module.config.use_cache if use_cache is None else use_cache) is False:
            # Nothing will read a cache after this forward (a loss or perplexity pass): plain attention over
            # the chunk, with no scoring and no prompt to protect.
            cache = EpiKVCache(EpiKVConfig(budget=state.config.budget, method="full"), state.num_layers)
        else:
            cache = state.new_cache()
    elif not isinstance(cache, EpiKVCache):
        raise TypeError(
            f"a model patched by epikv_triton needs an EpiKVCache as {state.cache_keyword}, got "
            f"{type(cache).__name__}: pass epikv_triton.new_cache(model), or nothing"
        )
    elif cache.config != state.config or cache.slots.num_layers != state.num_layers:
        raise ValueError(
            "this EpiKVCache was made for another model or other settings: build it with epikv_triton.new_cache(model)"
        )
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
    _active_caches()[state] = cache
    return args, kwargs


def _end_forward(state: _Patch, module: nn.Module, args: tuple, output: Any) -> None:
    cache = _active_caches().pop(state, None)
    # When the forward raised (output None), its chunk stays open: the cache then refuses the next one.
    # (A KeyboardInterrupt skips this hook altogether, with the same effect; the next forward replaces the entry.)
    if cache is not None and cache.slots.chunk is not None and output is not None:
        cache.slots.end_chunk()


def _observe_hidden(state: _Patch, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
    hidden = output[0] if isinstance(output, tuple) else output
    _active_caches()[state].slots.observe_hidden(layer, hidden)


# --------------------------------------------------------------------- generate
def _generate(state: _Patch, model: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with a fresh EpiKVCache per call; unsupported modes raise before any work."""
    named, extra = _generate_arguments(model, args, kwargs)
    cache = pop_cache(extra)
    generation_config = _checked_generation_config(model, named, extra)
    if cache is None:
        candidates = (named.get("inputs"), extra.get("input_ids"), extra.get("inputs_embeds"))
        inputs = next((x for x in candidates if x is not None), None)
        prompt_lengths = _prompt_lengths(model, generation_config, inputs, extra.get("attention_mask"))
        if prompt_lengths is not None:
            # generate repeats each prompt num_return_sequences times before the prefill.
            copies = generation_config.num_return_sequences or 1
            prompt_lengths = [n for n in prompt_lengths for _ in range(copies)]
        cache = state.new_cache(
            prompt_lengths,
            None if inputs is None or generation_config.max_new_tokens is None
            else inputs.shape[1] + generation_config.max_new_tokens,  # the most a full cache can need
            getattr(generation_config, "prefill_chunk_size", None),
            # transformers compiles the decode step only over a cache that says it may.
            compiled_generation=generation_config.compile_config is not None and not generation_config.disable_compile,
        )
        _check_compiled_prefill(model, state, cache, generation_config)
    extra[state.cache_keyword] = cache
    return original(**named, **extra)


def _generate_arguments(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """``generate``'s arguments by name (``generation_config`` may come positionally), split into its
    named parameters and the rest (model inputs and generation settings)."""
    signature = inspect.signature(type(model).generate.__get__(model))
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"generate{signature}: {error}") from None
    named, extra = {}, {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(value)
        else:
            named[name] = value
    return named, extra


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


def _checked_generation_config(model: nn.Module, named: dict, extra: dict) -> Any:
    """The generation config this call will use; raises for modes a bounded cache cannot serve.

    Forces ``use_cache`` on (in ``extra``) when only the model's defaults turned it off: without a cache,
    generate re-reads the whole sequence at every step, which a bounded cache cannot follow.
    """
    given = named.get("generation_config")
    # transformers' own merge of model defaults, generation_config and kwargs (a copy; nothing is modified).
    generation_config, _ = model._prepare_generation_config(given, **extra)
    mode = generation_config.get_generation_mode(named.get("assistant_model"))
    if mode not in SUPPORTED_GENERATION_MODES:
        raise NotImplementedError(
            f"generate with {mode.value.replace('_', ' ')} is not supported by a model patched by epikv_triton: "
            "the bounded cache evicts tokens for good, so it cannot fork beams or roll back drafted tokens. "
            "Use greedy decoding or sampling (num_beams=1, no assistant), or unpatch the model."
        )
    if generation_config.cache_implementation is not None:
        raise NotImplementedError(
            f"cache_implementation={generation_config.cache_implementation!r} cannot be used with a model patched by "
            "epikv_triton: it brings its own bounded cache. Drop cache_implementation (compiled decoding is "
            "asked for with compile_config)."
        )
    if generation_config.use_cache is False:
        if extra.get("use_cache") is False or (given is not None and given.use_cache is False):
            raise ValueError(
                "generate(use_cache=False) re-reads the whole sequence at every step, which a bounded cache cannot "
                "follow: pass use_cache=True (the default), or unpatch the model"
            )
        warnings.warn(
            "this model's generation_config says use_cache=False (saved from a training run?); a model patched by "
            "epikv_triton generates with its bounded cache, so generate runs with use_cache=True",
            stacklevel=3,
        )
        extra["use_cache"] = generation_config.use_cache = True
    return generation_config


def _check_compiled_prefill(model: nn.Module, state: _Patch, cache: EpiKVCache, generation_config: Any) -> None:
    """transformers runs every prefill chunk through the compiled call when it compiles, but the first
    chunk of an EpiKV cache sizes its buffers and must run eagerly: refuse before any work."""
    if generation_config.prefill_chunk_size is None:
        return
    if model._valid_auto_compile_criteria({state.cache_keyword: cache}, generation_config):
        raise ValueError(
            "generate(prefill_chunk_size=...) with a compile_config would compile the prompt's first chunk, which "
            "an EpiKV cache must read eagerly: drop prefill_chunk_size (the prompt is then read in one eager "
            "pass), or pass disable_compile=True"
        )


def _prompt_lengths(model: nn.Module, generation_config: Any, inputs: Any, mask: Any) -> list[int] | None:
    """Real prompt tokens per sequence, so ``keep_prompt`` protects the prompt even when it is read in chunks."""
    if not isinstance(inputs, torch.Tensor):
        return None
    if not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
        # generate infers the padding mask from pad_token_id; count the real tokens the same way, with its own
        # code (on our copy of the config, which it annotates; None: no warnings, generate gives its own).
        model._prepare_special_tokens(generation_config, None, inputs.device)
        mask = model._prepare_attention_mask_for_generation(inputs, generation_config, {})
    return mask.sum(dim=1).tolist()


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
