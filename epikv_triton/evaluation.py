"""How close a bounded cache stays to the full one: agreement and teacher-forced NLL.

The model objects come from the caller; nothing here imports transformers
(the cache keyword is read off the model's forward signature).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .integrations.keywords import cache_keyword, output_cache


@dataclass
class Agreement:
    """Position-wise agreement of a candidate token sequence with the reference."""

    fraction: float
    first_divergence: int | None  # index of the first differing token; None if identical


def agreement(reference: list[int], candidate: list[int]) -> Agreement:
    """Fraction of reference positions where ``candidate`` has the same token.

    A candidate shorter than the reference counts the missing positions as different.
    """
    if not reference:
        raise ValueError("the reference sequence is empty: nothing to compare")
    same = [i < len(candidate) and candidate[i] == token for i, token in enumerate(reference)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return Agreement(sum(same) / len(reference), first)


@dataclass
class TeacherForced:
    """Teacher-forced pass over a fixed continuation."""

    nll: float  # mean negative log-likelihood (nats/token) of the continuation
    predictions: list[int]  # greedy prediction at each continuation position
    peak_kv_bytes: int


def teacher_forced(model, context: torch.Tensor, continuation: torch.Tensor, new_cache, chunk: int) -> TeacherForced:
    """Mean NLL of ``continuation`` after ``context`` (both ``[1, n]`` token ids).

    Tokens are fed in chunks of ``chunk`` through the cache ``new_cache()``
    returns, so a bounded cache evicts between chunks exactly as it would in a
    hand-written serving loop: chunk 1 scores each token the way decoding would.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cache = new_cache()
    keyword = cache_keyword(model)
    tokens = torch.cat([context, continuation], dim=1)
    first_target = context.shape[1]
    total_nll, predictions, peak = 0.0, [], 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[1] - 1, chunk):
            piece = tokens[:, start : min(start + chunk, tokens.shape[1] - 1)]
            logits = model(input_ids=piece, **{keyword: cache}, use_cache=True).logits.float()
            peak = max(peak, kv_bytes(cache))
            # Logit i of this piece predicts token start + i + 1; keep those that are continuation tokens.
            targets = torch.arange(start + 1, start + 1 + piece.shape[1], device=tokens.device)
            scored = targets >= first_target
            if not bool(scored.any()):
                continue
            log_probs = torch.log_softmax(logits[0, scored], dim=-1)
            wanted = tokens[0, targets[scored]]
            total_nll -= float(log_probs.gather(1, wanted[:, None]).sum())
            predictions += log_probs.argmax(dim=-1).tolist()
    return TeacherForced(total_nll / continuation.shape[1], predictions, peak)


@dataclass
class Generation:
    tokens: list[int]
    seconds: float
    peak_kv_bytes: int
    tokens_kept: int  # by the end: what the cache holds for the sequence

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def greedy_generation(model, inputs: dict, new_tokens: int, streamer=None, fixed_length: bool = True) -> Generation:
    """Greedy ``generate`` of ``new_tokens`` tokens (EOS suppressed when ``fixed_length``)."""
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if fixed_length else 0,
            do_sample=False,
            return_dict_in_generate=True,
            streamer=streamer,
        )
    seconds = time.perf_counter() - start
    generated = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    cache = output_cache(output, model)
    if hasattr(cache, "stats"):
        kept = cache.stats().sequences[0].tokens_kept
    else:
        kept = inputs["input_ids"].shape[1] + len(generated) - 1  # a full cache holds all but the last token's K/V
    return Generation(generated, seconds, kv_bytes(cache), kept)


def kv_bytes(cache) -> int:
    """Bytes of K/V memory a cache holds: its preallocated slots, or a dynamic cache's tensors."""
    if cache is None:
        return 0
    if hasattr(cache, "stats"):
        return int(cache.stats().allocated_bytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
