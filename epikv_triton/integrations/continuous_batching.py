"""transformers' continuous batching (``generate_batch``, ``init_continuous_batching``) on a patched model.

The engine serves requests from its own paged cache through its own attention
functions ("paged|eager", "sdpa", flash): none of them evicts, so a patched
model run through it would hold every token of every request, the opposite of
what ``patch`` promised. Until the engine's cache can evict, the entry point
every engine call goes through (``init_continuous_batching``; ``generate_batch``
and ``continuous_batching_context_manager`` call it) is wrapped per instance
to refuse, saying what to do instead.
"""

from __future__ import annotations

from typing import Any

from .state import PatchState

#: The method every continuous-batching entry point of transformers goes through.
ENTRY_POINT = "init_continuous_batching"


def refuse(state: PatchState, *args: Any, **kwargs: Any) -> Any:
    """The patched model's ``init_continuous_batching``: raises before the engine allocates anything."""
    raise NotImplementedError(
        "continuous batching (generate_batch / init_continuous_batching) is not supported on a model patched by "
        f"epikv_triton (budget={state.config.budget}, method={state.config.method!r}): the engine's paged cache "
        "keeps every token of every request, so the budget would not hold. Generate with model.generate on a "
        "(left-padded) batch of prompts to keep the cache bounded, or call epikv_triton.unpatch(model) to use "
        "generate_batch with the full cache."
    )
