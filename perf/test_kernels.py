"""Kernel perf groups: ``pytest perf/test_kernels.py --benchmark``.

Each group times every variant of one shape in the same run, the anchor first,
and records median time, the rate derived from counted work (TFLOP/s for
compute-bound ops, GB/s for memory-bound ones), the fraction of the roofline
floor measured on this device (see :func:`perf.measure.floor_fraction`) and
``vs_anchor = anchor time / time`` (above 1 = faster than the anchor).

Two modes, picked by the device:

* GPU: real shapes (Llama-like heads, 1k–32k tokens), bf16, the Triton kernels.
* CPU: small shapes, fp32, the ops' PyTorch twins (``EPIKV_BACKEND=torch`` is
  forced so Triton's interpreter never runs here). Absolute CPU numbers mean
  little; read the ratios.

Groups: prefill attention, decode attention (dense and paged), compaction,
z-score update, and (GPU only) the H2O score: the fused two-pass column sums against the eager
attention matrix.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from epikv_triton import ops
from perf import measure

DEV = measure.device()
ON_GPU = DEV.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ITEMSIZE = torch.empty((), dtype=DTYPE).element_size()

# The eager variants materialise B·Hq·N² scores (DTYPE) and probabilities
# (float32, then DTYPE again); beyond this they are skipped rather than
# pushed out of memory.
EAGER_MATRIX_BYTES_LIMIT = 32 * 2**30

# Anchor times measured in this run, keyed by (group, shape label). Each group
# lists its anchor first for every shape, so the anchor test fills this before
# the variants read it; a variant run on its own (-k) measures the anchor itself.
_ANCHOR_SECONDS: dict[tuple[str, str], float] = {}


def anchor_seconds(group: str, shape: str, run_anchor: Callable[[], object]) -> float:
    key = (group, shape)
    if key not in _ANCHOR_SECONDS:
        _ANCHOR_SECONDS[key] = measure.median_seconds(run_anchor, DEV)
    return _ANCHOR_SECONDS[key]


def add_row(record, ceilings, group, shape, variant, seconds, anchor, *, flops=0.0, bytes_moved=0.0, bound="compute"):
    """One table row; ``bound`` = ``"compute"`` reports TFLOP/s, ``"memory"`` GB/s."""
    rate_flops = flops if bound == "compute" else 0.0
    record(
        group,
        device=measure.device_name(DEV),
        shape=shape,
        variant=variant,
        median_ms=seconds * 1e3,
        rate=measure.format_rate(seconds, flops=rate_flops, bytes_moved=bytes_moved),
        ceiling_fraction=measure.floor_fraction(seconds, flops, bytes_moved, ceilings),
        vs_anchor=anchor / seconds,
    )


def cases(shapes, variants):
    """``(shape, variant)`` pairs in run order: per shape, the anchor variant first."""
    return [pytest.param(shape, variant, id=f"{shape.label}-{variant}") for shape in shapes for variant in variants]


# --------------------------------------------------------------------------- #
# Attention baselines
# --------------------------------------------------------------------------- #


class AttentionShape(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    queries: int
    keys: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.q_heads}/{self.kv_heads} T{self.queries} S{self.keys} D{self.head_dim}"

    def tensors(self):
        """Random ``q [B, Hq, T, D]``, ``k``/``v [B, Hkv, S, D]`` in DTYPE and ``pos [B, S]`` = 0..S-1."""
        B, Hq, Hkv, T, S, D = self
        q = torch.randn(B, Hq, T, D, device=DEV, dtype=DTYPE)
        k = torch.randn(B, Hkv, S, D, device=DEV, dtype=DTYPE)
        v = torch.randn(B, Hkv, S, D, device=DEV, dtype=DTYPE)
        pos = torch.arange(S, device=DEV).repeat(B, 1)
        return q, k, v, pos

    def eager_matrix_bytes(self) -> int:
        return self.batch * self.q_heads * self.queries * self.keys * (2 * ITEMSIZE + 4)


def sdpa_runner(q, k, v, causal: bool) -> tuple[Callable[[], torch.Tensor], str]:
    """SDPA at its best, with a label saying what ran.

    GPU: the flash backend with native GQA; where this torch build's flash
    kernel refuses ``enable_gqa``, K/V repeated to every query head beforehand
    (untimed; it reads G× the K/V bytes, which matters for decode only).
    CPU: SDPA's own backend choice with ``enable_gqa``.
    """
    group = q.shape[1] // k.shape[1]
    if not ON_GPU:
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)), "sdpa"

    def flash_gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        flash_gqa()
        return flash_gqa, "sdpa flash"
    except RuntimeError:
        k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        def flash_repeated():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=causal)

        return flash_repeated, "sdpa flash (kv repeated)"


def eager_attention(q, k, v, visible):
    """Textbook eager attention: repeat K/V per query head, materialise softmax(q·kᵀ), multiply by V.

    ``visible``: ``[T, S]`` bool (True = attend). Softmax in float32, as eager
    model code does.
    """
    group = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(q.dtype), values)


# --------------------------------------------------------------------------- #
# Prefill attention
# --------------------------------------------------------------------------- #

if ON_GPU:
    # 16k tokens per launch (batch × length), 2048-wide attention, GQA 4 (Llama 3).
    PREFILL_SHAPES = [
        AttentionShape(max(1, 16384 // n), 2048 // d, 2048 // d // 4, n, n, d)
        for d in (64, 128) for n in (1024, 4096, 8192, 16384)
    ]
else:
    PREFILL_SHAPES = [AttentionShape(1, 4, 2, n, n, d) for d in (64, 128) for n in (256, 512)]

PREFILL_VARIANTS = ["sdpa", "ours + delta norms", "ours, no deltas", "eager"]


@pytest.mark.benchmark(group="prefill attention")
@pytest.mark.parametrize("shape, variant", cases(PREFILL_SHAPES, PREFILL_VARIANTS))
def test_prefill_attention(benchmark, record, ceilings, shape, variant):
    """Causal prefill (S == T). Work: 2·B·Hq·N²·D FLOPs (the causal half of QKᵀ and PV),
    bytes: q, out (Hq heads) and k, v (Hkv heads), each read or written once."""
    group_name = "prefill attention"
    B, Hq, Hkv, N, _, D = shape
    q, k, v, pos = shape.tensors()
    sdpa, sdpa_label = sdpa_runner(q, k, v, causal=True)
    if variant == "sdpa":
        fn = sdpa
    elif variant == "ours + delta norms":
        fn = lambda: ops.slot_attention(q, k, v, pos, check_positions=False)  # noqa: E731
    elif variant == "ours, no deltas":
        fn = lambda: ops.slot_attention(q, k, v, pos, with_deltas=False, check_positions=False)  # noqa: E731
    else:
        if shape.eager_matrix_bytes() > EAGER_MATRIX_BYTES_LIMIT:
            pytest.skip(f"eager would materialise {shape.eager_matrix_bytes() / 2**30:.0f} GiB of attention matrix")
        causal = torch.ones(N, N, dtype=torch.bool, device=DEV).tril()
        fn = lambda: eager_attention(q, k, v, causal)  # noqa: E731

    seconds = measure.bench(benchmark, fn, DEV)
    if variant == "sdpa":
        _ANCHOR_SECONDS[(group_name, shape.label)] = seconds
    anchor = anchor_seconds(group_name, shape.label, sdpa)
    flops = measure.attention_flops(B, Hq, N, N, D, causal=True)
    bytes_moved = ITEMSIZE * (2 * B * Hq * N * D + 2 * B * Hkv * N * D)
    label = sdpa_label if variant == "sdpa" else variant
    add_row(record, ceilings, group_name, shape.label, label, seconds, anchor, flops=flops, bytes_moved=bytes_moved)


# --------------------------------------------------------------------------- #
# Decode attention
# --------------------------------------------------------------------------- #

if ON_GPU:
    # Llama-3-8B heads (32 query, 8 kv, D 128) over the kept cache.
    DECODE_SHAPES = [AttentionShape(b, 32, 8, 1, s + 1, 128) for b in (1, 8, 64) for s in (1024, 8192, 32768)]
else:
    DECODE_SHAPES = [AttentionShape(b, 8, 2, 1, s + 1, 64) for b in (1, 4) for s in (1024, 4096)]

DECODE_VARIANTS = ["sdpa", "ours + delta norms", "ours paged (page 16)"]
PAGE_SIZE = 16


def paged_copy(k, v, pos, page_size=PAGE_SIZE):
    """The dense cache as an engine's pool of pages in shuffled order: ``(k_pages, v_pages, pos_pages,
    block_table)``; slots past ``S`` in the last page are empty."""
    B, Hkv, S, D = k.shape
    pages = -(-S // page_size)
    width = pages * page_size
    order = torch.randperm(B * pages, device=k.device)
    table = order.view(B, pages).to(torch.int32)

    def pool(x, fill):
        padded = torch.full((B, width, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        padded[:, :S] = x
        out = torch.empty((B * pages, page_size, *x.shape[2:]), dtype=x.dtype, device=x.device)
        out[order] = padded.view(B * pages, page_size, *x.shape[2:])
        return out

    return pool(k.transpose(1, 2), 0.0), pool(v.transpose(1, 2), 0.0), pool(pos, -1), table


@pytest.mark.benchmark(group="decode attention")
@pytest.mark.parametrize("shape, variant", cases(DECODE_SHAPES, DECODE_VARIANTS))
def test_decode_attention(benchmark, record, ceilings, shape, variant):
    """One new token per sequence over its whole cache (every slot visible).

    Memory bound: bytes = the K and V bytes read (q and out are 1/S of that);
    FLOPs 4·B·Hq·S·D for the roofline floor.
    """
    group_name = "decode attention"
    B, Hq, Hkv, T, S, D = shape
    q, k, v, pos = shape.tensors()
    sdpa, sdpa_label = sdpa_runner(q, k, v, causal=False)  # T = 1 sees all: no causal mask
    if variant == "sdpa":
        fn = sdpa
    elif variant == "ours + delta norms":
        # What the engine runs each step (split-K chosen from the shape on a GPU).
        fn = lambda: ops.slot_attention(q, k, v, pos, check_positions=False)  # noqa: E731
    else:
        # The same step over a paged pool (pages in shuffled order): the cost of the block-table lookups.
        k_pages, v_pages, pos_pages, table = paged_copy(k, v, pos)
        query_slots = torch.full((B, 1), S - 1, device=DEV)
        fn = lambda: ops.paged_slot_attention(  # noqa: E731
            q, k_pages, v_pages, pos_pages, table, query_slots=query_slots, check_positions=False
        )

    seconds = measure.bench(benchmark, fn, DEV)
    if variant == "sdpa":
        _ANCHOR_SECONDS[(group_name, shape.label)] = seconds
    anchor = anchor_seconds(group_name, shape.label, sdpa)
    bytes_moved = 2 * B * Hkv * S * D * ITEMSIZE
    flops = measure.attention_flops(B, Hq, T, S, D, causal=False)
    label = sdpa_label if variant == "sdpa" else variant
    add_row(
        record, ceilings, group_name, shape.label, label, seconds, anchor,
        flops=flops, bytes_moved=bytes_moved, bound="memory",
    )


# --------------------------------------------------------------------------- #
# Compaction
# --------------------------------------------------------------------------- #


class CacheShape(NamedTuple):
    planes: int  # 2 × layers (every layer's K and V)
    batch: int
    heads: int
    slots: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"P{self.planes} B{self.batch} H{self.heads} S{self.slots} D{self.head_dim}"


if ON_GPU:
    # 32 layers of 8 kv heads × 128 (Llama-3-8B); 4.3 GB of cache at the largest.
    COMPACTION_SHAPES = [CacheShape(64, b, 8, s, 128) for b, s in ((1, 4096), (8, 4096), (1, 32768))]
else:
    COMPACTION_SHAPES = [CacheShape(8, 1, 4, s, 64) for s in (1024, 4096)]

# One slot in EVICT_EVERY is evicted, spread over the whole cache, so nearly
# every freed slot below the new fill takes a kept slot from above it (the most
# a hole-filling compaction ever moves for this many evicted slots).
EVICT_EVERY = 8
# Slots past S in the cache buffer (room for the next chunk), so kv is a strided view.
CACHE_HEADROOM = 256


def compaction_inputs(shape: CacheShape):
    """``kv`` (a ``[P, B, H, S, D]`` view of a larger buffer), ``pos``, ``scores``, ``destination`` and pristine
    copies."""
    P, B, H, S, D = shape
    buffer = torch.randn(P, B, H, S + CACHE_HEADROOM, D, device=DEV, dtype=DTYPE)
    kv = buffer[:, :, :, :S]
    pos = torch.arange(S, device=DEV).repeat(B, 1)
    scores = torch.rand(B, S, device=DEV)
    keep = (torch.arange(S, device=DEV) % EVICT_EVERY != 0).repeat(B, 1)
    destination = ops.compaction_plan(keep, int(keep[0].sum()))
    pristine = (kv.clone(), pos.clone(), scores.clone())
    return kv, pos, scores, destination, pristine


def compaction_bytes(shape: CacheShape, destination: torch.Tensor) -> int:
    """Fewest bytes: every moved slot's K/V read and written once, destination read, released metadata cleared."""
    P, B, H, S, D = shape
    moved = int((destination >= 0).sum())
    released = destination.numel()
    return 2 * P * H * moved * D * ITEMSIZE + released * 8 + moved * 2 * (8 + 4) + released * (8 + 4)


