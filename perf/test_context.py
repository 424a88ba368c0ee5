"""Feasible context at a fixed memory: ``pytest perf/test_context.py --benchmark``.

How long a context can one attention layer read *and score* for eviction
within a fixed amount of memory? Two scorers, same layer shape, same tokens:

* ``eager matrix``: what attention-based eviction (H2O, SnapKV, the paper's
  baselines) needs in prefill: the layer's ``[Hq, N, N]`` attention
  probabilities materialised (``softmax(q·kᵀ)``, causal mask applied in
  place), their column sums (the H2O score) and the output from them. Memory
  grows as N². This is one layer's matrix, the least such a scorer holds
  (transformers' ``output_attentions=True`` returns every layer's at once).
* ``ours``: the context read in chunks of ``CHUNK`` tokens, as a patched model
  reads a long prompt: :func:`ops.slot_attention` over a preallocated K/V cache
  of N slots, emitting the key/value delta norms, fed to
  :func:`ops.rolling_zscore` (the ``kv`` signal; this one layer stands in for
  both bands, which costs the same). No N×N matrix. On a GPU the fused kernel
  holds no score block at all: memory is the K/V cache plus one chunk, O(N).
  On a CPU the PyTorch twin materialises one ``[Hq, CHUNK, S]`` score block
  per chunk, so it is O(N·CHUNK): still linear in N at a fixed chunk size,
  with a slope set mostly by that block (about ``3·Hq·CHUNK·4`` bytes per
  context token here, against ``2·Hkv·D·4`` for the K/V itself).

CPU: peak memory by the resident-set high-water mark (``VmHWM``) of a
fresh process per (scorer, N), minus its resident set after the imports
(glibc's mmap threshold fixed, see ``FIXED_MMAP_THRESHOLD``).
tracemalloc is of no use here: it traces Python's allocator and sees none of
torch's CPU tensors (checked: a 200 MB tensor shows as 0 bytes), and torch
keeps no CPU allocator statistics. The measured points are fitted (eager:
a + bN + cN²; ours: a + bN) and solved for the longest N within
``CPU_MEMORY_BUDGET``; a length beyond the longest measured one is labelled
"extrapolated".

GPU: the allocator's peak (``torch.cuda.max_memory_allocated``) in process,
with doubling N until the device runs out of memory (ours stops at
``GPU_MAX_LENGTH``: the ratio is then a lower bound).
"""

from __future__ import annotations

import math

import pytest
import torch

from epikv_triton import ops
from perf import measure

DEV = measure.device()
ON_GPU = DEV.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
GiB = 2**30
MiB = 2**20

if ON_GPU:
    # One Llama-3-8B attention layer: 32 query heads, 8 KV heads of 128.
    Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
    CHUNK = 4096
else:
    # One layer of the end-to-end CPU model (perf/test_end_to_end.py).
    Q_HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
    CHUNK = 256

SCORERS = ["eager matrix", "ours"]
CPU_LENGTHS = [1024, 2048, 4096, 8192]
CPU_MEMORY_BUDGET = 8 * GiB
GPU_START_LENGTH = 1024
GPU_MAX_LENGTH = 1 << 20
SHAPE_LABEL = f"H{Q_HEADS}/{KV_HEADS} D{HEAD_DIM}"
CPU_ONLY = "CPU mode: on a GPU, test_longest_prefill_gpu measures the longest prefill that fits"


# --------------------------------------------------------------------------- #
# The two scorers
# --------------------------------------------------------------------------- #


def eager_matrix_scorer(length: int, generator: torch.Generator) -> torch.Tensor:
    """Prefill of ``length`` tokens with the layer's attention matrix materialised; returns the H2O column sums."""
    q = torch.randn(Q_HEADS, length, HEAD_DIM, generator=generator, device=DEV, dtype=DTYPE)
    k = torch.randn(KV_HEADS, length, HEAD_DIM, generator=generator, device=DEV, dtype=DTYPE)
    v = torch.randn(KV_HEADS, length, HEAD_DIM, generator=generator, device=DEV, dtype=DTYPE)
    group = Q_HEADS // KV_HEADS
    keys, values = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * HEAD_DIM**-0.5  # [Hq, N, N]
    future = torch.ones(length, length, dtype=torch.bool, device=DEV).triu_(1)
    scores.masked_fill_(future, float("-inf"))
    del future
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # [Hq, N, N], the matrix attention scorers read
    del scores
    column_sums = probs.sum(dim=1)  # attention each key receives: the H2O score
    out = torch.matmul(probs.to(DTYPE), values)
    del probs, out
    return column_sums


