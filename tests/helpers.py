"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch

# Relative RMS error allowed per dtype (fla-style ratio-of-RMS check).
RMS_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_rms(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``rms(actual - expected) <= tol * rms(expected)``, with NaN/inf placement identical."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert bool(same_nan.all()), f"{what}: NaN placement differs"
    finite = torch.isfinite(expected)
    assert bool((torch.isinf(actual) == torch.isinf(expected)).all()), f"{what}: inf placement differs"
    a, e = actual[finite], expected[finite]
    if e.numel() == 0:
        return
    err = torch.sqrt(torch.mean((a - e) ** 2))
    ref = torch.sqrt(torch.mean(e**2)).clamp(min=1e-6)
    tol = RMS_TOLERANCE[dtype]
    assert err <= tol * ref, f"{what}: relative RMS error {float(err / ref):.3g} > {tol:g}"


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``x`` filled with NaN: whatever a kernel fails to write shows up."""
    return torch.full_like(x, float("nan"))


def poisoning_runner(monkeypatch, launcher):
    """``launcher`` wrapped so every float ``torch.empty`` it makes is NaN-filled: unwritten outputs show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        fresh = real_empty(*args, **kwargs)
        return poisoned_like(fresh) if fresh.is_floating_point() else fresh

    def run(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", empty)
            return launcher(*args, **kwargs)

    return run


def config_id(config):
    """Test id of an attention-shaped kernel's ``triton.Config``: tiles, warps, stages."""
    return f"M{config.kwargs['BLOCK_M']}-N{config.kwargs['BLOCK_N']}-w{config.num_warps}-s{config.num_stages}"


def randn(*shape, dtype, layout="contiguous"):
    """Random ``[B, H, N, D]`` tensor.

    ``layout="bshd"``: a transposed view of ``[B, N, H, D + 8]`` storage (the
    padding keeps it non-contiguous even when N = 1).
    """
    if layout == "bshd":
        B, H, N, D = shape
        return torch.randn(B, N, H, D + 8, device=device()).to(dtype)[..., :D].transpose(1, 2)
    return torch.randn(*shape, device=device()).to(dtype)


def prefill_positions(B, T, pad=()):
    """``[B, T]`` positions ``0..T-1``; sequence ``b`` left-padded by ``pad[b]`` slots of ``-1``."""
    pos = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        p = pad[b] if b < len(pad) else 0
        pos[b, :p] = -1
        pos[b, p:] = torch.arange(T - p)
    return pos.to(device())


def cache_positions(B, cache_slots, T, seen, holes=0, pad=()):
    """Positions of a compacted cache of ``cache_slots`` slots followed by ``T`` new tokens.

    The cache holds a random subset of positions ``< seen`` in shuffled slot order
    (attention must not depend on slot order), with ``holes`` empty slots (-1)
    scattered through it; sequence ``b`` of ``pad`` is left-padded: its first
    ``pad[b]`` cache slots are -1 as well.
    """
    rows = []
    for b in range(B):
        p = pad[b] if b < len(pad) else 0
        kept = cache_slots - holes - p
        cache = torch.randperm(seen)[:kept]
        cache = torch.cat([cache, torch.full((holes,), -1)])
        cache = cache[torch.randperm(cache_slots - p)]
        rows.append(torch.cat([torch.full((p,), -1), cache, torch.arange(seen, seen + T)]))
    return torch.stack(rows).to(device())


def buffer_in_use(counts, capacity, T, seen):
    """``(pos, query_slots, slot_count)`` of a static-shape step over a buffer of ``capacity`` slots.

    Sequence ``b`` uses its first ``counts[b]`` slots: a shuffled cache of positions ``< seen`` with the
    ``T`` new tokens (positions ``seen..``) in its last ``T`` slots. The slots past ``counts[b]`` hold
    stale but real-looking positions (what a compaction leaves), so only ``slot_count`` can hide them.
    """
    rows, slots = [], []
    for used in counts:
        cache = torch.randperm(seen)[: used - T]
        stale = torch.randint(0, seen + T, (capacity - used,))
        rows.append(torch.cat([cache, torch.arange(seen, seen + T), stale]))
        slots.append(torch.arange(used - T, used))
    slot_count = torch.tensor(counts, dtype=torch.int32)
    return torch.stack(rows).to(device()), torch.stack(slots).to(device()), slot_count.to(device())


def shuffle_slots(pos, *planes, empty_slots=0):
    """The same keys in another slot layout, with the new tokens' slots made explicit.

    ``pos [B, S]`` and ``planes`` (``k``, ``v`` ``[B, H, S, D]``) in the default
    layout, the ``T`` new tokens in the last slots. Each sequence gets
    ``empty_slots`` more slots (position -1, random K/V) and a random slot
    order, so the new tokens land anywhere, in any order, among cache slots
    and empty ones. Returns ``(pos, *planes, slot_of)``: ``slot_of [B, S]``
    int64 is where slot ``j`` went, so ``slot_of[:, S - T:]`` are the new
    tokens' ``query_slots``.
    """
    B, S = pos.shape
    width = S + empty_slots
    pos = torch.cat([pos, torch.full((B, empty_slots), -1, dtype=pos.dtype, device=pos.device)], dim=1)
    order = torch.stack([torch.randperm(width) for _ in range(B)]).to(pos.device)
    shuffled = [pos.gather(1, order)]
    for plane in planes:
        H, D = plane.shape[1], plane.shape[3]
        padding = torch.randn(B, H, empty_slots, D, device=plane.device).to(plane.dtype)
        grown = torch.cat([plane, padding], dim=2)
        shuffled.append(grown.gather(2, order[:, None, :, None].expand(B, H, width, D)))
    return (*shuffled, order.argsort(dim=1)[:, :S])


# (cache slots C, new tokens T, window, empty slots added) for the "new tokens in any slots" tests of the
# attention-shaped kernels: prefill (C = 0) and chunks, with and without a window and empty slots.
ANY_SLOT_CASES = [
    (0, 100, None, 0),
    (0, 100, 16, 30),
    (60, 37, None, 25),
    (60, 70, 24, 10),
]


def chunk_positions(C, T):
    """Positions of two sequences for an :data:`ANY_SLOT_CASES` case, in the default layout: the new
    tokens after ``C`` cache slots (shuffled, with holes), or a prefill when ``C = 0``; sequence 1 is
    left-padded."""
    if C:
        return cache_positions(2, C, T, seen=80, holes=6, pad=(0, 20))
    return prefill_positions(2, T, pad=(0, 9))
