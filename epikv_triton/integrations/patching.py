"""``patch`` / ``unpatch`` / ``new_cache``: the lifecycle of a patched Hugging Face model.

``patch`` registers the ``"epikv"`` attention function and switches the model
to it, installs the forward hooks of :mod:`.forward`, the ``generate``
wrappers of :mod:`.generation` and the continuous-batching entry point of
:mod:`.continuous_batching`, and leaves a :class:`~.state.PatchState` on the
modules; ``unpatch`` undoes exactly that. Only the patched instance changes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import AttentionInterface

from ..config import EpiKVConfig
from ..scoring import make_scorer
from . import continuous_batching, forward, generation, internals
from .families import family_of
from .keywords import cache_keyword
from .placement import check_one_device, tensor_parallel_group
from .state import STATE_ATTRIBUTE, PatchState, state_of
from .transformers_cache import EpiKVCache


def patch(model: nn.Module, config: EpiKVConfig | None = None, **settings: Any) -> nn.Module:
    """Make ``model`` keep at most ``budget`` tokens of KV cache per sequence; returns ``model``.

    The settings are either ``config``, an :class:`~epikv_triton.EpiKVConfig` (for
    example one :func:`epikv_triton.calibrate` chose, or ``EpiKVConfig.load(path)``),
    or its keywords as ``settings``, not both. Patching again with the same
    settings does nothing; with different ones it raises (call :func:`unpatch`
    first). Only this model instance changes.

    A model tensor-parallel over ``torch.distributed`` ranks (loaded with
    ``distributed_config=DistributedConfig(tp_plan="auto")`` under ``torchrun``)
    is patched on every rank: each rank's cache holds its own KV heads, and the
    ranks keep the same tokens. A model whose layers ``device_map`` placed on
    several devices is refused.
    """
    if config is None:
        config = EpiKVConfig(**settings)
    elif not isinstance(config, EpiKVConfig):
        raise TypeError(f"config must be an epikv_triton.EpiKVConfig, got {type(config).__name__}")
    elif settings:
        raise ValueError(
            f"pass either config= or keyword settings, not both (got config and {', '.join(sorted(settings))}); "
            "to change a setting, build the EpiKVConfig with it"
        )
    existing = state_of(model)
    if existing is not None:
        if existing.config == config:
            return model
        raise ValueError(
            f"this model is already patched with {existing.config}; call epikv_triton.unpatch(model) "
            "before patching it with different settings"
        )
    family = family_of(model)
    num_layers = model.config.num_hidden_layers
    # Built before touching the model, so bands that do not fit its depth fail here, leaving it as it was.
    hidden_layers = make_scorer(config, num_layers).hidden_layers
    check_one_device(model)
    layers = family.decoder_layers(model)
    decoder = model.get_decoder()
    state = PatchState(
        config=config,
        num_layers=num_layers,
        windows=family.sliding_windows(model.config),
        cache_keyword=cache_keyword(decoder),
        original_attn_implementation=internals.attention_implementation(model),
        own_generate=vars(model).get("generate"),
        own_prepare_inputs=vars(model).get("prepare_inputs_for_generation"),
        own_init_continuous_batching=vars(model).get("init_continuous_batching"),
        own_generate_batch=vars(model).get("generate_batch"),
        tensor_parallel_group=tensor_parallel_group(model, layers),
    )
    AttentionInterface.register(forward.ATTENTION_NAME, forward.epikv_attention)
    model.set_attn_implementation(forward.ATTENTION_NAME)

    hooks = state.hooks
    hooks.append(decoder.register_forward_pre_hook(functools.partial(forward.begin_forward, state), with_kwargs=True))
    hooks.append(decoder.register_forward_hook(functools.partial(forward.end_forward, state), always_call=True))
    for index in hidden_layers:
        hooks.append(layers[index].register_forward_hook(functools.partial(forward.observe_hidden, state, index)))
    for layer in layers:
        setattr(layer.self_attn, STATE_ATTRIBUTE, state)
        state.attention_modules.append(layer.self_attn)
    if hasattr(model, "generate"):
        # An instance-level wrapper the model already had stays in the call chain.
        generate = state.own_generate or type(model).generate.__get__(model)
        prepare_inputs = state.own_prepare_inputs or type(model).prepare_inputs_for_generation.__get__(model)
        model.generate = generation.wrapper(generation.generate, state, model, generate)
        model.prepare_inputs_for_generation = generation.wrapper(generation.prepare_inputs, state, prepare_inputs)
    if hasattr(model, "init_continuous_batching"):
        for name in ("init_continuous_batching", "generate_batch"):
            own = getattr(model, name)  # the instance's own, or the class's bound to it
            setattr(model, name, generation.wrapper(getattr(continuous_batching, name), state, model, own))
    setattr(model, STATE_ATTRIBUTE, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original attention, no hooks, the original ``generate``. Returns ``model``."""
    state = state_of(model)
    if state is None:
        raise ValueError("this model is not patched by epikv_triton")
    delattr(model, STATE_ATTRIBUTE)
    for handle in state.hooks:
        handle.remove()
    for module in state.attention_modules:
        delattr(module, STATE_ATTRIBUTE)
    model.set_attn_implementation(state.original_attn_implementation)
    own_attributes = (
        ("generate", state.own_generate),
        ("prepare_inputs_for_generation", state.own_prepare_inputs),
        ("init_continuous_batching", state.own_init_continuous_batching),
        ("generate_batch", state.own_generate_batch),
    )
    for name, own in own_attributes:
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
    state = state_of(model)
    if state is None:
        raise ValueError("new_cache needs a model patched by epikv_triton.patch(model, ...)")
    if isinstance(prompt_length, int):
        prompt_length = [prompt_length]
    return state.new_cache(prompt_length, expected_length, chunk_size)


def check_supported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming the supported model types unless ``model`` is one of them."""
    family_of(model)