def chunked_delta_scorer(length: int, generator: torch.Generator) -> torch.Tensor:
    """Chunked prefill of ``length`` tokens through ``ops.slot_attention`` + ``ops.rolling_zscore``; returns scores."""
    cache_k = torch.zeros(1, KV_HEADS, length, HEAD_DIM, device=DEV, dtype=DTYPE)
    cache_v = torch.zeros_like(cache_k)
    pos = torch.full((1, length), -1, dtype=torch.int64, device=DEV)
    scores = torch.empty(1, length, device=DEV)
    ring = torch.zeros(1, 2, 64, device=DEV)
    count = torch.zeros(1, 2, dtype=torch.int64, device=DEV)
    weights = torch.tensor([1.29, -1.0], device=DEV)
    prev_k = prev_v = None
    for start in range(0, length, CHUNK):
        end = min(start + CHUNK, length)
        random = dict(generator=generator, device=DEV, dtype=DTYPE)
        q = torch.randn(1, Q_HEADS, end - start, HEAD_DIM, **random)
        cache_k[:, :, start:end] = torch.randn(1, KV_HEADS, end - start, HEAD_DIM, **random)
        cache_v[:, :, start:end] = torch.randn(1, KV_HEADS, end - start, HEAD_DIM, **random)
        pos[:, start:end] = torch.arange(start, end, device=DEV)
        result = ops.slot_attention(
            q, cache_k[:, :, :end], cache_v[:, :, :end], pos[:, :end],
            prev_k=prev_k, prev_v=prev_v, check_positions=False,
        )
        band = (result.dk + result.dv).mean(dim=1)  # [1, T]
        both_bands = band[:, None].expand(1, 2, end - start).contiguous()
        scores[:, start:end] = ops.rolling_zscore(both_bands, ring, count, weights)
        prev_k, prev_v = cache_k[:, :, end - 1], cache_v[:, :, end - 1]
    return scores


SCORER_FUNCTIONS = {"eager matrix": eager_matrix_scorer, "ours": chunked_delta_scorer}


def predicted_eager_bytes(length: int) -> int:
    """The eager scorer's two live ``[Hq, N, N]`` float32 matrices plus the ``N × N`` bool mask (its floor)."""
    return 2 * Q_HEADS * length * length * 4 + length * length


# --------------------------------------------------------------------------- #
# CPU: peak RSS of a fresh process
# --------------------------------------------------------------------------- #


def measure_in_this_process(scorer: str, length: int) -> dict:
    """Run in a fresh process by :func:`cpu_peak_bytes`: the scorer's peak RSS above the post-import baseline."""
    torch.set_num_threads(1)
    baseline = measure.current_rss_bytes()
    SCORER_FUNCTIONS[scorer](length, torch.Generator(device=DEV).manual_seed(length))
    return {"peak_bytes": measure.peak_rss_bytes() - baseline}


# glibc raises its mmap threshold as large blocks are freed, after which freed
# tensors stay in the heap and the resident set depends on allocation history
# (ours measured 55, 88, 129, 243 MiB at 1k-8k without this, 41, 68, 121, 225
# with it). A fixed threshold maps every block above 128 KiB and unmaps it on
# free, so the high-water mark follows the live tensors. glibc-only; ignored elsewhere.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

# Peak bytes per (scorer, N), measured once per session and shared by the groups.
_CPU_PEAKS: dict[tuple[str, int], int] = {}


def cpu_peak_bytes(scorer: str, length: int) -> int:
    key = (scorer, length)
    if key not in _CPU_PEAKS:
        code = (
            "import json\n"
            "from perf.test_context import measure_in_this_process\n"
            f"print(json.dumps(measure_in_this_process({scorer!r}, {length})))\n"
        )
        _CPU_PEAKS[key] = measure.run_fresh_interpreter(code, extra_env=FIXED_MMAP_THRESHOLD)["peak_bytes"]
    return _CPU_PEAKS[key]


def fits_in_host_memory(scorer: str, length: int) -> bool:
    """Leave the machine half its available memory: a measurement must never push it into swapping or the OOM killer."""
    return scorer != "eager matrix" or predicted_eager_bytes(length) < measure.available_host_bytes() / 2


@pytest.mark.skipif(ON_GPU, reason=CPU_ONLY)
@pytest.mark.benchmark(group="context peak memory")
@pytest.mark.parametrize(
    "length, scorer", [pytest.param(n, s, id=f"N{n}-{s}") for n in CPU_LENGTHS for s in SCORERS]
)
def test_peak_memory_cpu(benchmark, record, length, scorer):
    """Peak RSS of one scorer reading ``length`` tokens, in a fresh process (the timing is the whole process)."""
    if not fits_in_host_memory(scorer, length):
        needed = predicted_eager_bytes(length) / GiB
        pytest.skip(f"the eager matrix needs about {needed:.1f} GiB: more than half of this machine's free memory")
    _CPU_PEAKS.pop((scorer, length), None)
    benchmark.pedantic(lambda: cpu_peak_bytes(scorer, length), rounds=1, iterations=1, warmup_rounds=0)
    peak = _CPU_PEAKS[(scorer, length)]
    benchmark.extra_info["peak_bytes"] = peak
    eager_floor = predicted_eager_bytes(length)
    record(
        "context peak memory",
        device=measure.device_name(DEV),
        layer=SHAPE_LABEL,
        scorer=scorer if scorer != "ours" else f"ours (chunks of {CHUNK})",
        N=length,
        peak_MiB=peak / MiB,
        bytes_per_token=peak / length,
        eager_matrix_floor_MiB=eager_floor / MiB,
    )


