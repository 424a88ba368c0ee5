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
    tokens = torch.cat([context, continuation], dim=1)
    result = forced_pass(model, tokens, new_cache(), chunk)
    scored = slice(context.shape[1], None)
    nll = -float(result.log_probs[0, scored].sum()) / continuation.shape[1]
    return TeacherForced(nll, result.predictions[0, scored].tolist(), result.peak_kv_bytes)


@dataclass
class ForcedPass:
    """A teacher-forced read of ``tokens [B, n]``: at each position ``t >= 1``, the log-probability of token
    ``t`` given the tokens before it and the greedy prediction there. Column 0, which nothing predicts,
    holds 0 and -1."""

    log_probs: torch.Tensor  # [B, n] float32
    predictions: torch.Tensor  # [B, n] int64
    peak_kv_bytes: int


def forced_pass(
    model,
    tokens: torch.Tensor,
    cache,
    chunk: int,
    attention_mask: torch.Tensor | None = None,
    decode_from: int | None = None,
    scored_from: int = 1,
) -> ForcedPass:
    """Feed ``tokens[:, :-1]`` (``[B, n]`` ids) through ``cache``: chunks of ``chunk`` tokens up to column
    ``decode_from``, then one token at a time, as ``generate`` reads a prompt and decodes after it.

    ``attention_mask`` (``[B, n]``, 0 = padding) allows left-padded batches; positions then count real tokens.
    Columns before ``scored_from`` may be left at 0 and -1: the model skips the output layer for inputs
    that predict none of the scored tokens (a fifth of a small model's work).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch, length = tokens.shape
    keyword = cache_keyword(model)
    padding = {}
    log_probs = torch.zeros(batch, length, device=tokens.device)
    predictions = torch.full((batch, length), -1, dtype=torch.long, device=tokens.device)
    peak = 0
    with torch.inference_mode():
        for start, end in _feeding_order(length - 1, chunk, decode_from):
            if attention_mask is not None:
                positions = (attention_mask[:, :end].long().cumsum(dim=1) - 1).clamp(min=0)
                padding = {"attention_mask": attention_mask[:, :end], "position_ids": positions[:, start:end]}
            wanted = end - max(start, scored_from - 1)  # the last inputs of the piece, which predict scored tokens
            keep = {} if wanted >= end - start else {"logits_to_keep": max(wanted, 1)}
            logits = model(input_ids=tokens[:, start:end], **padding, **keep, **{keyword: cache}, use_cache=True)
            logits = logits.logits.float()
            peak = max(peak, kv_bytes(cache))
            # The logits returned are those of the piece's last inputs; the one of column c predicts token c + 1.
            first = end - logits.shape[1]
            targets = tokens[:, first + 1 : end + 1]
            log_probs[:, first + 1 : end + 1] = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
            predictions[:, first + 1 : end + 1] = logits.argmax(dim=-1)
    return ForcedPass(log_probs, predictions, peak)


def _feeding_order(length: int, chunk: int, decode_from: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` column ranges covering ``[0, length)``: chunks before ``decode_from``, single tokens after."""
    stop = length if decode_from is None else min(decode_from, length)
    starts = [*range(0, stop, chunk), *range(stop, length)]
    return list(zip(starts, [*starts[1:], length]))


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