def copy_runner(bytes_moved: int) -> Callable[[], torch.Tensor]:
    """A plain device copy that reads and writes ``bytes_moved`` bytes in total (the bandwidth anchor)."""
    elements = max(1, bytes_moved // 2 // 4)
    src = torch.randn(elements, device=DEV)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.mark.benchmark(group="compaction")
@pytest.mark.parametrize("shape, variant", cases(COMPACTION_SHAPES, ["copy", "compact_slots_"]))
def test_compaction(benchmark, record, ceilings, shape, variant):
    """In-place compaction of every plane, 1/8 of the slots evicted, vs a copy of the same bytes.

    The compaction clears the released slots' positions, so every timed call
    gets the original cache back from an untimed pytest-benchmark ``setup=``
    (measure.bench_fresh): the time is the compaction alone, no copy subtracted.
    """
    group_name = "compaction"
    kv, pos, scores, destination, (kv0, pos0, scores0) = compaction_inputs(shape)
    bytes_moved = compaction_bytes(shape, destination)
    copy = copy_runner(bytes_moved)
    if variant == "copy":
        seconds = measure.bench(benchmark, copy, DEV)
        _ANCHOR_SECONDS[(group_name, shape.label)] = seconds
    else:

        def restore():
            kv.copy_(kv0)
            pos.copy_(pos0)
            scores.copy_(scores0)

        seconds = measure.bench_fresh(benchmark, lambda: ops.compact_slots_(kv, pos, scores, destination), restore, DEV)
    anchor = anchor_seconds(group_name, shape.label, copy)
    add_row(
        record, ceilings, group_name, shape.label, variant, seconds, anchor, bytes_moved=bytes_moved, bound="memory"
    )


# --------------------------------------------------------------------------- #
# Rolling z-score update
# --------------------------------------------------------------------------- #


class ZScoreShape(NamedTuple):
    batch: int
    bands: int
    tokens: int
    window: int

    @property
    def label(self) -> str:
        return f"B{self.batch} NB{self.bands} T{self.tokens} W{self.window}"


if ON_GPU:
    ZSCORE_SHAPES = [ZScoreShape(b, 2, t, 64) for b in (1, 64) for t in (1, 512)]
else:
    # The twin walks the chunk token by token in Python: a short chunk keeps the CPU run quick.
    ZSCORE_SHAPES = [ZScoreShape(4, 2, t, 64) for t in (1, 128)]


def zscore_bytes(shape: ZScoreShape) -> int:
    """Fewest bytes: values read, ring and count read and written, weights read, scores written."""
    B, NB, T, W = shape
    return 4 * B * NB * T + 2 * 4 * B * NB * W + 2 * 8 * B * NB + 4 * NB + 4 * B * T


@pytest.mark.benchmark(group="z-score update")
@pytest.mark.parametrize("shape, variant", cases(ZSCORE_SHAPES, ["copy", "rolling_zscore"]))
def test_zscore_update(benchmark, record, ceilings, shape, variant):
    """Rolling z-score of a decode step (T = 1) or a chunk, vs a copy of the same bytes.

    Re-running the update on its own output is a fair repeat (the state just
    advances; same work every call), so no setup is needed. Tiny byte counts:
    both sides are launch-latency bound on a GPU, which is what the ratio shows.
    """
    group_name = "z-score update"
    B, NB, T, W = shape
    values = torch.randn(B, NB, T, device=DEV)
    ring = torch.randn(B, NB, W, device=DEV)
    count = torch.full((B, NB), W, dtype=torch.int64, device=DEV)
    weights = torch.randn(NB, device=DEV)
    bytes_moved = zscore_bytes(shape)
    copy = copy_runner(bytes_moved)
    if variant == "copy":
        seconds = measure.bench(benchmark, copy, DEV)
        _ANCHOR_SECONDS[(group_name, shape.label)] = seconds
    else:
        seconds = measure.bench(benchmark, lambda: ops.rolling_zscore(values, ring, count, weights), DEV)
    anchor = anchor_seconds(group_name, shape.label, copy)
    add_row(
        record, ceilings, group_name, shape.label, variant, seconds, anchor, bytes_moved=bytes_moved, bound="memory"
    )


# --------------------------------------------------------------------------- #
# H2O score (GPU only)
# --------------------------------------------------------------------------- #

H2O_SHAPES = [AttentionShape(1, 32, 8, n, n, 128) for n in (4096, 16384)]
H2O_VARIANTS = ["attention + lse", "two-pass h2o", "eager h2o"]


def eager_attention_with_h2o(q, k, v, visible):
    """Eager attention that also returns H2O scores from the same materialised matrix.

    ``visible``: ``[T, S]`` bool. Returns ``out [B, Hq, T, D]`` and the float32
    column sums ``[B, Hkv, S]`` (probabilities summed over queries and group heads).
    """
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(q.dtype), values)
    return out, probs.sum(dim=2).view(B, Hkv, group, S).sum(dim=2)


