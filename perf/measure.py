"""Timing and ceilings for the perf suite.

Rates are derived from counted FLOPs and bytes (each test states its count);
ceilings are measured on the device in the same session: a plain copy for
bandwidth, a large matmul for compute. On a CPU, absolute numbers mean little
and the ratios are what to read.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''})"


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_seconds(fn: Callable[[], object], dev: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` (device-synchronised), for quantities measured outside pytest-benchmark."""
    for _ in range(warmup):
        fn()
    synchronize(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(benchmark, fn: Callable[[], object], dev: torch.device, rounds: int = 5) -> float:
    """Time ``fn`` through pytest-benchmark (so ``--benchmark-json`` has it); returns the median seconds."""

    def run():
        fn()
        synchronize(dev)

    run()  # warm-up: compilation and autotuning stay out of the measurement
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # read + write bytes of a large device copy
    matmul_flops_per_s: float  # dense matmul in the working dtype

    @classmethod
    def measure(cls, dev: torch.device) -> "Ceilings":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        n = 1 << (28 if dev.type == "cuda" else 24)
        src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
        dst = torch.empty_like(src)
        copy = median_seconds(lambda: dst.copy_(src), dev)
        size = 8192 if dev.type == "cuda" else 1024
        a = torch.randn(size, size, device=dev, dtype=dtype)
        b = torch.randn(size, size, device=dev, dtype=dtype)
        mm = median_seconds(lambda: a @ b, dev)
        return cls(copy_bytes_per_s=2 * src.numel() * 4 / copy, matmul_flops_per_s=2 * size**3 / mm)


def attention_flops(batch: int, q_heads: int, queries: int, keys: int, head_dim: int, causal: bool) -> float:
    """FLOPs of QK^T and PV; a causal square prefill does about half of them."""
    full = 4.0 * batch * q_heads * queries * keys * head_dim
    return full / 2 if causal and queries == keys else full


def bench_fresh(
    benchmark, fn: Callable[[], object], setup: Callable[[], object], dev: torch.device, rounds: int = 5
) -> float:
    """Like :func:`bench` for in-place ops whose second run would do less work.

    ``setup()`` rebuilds the inputs before every timed call (pytest-benchmark's
    ``setup=``, untimed; synchronised so none of its device work leaks into the
    timed call). Returns the median seconds of ``fn`` alone.
    """

    def prepare():
        setup()
        synchronize(dev)

    def run():
        fn()
        synchronize(dev)

    prepare()
    run()  # warm-up: compilation and autotuning stay out of the measurement
    benchmark.pedantic(run, setup=prepare, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


def floor_fraction(seconds: float, flops: float, bytes_moved: float, ceilings: Ceilings) -> float:
    """Fraction of the roofline floor reached: ``max(flops / matmul rate, bytes / copy bandwidth) / seconds``.

    The floor is set by whichever resource the op saturates first, so a
    compute-bound op is measured against the matmul rate and a memory-bound
    one against the copy bandwidth, with no per-op guess which it is.
    """
    floor = max(flops / ceilings.matmul_flops_per_s, bytes_moved / ceilings.copy_bytes_per_s)
    return floor / seconds


def format_rate(seconds: float, flops: float = 0.0, bytes_moved: float = 0.0) -> str:
    """``"123 TFLOP/s"`` when ``flops`` are given, else ``"456 GB/s"`` (counted work over measured time)."""
    if flops:
        return f"{flops / seconds / 1e12:.3g} TFLOP/s"
    return f"{bytes_moved / seconds / 1e9:.3g} GB/s"


# --------------------------------------------------------------------------- #
# Host memory (CPU mode)
# --------------------------------------------------------------------------- #
# torch's CPU tensors are invisible to tracemalloc (it traces Python's own
# allocator only) and torch keeps no CPU allocator statistics, so host memory
# is read from the kernel: the resident set now (VmRSS) and its high-water mark
# (VmHWM) in /proc/self/status. Not getrusage's ru_maxrss: on Linux a child
# started by fork + exec reports the parent's high-water mark when that is
# larger (checked: a child of a 1.3 GiB parent read 1.3 GiB, VmHWM 11 MiB).
# The high-water mark never goes down, so each measurement needs a fresh
# process: see :func:`run_fresh_interpreter`.


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``VmRSS``)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set since it started or last exec'd (Linux ``VmHWM``)."""
    return _proc_status_bytes("VmHWM")


def available_host_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo``: what can be allocated without swapping or evicting."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def run_fresh_interpreter(code: str, extra_env: dict[str, str] | None = None, timeout_s: float = 300.0) -> dict:
    """Run ``code`` in a new Python process and return the JSON object it prints last.

    One process per measurement, so a peak RSS is the peak of that measurement
    alone. The child inherits the environment (single-thread settings, the
    backend choice) plus ``extra_env``, and runs from the repository root so
    ``perf`` imports.
    """
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, **(extra_env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