def polynomial_fit(lengths: list[int], peaks: list[int], degree: int) -> list[float]:
    """Least-squares coefficients ``[a, b, (c)]`` of ``a + b·N (+ c·N²)`` in bytes, in float64."""
    n = torch.tensor(lengths, dtype=torch.float64)
    design = torch.stack([n**power for power in range(degree + 1)], dim=1)
    target = torch.tensor(peaks, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(design, target).solution[:, 0].tolist()


def longest_length_within(budget: float, coefficients: list[float]) -> float:
    """Largest N with ``a + b·N (+ c·N²) <= budget``."""
    if len(coefficients) == 2:
        a, b = coefficients
        return (budget - a) / b
    a, b, c = coefficients
    return (-b + math.sqrt(b * b - 4 * c * (a - budget))) / (2 * c)


@pytest.mark.skipif(ON_GPU, reason=CPU_ONLY)
def test_feasible_context_cpu(record):
    """Longest N each scorer fits in ``CPU_MEMORY_BUDGET``, from a fit of the measured peaks.

    Reuses the peaks of ``test_peak_memory_cpu`` from the same session (measures any it lacks).
    Eager: quadratic fit; ours: linear. The ratio row divides the two.
    """
    feasible = {}
    for scorer, degree in (("eager matrix", 2), ("ours", 1)):
        lengths = [n for n in CPU_LENGTHS if fits_in_host_memory(scorer, n)]
        peaks = [cpu_peak_bytes(scorer, n) for n in lengths]
        coefficients = polynomial_fit(lengths, peaks, degree)
        longest = longest_length_within(CPU_MEMORY_BUDGET, coefficients)
        feasible[scorer] = longest
        measured_beyond = any(p >= CPU_MEMORY_BUDGET for p in peaks)
        record(
            "feasible context at a fixed memory",
            device=measure.device_name(DEV),
            layer=SHAPE_LABEL,
            scorer=scorer if scorer != "ours" else f"ours (chunks of {CHUNK})",
            memory_GiB=CPU_MEMORY_BUDGET / GiB,
            fit=("a + bN + cN²" if degree == 2 else "a + bN") + f", from N = {', '.join(map(str, lengths))}",
            longest_N=int(longest),
            how="interpolated" if measured_beyond else f"extrapolated (measured up to {max(lengths)})",
            vs_eager=longest / feasible["eager matrix"],
        )


# --------------------------------------------------------------------------- #
# GPU: the longest prefill that fits
# --------------------------------------------------------------------------- #


def gpu_peak_bytes(scorer: str, length: int) -> int | None:
    """Allocator peak of one run above what was allocated before it; ``None`` if it ran out of memory."""
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        SCORER_FUNCTIONS[scorer](length, torch.Generator(device=DEV).manual_seed(length))
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.skipif(not ON_GPU, reason="GPU mode: on a CPU, test_feasible_context_cpu extrapolates measured peaks")
@pytest.mark.benchmark(group="longest prefill that fits")
def test_longest_prefill_gpu(benchmark, record):
    """Doubling N from ``GPU_START_LENGTH``: the longest prefill each scorer completes in this GPU's memory."""
    total = torch.cuda.get_device_properties(DEV).total_memory
    longest: dict[str, int] = {}

    def search() -> None:
        for scorer in SCORERS:
            length, fitted = GPU_START_LENGTH, 0
            while length <= GPU_MAX_LENGTH:
                peak = gpu_peak_bytes(scorer, length)
                if peak is None:
                    break
                fitted = length
                record(
                    "longest prefill that fits",
                    device=measure.device_name(DEV),
                    layer=SHAPE_LABEL,
                    scorer=scorer if scorer != "ours" else f"ours (chunks of {CHUNK})",
                    N=length,
                    peak_GiB=peak / GiB,
                    device_GiB=total / GiB,
                )
                length *= 2
            longest[scorer] = fitted

    benchmark.pedantic(search, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["longest"] = longest
    capped = longest["ours"] >= GPU_MAX_LENGTH
    record(
        "longest prefill that fits",
        device=measure.device_name(DEV),
        layer=SHAPE_LABEL,
        scorer="ratio ours / eager",
        N=f"{longest['ours']} / {longest['eager matrix']}",
        peak_GiB=float("nan"),
        device_GiB=total / GiB,
        ratio=(">= " if capped else "") + f"{longest['ours'] / max(longest['eager matrix'], 1):.0f}x",
    )
