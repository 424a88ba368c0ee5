"""``generate`` on a patched model: a fresh bounded cache per call, unsupported modes refused up front.

``model.generate`` is wrapped per instance to size a cache for the request
(prompt lengths from the padding mask, or transformers' own inference of it;
marked compileable when the call carries a ``compile_config``) and to reject
beam search, assisted decoding, ``cache_implementation``, ``use_cache=False``
and a compiled chunked prefill before any work. ``prepare_inputs_for_generation``
is wrapped to pass each step's padding mask as ``[B, T]``, the new tokens'
columns, which is all the decoder pre-hook reads. The wrappers keep the
originals' signatures. Private transformers calls go through :mod:`.internals`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from torch import nn
from transformers.generation import GenerationMode

from . import internals
from .keywords import pop_cache
from .state import PatchState
from .transformers_cache import EpiKVCache

SUPPORTED_GENERATION_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def wrapper(function: Any, *arguments: Any) -> functools.partial:
    """``functools.partial(function, *arguments)`` that presents itself as its last argument, the wrapped
    callable: transformers reads the parameters of ``prepare_inputs_for_generation`` (``inputs_embeds``
    is refused unless it is one), tools read those of ``generate``. A partial, unlike a closure,
    is deep-copied along with the model it is bound to."""
    return functools.update_wrapper(functools.partial(function, *arguments), arguments[-1])


def generate(state: PatchState, model: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
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
        _check_compiled_tensor_parallel(state, cache)
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


def prepare_inputs(state: PatchState, original: Any, *args: Any, **kwargs: Any) -> dict:
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
    generation_config = internals.merged_generation_config(model, given, extra)
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


def _check_compiled_prefill(model: nn.Module, state: PatchState, cache: EpiKVCache, generation_config: Any) -> None:
    """transformers runs every prefill chunk through the compiled call when it compiles, but the first
    chunk of an EpiKV cache sizes its buffers and must run eagerly: refuse before any work."""
    if generation_config.prefill_chunk_size is None:
        return
    if internals.will_compile_forward(model, {state.cache_keyword: cache}, generation_config):
        raise ValueError(
            "generate(prefill_chunk_size=...) with a compile_config would compile the prompt's first chunk, which "
            "an EpiKV cache must read eagerly: drop prefill_chunk_size (the prompt is then read in one eager "
            "pass), or pass disable_compile=True"
        )


def _check_compiled_tensor_parallel(state: PatchState, cache: EpiKVCache) -> None:
    """Every eviction of a tensor-parallel model gathers the ranks' scores, a collective the compiled decode
    step does not capture yet: refuse before any work rather than at the first compiled step."""
    if state.tensor_parallel_group is not None and cache.is_compileable:
        raise NotImplementedError(
            "generate with a compile_config on a tensor-parallel model patched by epikv_triton is not supported "
            "yet: each eviction gathers the ranks' scores with a collective the compiled decode step does not "
            "capture. Generate without compile_config (eager decoding), or pass disable_compile=True"
        )


def _prompt_lengths(model: nn.Module, generation_config: Any, inputs: Any, mask: Any) -> list[int] | None:
    """Real prompt tokens per sequence, so ``keep_prompt`` protects the prompt even when it is read in chunks."""
    if not isinstance(inputs, torch.Tensor):
        return None
    if not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
        mask = internals.inferred_padding_mask(model, generation_config, inputs)
    return mask.sum(dim=1).tolist()