@pytest.mark.benchmark(group="h2o score")
@pytest.mark.parametrize("shape, variant", cases(H2O_SHAPES, H2O_VARIANTS))
def test_h2o_score(benchmark, record, ceilings, shape, variant):
    """Causal prefill with H2O scores: pass 1 (attention + lse) alone is the anchor, so
    ``vs_anchor`` of the two-pass row is 1 / (1 + the scoring overhead).

    Work of the two passes: 2·B·Hq·N²·D (causal attention) + B·Hq·N²·D (causal QKᵀ
    recomputed); the eager row is credited with the same useful work.
    """
    if not ON_GPU:
        pytest.skip("the CPU path of attention_column_sums is the materialising twin: nothing fused to compare")
    group_name = "h2o score"
    B, Hq, Hkv, N, _, D = shape
    q, k, v, pos = shape.tensors()

    def attention_only():
        return ops.slot_attention(q, k, v, pos, return_lse=True, check_positions=False)

    def two_pass():
        lse = ops.slot_attention(q, k, v, pos, return_lse=True, check_positions=False).lse
        return ops.attention_column_sums(q, k, pos, lse, check_positions=False)

    if variant == "attention + lse":
        fn = attention_only
    elif variant == "two-pass h2o":
        fn = two_pass
    else:
        if shape.eager_matrix_bytes() > EAGER_MATRIX_BYTES_LIMIT:
            pytest.skip(f"eager would materialise {shape.eager_matrix_bytes() / 2**30:.0f} GiB of attention matrix")
        causal = torch.ones(N, N, dtype=torch.bool, device=DEV).tril()

        fn = lambda: eager_attention_with_h2o(q, k, v, causal)  # noqa: E731

    seconds = measure.bench(benchmark, fn, DEV)
    if variant == "attention + lse":
        _ANCHOR_SECONDS[(group_name, shape.label)] = seconds
    anchor = anchor_seconds(group_name, shape.label, attention_only)
    flops = 3 * B * Hq * N * N * D
    bytes_moved = ITEMSIZE * (2 * B * Hq * N * D + 2 * B * Hkv * N * D) + 4 * B * Hkv * N
    add_row(record, ceilings, group_name, shape.label, variant, seconds, anchor, flops=flops, bytes_moved=bytes_moved)
