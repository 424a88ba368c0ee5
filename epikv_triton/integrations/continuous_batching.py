"""transformers' continuous batching (``generate_batch``, ``init_continuous_batching``) with eviction.

The engine packs many requests' tokens into one row per forward and keeps
their keys and values in pages of one pool. A patched model runs it as is
(its paged attention, its scheduler, chunked prefill included) with three
additions, all through :mod:`.engine`:

1. Each request has a :class:`~.request_streams.RequestStream` (positions,
   scores, scorer state, policy: the decisions ``generate`` makes for that
   prompt alone). The decoder hooks of :mod:`.forward` hand it its slice of the
   packed batch (this module's :class:`EngineSession` stands in for the cache),
   and so does the allocator's write for methods that read the new keys. For
   methods whose scorers read the cache (:func:`.request_streams.reads_cache`:
   ``tova``, the default, and ``snapkv``, ``rkv``, ``keydiff``, ``h2o``), the
   engine's attention function is wrapped: after each layer's call, each
   request's queries (its slice of the packed ones) meet every key it holds,
   read back from its pages in slot order, and its scorer scores its slots as
   the store's attention would have it (one more attention pass per layer over
   the request's own slots, with the probabilities the engine's does not return).
2. When a request's stream says evict, its kept tokens' keys and values are
   copied into its lowest slots in every layer and its cached-token count drops
   to the budget, so it never holds more than ``ceil((budget + evict_every) /
   page_size)`` pages. It reserves that many when the scheduler admits it
   (:func:`.engine.reserve_pages`): an admitted request then never starves, so
   the engine never offloads or restarts it (a restarted request re-reads its
   generated tokens as a prompt, which ``generate`` never does), and its pages
   go back to the pool when it finishes.
3. The engine numbers a request's new tokens from its cached-token count; the
   decoder pre-hook adds the tokens the request evicted, so RoPE sees the
   absolute positions.

Prefix sharing and async batching are turned off (a shared page would be
evicted under its other readers; an async engine prepares a batch before the
previous one's eviction), and so are CUDA graphs (a replayed graph skips the
hooks); asking for them, or for a compiled forward, is refused. What
cannot be served exactly is refused before any work: a method not in
:data:`SUPPORTED_METHODS` (every built-in one is; a method registered later has
not been checked against the engine), ``keep_prompt=False`` (the engine chooses
where a prompt is split; generate evicts after the whole prompt),
``value_reserve``, sliding-window layers (the engine keeps their own ring of
pages) and tensor parallelism.

Chunked prefill leaves the scores exact: the prompt fits the budget with its
recent window (``keep_prompt``), so no eviction follows a prompt chunk, and the
first one follows a decode step, after which a rescoring method has scored
every slot from that step's query alone, as ``generate`` does; ``h2o``'s sums
over the prompt's chunks add up to its sum over the whole prompt.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from ..scoring import make_scorer
from ..store.policy import check_prompt_fits
from . import engine, internals
from .request_streams import RequestStream, reads_cache
from .state import PatchState, state_of

#: Methods the engine serves exactly: those whose scores are fixed when a token arrives, from the residual stream,
#: the positions, or the new tokens' keys and values (:data:`KEY_METHODS`), and those that rescore the cache from
#: each request's queries and held keys (:func:`.request_streams.reads_cache`).
SUPPORTED_METHODS = (
    "tova", "snapkv", "rkv", "keydiff", "h2o", "epikv", "epikv_flat", "kv", "knorm", "lag_kv", "streaming", "random",
    "full",
)
#: The supported methods that read the new tokens' keys and values.
KEY_METHODS = ("kv", "knorm", "lag_kv")
#: Finished requests whose kept positions the stats remember (the latest ones): a kept manager serves on and on.
REMEMBERED_REQUESTS = 1024


@dataclass
class EngineStats:
    """What eviction did in one engine run (:func:`batch_stats`)."""

    eviction_passes: int = 0
    tokens_evicted: int = 0
    peak_pages: int = 0  # the most pages one request held at a forward
    peak_pages_in_use: int = 0  # the most pages all requests held together at a forward
    pages_in_use_after: int | None = None  # what the requests still held when the run ended (0: all came back)
    shared_page_forwards: int = 0  # forwards in which two requests' block tables named the same page
    # Per finished request (the latest REMEMBERED_REQUESTS), the positions it held at the end.
    kept_positions: dict[str, list[int]] = field(default_factory=dict)


class EngineSession:
    """Eviction for one engine: stands in for the cache in :mod:`.forward`'s hooks (``chunk_open``,
    ``observe_hidden``, ``close_chunk``) during the engine's forwards. With ``method="full"`` it only watches."""

    def __init__(self, state: PatchState):
        self.config = state.config
        self.num_layers = state.num_layers
        self.streams: dict[str, RequestStream] = {}
        self.batch: list[engine.ScheduledRequest] = []
        self.running: list[tuple[engine.ScheduledRequest, RequestStream | None]] = []
        self.allocator: Any = None
        self.pages_per_request: int | None = None  # what an evicting request reserves and never exceeds
        self.pool_pages: int | None = None
        self.chunk_open = False
        self.rows: dict[str, torch.Tensor] = {}  # per request in the forward in progress: see begin_forward
        self.reads_cache = reads_cache(make_scorer(self.config, self.num_layers))
        self.stats = EngineStats()

    # ------------------------------------------------- the engine's side
    def install(self, processor: Any) -> None:
        """On the engine's batch processor, before its first batch."""
        self.allocator = engine.full_attention_allocator(processor)
        engine.on_batch(processor, self.record_batch)
        engine.on_request_freed(self.allocator, self.forget)
        if self.config.method in KEY_METHODS:
            engine.on_keys(self.allocator, self.observe_keys)
        self.pool_pages = engine.pool_pages(self.allocator)
        if self.config.evicts:
            # The budget, and the tokens the cadence lets in before it evicts (a prompt is shorter: keep_prompt).
            held = self.config.budget + self.config.evict_every
            self.pages_per_request = -(-held // self.allocator.tokens_per_page)
            engine.reserve_pages(self.allocator, self.pages_per_request)

    def record_batch(self, requests: list[engine.ScheduledRequest]) -> None:
        """The requests of the next forward, before the engine counts their cached tokens."""
        if self.config.evicts:
            for request in requests:
                stream = self.streams.get(request.request_id)
                held = 0 if stream is None else stream.pos.shape[1]
                if request.state.position_offset != held:
                    # Reserved pages make this unreachable; were the engine to restart or restore a request anyway,
                    # its stream would no longer describe its pages.
                    raise RuntimeError(
                        f"continuous batching on a model patched by epikv_triton: request {request.request_id} has "
                        f"{request.state.position_offset} cached tokens where its eviction state has {held} (the "
                        "engine offloaded or restarted it); give the engine more pages (ContinuousBatchingConfig("
                        "num_blocks=...))"
                    )
        self.batch = requests

    def forget(self, request_id: str) -> None:
        """The engine freed the request's pages (it finished or was cancelled)."""
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            remembered = self.stats.kept_positions
            remembered[request_id] = stream.kept_positions()
            if len(remembered) > REMEMBERED_REQUESTS:
                del remembered[next(iter(remembered))]

    def release(self) -> None:
        """The run is over and its engine is not kept: let go of the engine's pool and the requests' state."""
        if self.allocator is not None:
            self.stats.pages_in_use_after = engine.pages_in_use(self.allocator)
        self.allocator = None
        self.streams.clear()

    # ------------------------------------------------- the forward's side
    def begin_forward(self, kwargs: dict) -> None:
        """Decoder pre-hook: open each request's chunk and move its positions past the tokens it evicted."""
        self.running = [(request, self._stream(request, kwargs["position_ids"].device)) for request in self.batch]
        self.rows = {}  # per request, the rows of its cached tokens: one block table serves every layer
        for request, stream in self.running:
            if stream is not None:
                stream.begin_chunk(request.query_length)
        self._watch_pages()
        offsets = [0 if stream is None else stream.dropped for _, stream in self.running]
        if any(offsets):
            # The engine counted from the tokens each request holds; RoPE needs the tokens it has read.
            position_ids = kwargs["position_ids"]
            lengths = torch.tensor([request.query_length for request, _ in self.running], device=position_ids.device)
            shift = torch.zeros_like(position_ids)
            shift[:, : int(lengths.sum())] = torch.repeat_interleave(
                torch.tensor(offsets, dtype=shift.dtype, device=shift.device), lengths
            )
            kwargs["position_ids"] = position_ids + shift
        self.chunk_open = True

    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Forward hook of a scored layer: each request's slice of the packed ``[1, N, H]`` output."""
        start = 0
        for request, stream in self.running:
            if stream is not None:
                stream.observe_hidden(layer, hidden[:, start : start + request.query_length])
            start += request.query_length

    def observe_keys(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Each request's slice of the packed ``[N, Hkv, D]`` keys and values layer ``layer`` writes."""
        start = 0
        for request, stream in self.running:
            end = start + request.query_length
            if stream is not None:
                stream.observe_keys(
                    layer, keys[start:end].transpose(0, 1)[None], values[start:end].transpose(0, 1)[None]
                )
            start = end

    def observe_attention(self, layer: int, query: torch.Tensor, scale: float | None) -> None:
        """After layer ``layer``'s attention call, whose packed ``[1, Hq, N, D]`` queries are ``query``: each request
        scores its slots from its own queries and every slot it holds (read back from its pages, the chunk's new
        keys included)."""
        start = 0
        for request, stream in self.running:
            end = start + request.query_length
            if stream is not None:
                rows = self.rows.get(request.request_id)
                if rows is None:
                    rows = engine.cached_rows(self.allocator, request.request_id, stream.pos.shape[1])
                    self.rows[request.request_id] = rows
                keys, values = engine.cached_keys_and_values(self.allocator, layer, rows)
                stream.observe_cache(layer, query[:, :, start:end], keys, values, scale)
            start = end

    def close_chunk(self) -> None:
        """Decoder forward hook: each request's scores fixed, and its eviction, when due, applied to its pages."""
        for request, stream in self.running:
            moves = None if stream is None else stream.end_chunk()
            if moves is None:
                continue
            used = moves.kept + moves.dropped
            engine.move_slots(self.allocator, request.request_id, used, moves.sources, moves.destinations)
            engine.set_cached_length(request.state, moves.kept)
            self.stats.eviction_passes += 1
            self.stats.tokens_evicted += moves.dropped
        self.running, self.batch = [], []
        self.chunk_open = False

    def _stream(self, request: engine.ScheduledRequest, device: torch.device) -> RequestStream | None:
        """The request's stream (made at its first chunk), or ``None`` when nothing is evicted."""
        if not self.config.evicts:
            return None
        stream = self.streams.get(request.request_id)
        if stream is None:
            new_tokens = request.max_new_tokens
            expected = None if new_tokens is None else request.prompt_length + new_tokens
            stream = RequestStream(self.config, self.num_layers, request.prompt_length, expected, device)
            self.streams[request.request_id] = stream
        return stream

    def _watch_pages(self) -> None:
        stats = self.stats
        pages = [engine.page_ids(self.allocator, request.request_id) for request, _ in self.running]
        stats.peak_pages = max([stats.peak_pages, *map(len, pages)])
        stats.peak_pages_in_use = max(stats.peak_pages_in_use, engine.pages_in_use(self.allocator))
        if len({page for held in pages for page in held}) != sum(map(len, pages)):
            stats.shared_page_forwards += 1


def check_supported(state: PatchState) -> None:
    """Raise, saying what to do, for settings the engine cannot serve exactly."""
    config = state.config
    advice = "generate with model.generate on a (left-padded) batch, or call epikv_triton.unpatch(model)"
    if config.method not in SUPPORTED_METHODS:
        raise NotImplementedError(
            f"continuous batching with method={config.method!r} is not supported on a model patched by epikv_triton: "
            "its scorer has not been checked against the engine, which serves a method exactly only when it is "
            f"listed in SUPPORTED_METHODS. Use one of {', '.join(SUPPORTED_METHODS)}, or {advice}"
        )
    if config.evicts and not config.keep_prompt:
        raise NotImplementedError(
            "continuous batching with keep_prompt=False is not supported on a model patched by epikv_triton: the "
            "engine may split a prompt into chunks of its own choosing, where generate evicts after the whole "
            f"prompt. Patch with keep_prompt=True, or {advice}"
        )
    if config.value_reserve:
        raise NotImplementedError(
            f"continuous batching with value_reserve={config.value_reserve} is not supported on a model patched by "
            f"epikv_triton yet. Patch without it, or {advice}"
        )
    if any(window is not None for window in state.windows):
        raise NotImplementedError(
            "continuous batching on a patched model with sliding-window layers is not supported: the engine keeps "
            f"their own ring of pages, which eviction does not reach. {advice[0].upper()}{advice[1:]}"
        )
    if state.tensor_parallel_group is not None:
        raise NotImplementedError(
            f"continuous batching on a tensor-parallel model patched by epikv_triton is not supported: {advice}"
        )


def _check_prompts(state: PatchState, model: torch.nn.Module, arguments: dict) -> None:
    """``keep_prompt`` keeps every prompt token: refuse, as generate does, a prompt that leaves no room, before the
    engine starts (inside it, the refusal would fail the request on the engine's thread)."""
    config = state.config
    if not config.evicts:
        return
    prompts = arguments.get("inputs") or []
    generation_config = arguments.get("generation_config") or model.generation_config
    new_tokens = getattr(generation_config, "max_new_tokens", None)
    lengths = [len(prompt) for prompt in prompts if new_tokens is None or len(prompt) + new_tokens > config.budget]
    if lengths:
        check_prompt_fits(config, lengths)


def batch_stats(model: torch.nn.Module) -> EngineStats:
    """What eviction did in the latest continuous-batching engine of a patched ``model`` (the latest
    ``generate_batch``, or the manager ``init_continuous_batching`` returned, while it serves): eviction passes,
    tokens evicted, pages held, and the positions each of the latest finished requests kept."""
    state = state_of(model)
    if state is None:
        raise ValueError("this model is not patched: call epikv_triton.patch(model, ...) before generate_batch")
    if state.engine_session is None:
        raise RuntimeError("this patched model has run no continuous-batching engine yet: call model.generate_batch")
    return state.engine_session.stats


def init_continuous_batching(
    state: PatchState, model: torch.nn.Module, original: Any, generation_config: Any = None,
    continuous_batching_config: Any = None, *args: Any, **kwargs: Any,
) -> Any:
    """The patched model's ``init_continuous_batching`` (``generate_batch`` calls it): a manager whose engine evicts."""
    check_supported(state)
    config = engine.engine_config(
        continuous_batching_config, generation_config or model.generation_config,
        observe_keys=state.config.method in KEY_METHODS,
    )
    attention = internals.attention_implementation(model)
    engine.switch_attention(model, state.original_attn_implementation)
    try:
        manager = original(generation_config, config, *args, **kwargs)
    except BaseException:
        model.set_attn_implementation(attention)
        raise
    engine.restore_attention_on_stop(manager, attention)
    session = getattr(manager, "_epikv_session", None)
    if session is None:
        session = manager._epikv_session = EngineSession(state)
        engine.on_batch_processor(manager, session.install)
    state.engine_session = session
    return manager


def generate_batch(state: PatchState, model: torch.nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
    """The patched model's ``generate_batch``: settings checked before any work; the model attends with
    ``"epikv"`` again afterwards, whatever the engine did."""
    check_supported(state)
    arguments = inspect.signature(original).bind_partial(*args, **kwargs).arguments
    _check_prompts(state, model, arguments)
    attention = internals.attention_implementation(model)
    try:
        return original(*args, **kwargs)
    finally:
        model.set_attn_implementation(attention)
        if state.engine_session is not None and not arguments.get("persistent_manager", False):
            state.engine_session.release()  # the manager is gone: its pool should not outlive it here
