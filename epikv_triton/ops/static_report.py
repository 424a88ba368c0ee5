"""Compile every Triton kernel config for a GPU this machine does not have, and read the result.

Triton's compiler needs no GPU: only its driver does. :class:`StandInDriver`
reports a chosen CUDA target (sm_90, sm_80), launches nothing and times
nothing, so calling the project's own launchers with CPU tensors of real
shapes makes Triton compile each config with exactly the argument
specialisation (dtypes, 16-byte divisibility, ``== 1`` integers) a user's
launch gets. The cubin is then read with the ``cuobjdump`` shipped in the
Triton wheel (registers, stack bytes), the metadata gives shared memory, and
the TTGIR shows whether dots became Hopper ``wgmma`` (``warp_group_dot``) and
loads went through TMA.

The kernels must not have been imported under ``TRITON_INTERPRET=1`` (the
tests' setting on a CPU), so a process that did calls
:func:`report_in_fresh_process`; from a shell::

    python -m epikv_triton.ops.static_report --arch 90 --dtype bf16 --head-dim 128 [--json out.json] [--strict]

prints one JSON object per compiled config (a list); ``--strict`` exits
non-zero when any config fails to compile. Used by the ``static`` group of
the perf suite and by ``tests/test_sm90_compile.py``. A developer tool: the
ops never import it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver

# Opt-in shared memory per block: 227 KiB on H100/H200, 163 KiB on A100.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# A Llama-3-8B-shaped layer: 32 query heads over 8 KV heads.
Q_HEADS, KV_HEADS = 32, 8
PREFILL_TOKENS = 512
CACHE_SLOTS = 4096  # decode and chunked prefill run over CACHE_SLOTS + T slots
CHUNK_TOKENS = 16
DECODE_SPLITS = 4
PAGE_SIZE = 16  # the paged cases' page (vLLM's default)


# --------------------------------------------------------------------------- #
# The stand-in driver
# --------------------------------------------------------------------------- #


class _NoLaunch:
    """Launcher of the stand-in driver: compiling is all that is wanted."""

    def __init__(self, src, metadata):
        del src, metadata

    def __call__(self, *args, **kwargs):
        return None


class _StandInUtils:
    def __init__(self, shared_memory_limit: int):
        self.shared_memory_limit = shared_memory_limit

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads): read from the cubin instead.
        return None, None, 0, 0, 1024

    def unload_module(self, module):
        return None

    def get_device_properties(self, device):
        return {"max_shared_mem": self.shared_memory_limit, "multiprocessor_count": 132}


class StandInDriver(CudaDriver):
    """A CUDA driver for an absent GPU of compute capability ``arch`` (90, 80)."""

    def __init__(self, arch: int):
        # CudaDriver.__init__ would load libcuda: everything it sets is replaced here.
        self.arch = arch
        self.utils = _StandInUtils(SHARED_MEMORY_LIMIT[arch])
        self.launcher_cls = _NoLaunch
        self.get_current_device = lambda: 0
        self.set_current_device = lambda device: None
        self.get_current_stream = lambda device=None: 0
        self.get_device_capability = lambda device=None: divmod(arch, 10)

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_benchmarker(self):
        # One call compiles the config; every config ties, so the first compiling one wins.
        def call_once(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return call_once

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        return None


# --------------------------------------------------------------------------- #
# Reading a compiled kernel
# --------------------------------------------------------------------------- #


@dataclass
class ConfigReport:
    kernel: str
    case: str
    config: str
    arch: int
    dtype: str
    head_dim: int
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    fits_shared: bool | None = None
    wgmma: bool | None = None
    tma: bool | None = None
    error: str | None = None


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one function in ``cubin``, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if registers is None or stack is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return int(registers.group(1)), int(stack.group(1))


def _read_kernel(compiled, report: ConfigReport) -> None:
    report.registers, report.stack_bytes = _resource_usage(compiled.asm["cubin"])
    report.shared_bytes = int(compiled.metadata.shared)
    report.shared_limit = SHARED_MEMORY_LIMIT[report.arch]
    report.fits_shared = report.shared_bytes <= report.shared_limit
    ttgir = compiled.asm["ttgir"]
    report.wgmma = "warp_group_dot" in ttgir
    # A descriptor load that became a TMA bulk copy into shared memory.
    report.tma = "ttng.async_tma_copy_global_to_local" in ttgir


def _compiled_kernels(jit_fn) -> dict:
    """Every kernel ``jit_fn`` has compiled so far, by cache key.

    Reads Triton's per-device kernel cache (``device_caches[device][0]``, the
    same in Triton 3.6 and 3.9): a launch does not return what it compiled.
    """
    return {key: kernel for cache in jit_fn.device_caches.values() for key, kernel in cache[0].items()}


# --------------------------------------------------------------------------- #
# The cases: every kernel, every config, through the real launchers
# --------------------------------------------------------------------------- #


def config_name(config: triton.Config) -> str:
    blocks = "-".join(f"{name.removeprefix('BLOCK_')}{value}" for name, value in config.kwargs.items())
    return f"{blocks + '-' if blocks else ''}w{config.num_warps}-s{config.num_stages}"


@dataclass(frozen=True)
class Case:
    kernel: str  # the @triton.jit function's name
    case: str
    jit_fn: object
    configs: list
    launch: Callable[[triton.Config], None]
    # The kernel's own launch parameters when ``configs`` steer another kernel of the launch.
    fixed_config_name: str | None = None


def _attention_inputs(T: int, S: int, D: int, dtype: torch.dtype):
    q = torch.zeros(1, Q_HEADS, T, D, dtype=dtype)
    k = torch.zeros(1, KV_HEADS, S, D, dtype=dtype)
    v = torch.zeros(1, KV_HEADS, S, D, dtype=dtype)
    pos = torch.arange(S, dtype=torch.int64)[None]
    prev = torch.zeros(1, KV_HEADS, D, dtype=dtype)
    return q, k, v, pos, prev


def _paged(inputs):
    """Dense attention inputs as one sequence's pages: ``(q, k_pages, v_pages, pos_pages, prev)``."""
    q, k, v, pos, prev = inputs
    S, D = k.shape[2], k.shape[3]
    pages = S // PAGE_SIZE
    k_pages, v_pages = (x[0, :, : pages * PAGE_SIZE].reshape(KV_HEADS, pages, PAGE_SIZE, D).permute(1, 2, 0, 3)
                        .contiguous() for x in (k, v))
    return q, k_pages, v_pages, pos[0, : pages * PAGE_SIZE].reshape(pages, PAGE_SIZE), prev


def cases(D: int, dtype: torch.dtype) -> Iterator[Case]:
    """The launches that compile every config of every kernel, at Llama-3-8B-like shapes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compiling needs the kernels imported with TRITON_INTERPRET unset: "
                           "use report_in_fresh_process")
    from epikv_triton.ops import attention, compaction, h2o, zscore

    G = Q_HEADS // KV_HEADS
    prefill = _attention_inputs(PREFILL_TOKENS, PREFILL_TOKENS, D, dtype)
    chunk = _attention_inputs(CHUNK_TOKENS, CACHE_SLOTS + CHUNK_TOKENS, D, dtype)
    decode = _attention_inputs(1, CACHE_SLOTS + 1, D, dtype)
    paged_decode = _attention_inputs(1, CACHE_SLOTS + PAGE_SIZE, D, dtype)

    def attend(inputs, **kwargs):
        q, k, v, pos, prev = inputs
        return lambda config: attention.slot_attention(q, k, v, pos, prev_k=prev, prev_v=prev, config=config, **kwargs)

    fwd = attention._attention_fwd_kernel
    assert not attention.uses_decode_space(PREFILL_TOKENS * G) and attention.uses_decode_space(G)
    yield Case(fwd.__name__, f"prefill T={PREFILL_TOKENS}", fwd, attention.PREFILL_CONFIGS, attend(prefill))
    yield Case(fwd.__name__, f"prefill T={PREFILL_TOKENS} +lse", fwd, attention.PREFILL_CONFIGS,
               attend(prefill, return_lse=True))
    chunk_decodes = attention.uses_decode_space(CHUNK_TOKENS * G)
    chunk_space = attention.DECODE_CONFIGS if chunk_decodes else attention.PREFILL_CONFIGS
    yield Case(fwd.__name__, f"chunk T={CHUNK_TOKENS} S={CACHE_SLOTS + CHUNK_TOKENS}", fwd, chunk_space,
               attend(chunk, num_splits=DECODE_SPLITS))
    yield Case(fwd.__name__, f"decode S={CACHE_SLOTS + 1}", fwd, attention.DECODE_CONFIGS, attend(decode, num_splits=1))
    yield Case(fwd.__name__, f"decode S={CACHE_SLOTS + 1} split", fwd, attention.DECODE_CONFIGS,
               attend(decode, num_splits=DECODE_SPLITS))
    # The static-shape step: the whole buffer, its fill read from device memory.
    slot_count = torch.tensor([CACHE_SLOTS // 2], dtype=torch.int32)
    yield Case(fwd.__name__, f"decode S={CACHE_SLOTS + 1} split slot_count", fwd, attention.DECODE_CONFIGS,
               attend(decode, num_splits=DECODE_SPLITS, slot_count=slot_count))
    combine = attention._combine_splits_kernel
    yield Case(combine.__name__, f"decode split={DECODE_SPLITS}", combine, attention.DECODE_CONFIGS[:1],
               attend(decode, num_splits=DECODE_SPLITS), fixed_config_name=f"R{attention.COMBINE_ROWS}-w4")

    # The paged layout (vLLM's default page of 16 slots): the same kernels, slots found through a block table.
    def attend_paged(inputs, T, **kwargs):
        q, k, v, pos, prev = _paged(inputs)
        query_slots = torch.arange(k.shape[0] * PAGE_SIZE - T, k.shape[0] * PAGE_SIZE)[None]
        table = torch.arange(k.shape[0], dtype=torch.int32)[None]
        return lambda config: attention.paged_slot_attention(
            q, k, v, pos, table, query_slots=query_slots, prev_k=prev, prev_v=prev, config=config, **kwargs
        )

    yield Case(fwd.__name__, f"paged prefill T={PREFILL_TOKENS} page={PAGE_SIZE}", fwd, attention.PREFILL_CONFIGS,
               attend_paged(prefill, PREFILL_TOKENS, return_lse=True))
    yield Case(fwd.__name__, f"paged decode S={CACHE_SLOTS + PAGE_SIZE} page={PAGE_SIZE} split slot_count", fwd,
               attention.DECODE_CONFIGS, attend_paged(paged_decode, 1, num_splits=DECODE_SPLITS, slot_count=slot_count))

    lse_prefill = torch.zeros(1, Q_HEADS, PREFILL_TOKENS)
    lse_decode = torch.zeros(1, Q_HEADS, 1)
    columns = h2o._column_sums_kernel
    yield Case(columns.__name__, f"prefill T={PREFILL_TOKENS}", columns, h2o.COLUMN_SUM_CONFIGS,
               lambda config: h2o.attention_column_sums(prefill[0], prefill[1], prefill[3], lse_prefill, config=config))
    yield Case(columns.__name__, f"decode S={CACHE_SLOTS + 1}", columns, h2o.COLUMN_SUM_CONFIGS,
               lambda config: h2o.attention_column_sums(decode[0], decode[1], decode[3], lse_decode, config=config))
    yield Case(columns.__name__, f"decode S={CACHE_SLOTS + 1} slot_count", columns, h2o.COLUMN_SUM_CONFIGS,
               lambda config: h2o.attention_column_sums(decode[0], decode[1], decode[3], lse_decode,
                                                        slot_count=slot_count, config=config))

    paged_q, paged_k, _, paged_pos, _ = _paged(paged_decode)
    paged_table = torch.arange(paged_k.shape[0], dtype=torch.int32)[None]
    paged_slots = torch.tensor([[CACHE_SLOTS + PAGE_SIZE - 1]])
    yield Case(columns.__name__, f"paged decode S={CACHE_SLOTS + PAGE_SIZE} page={PAGE_SIZE} slot_count", columns,
               h2o.COLUMN_SUM_CONFIGS,
               lambda config: h2o.paged_attention_column_sums(paged_q, paged_k, paged_pos, paged_table, lse_decode,
                                                              query_slots=paged_slots, slot_count=slot_count,
                                                              config=config))

    bands, window = 2, 64
    values = torch.zeros(1, bands, 1)
    ring = torch.zeros(1, bands, window)
    count = torch.zeros(1, bands, dtype=torch.int64)
    weights = torch.ones(bands)
    rolling = zscore._rolling_zscore_kernel
    yield Case(rolling.__name__, f"decode NB={bands} W={window}", rolling, zscore.ZSCORE_CONFIGS,
               lambda config: zscore.rolling_zscore(values, ring, count, weights, config=config))

    layers = 2
    kv = torch.zeros(2 * layers, 1, KV_HEADS, CACHE_SLOTS + 1, D, dtype=dtype)
    pos = torch.arange(CACHE_SLOTS + 1, dtype=torch.int64)[None]
    scores = torch.zeros(1, CACHE_SLOTS + 1)
    # Decode's eviction: slot 0 leaves, the newest slot fills its hole.
    destination = torch.zeros(1, 1, dtype=torch.int64)
    compact = compaction._compact_slots_kernel
    yield Case(compact.__name__, f"evict 1 of {CACHE_SLOTS + 1}", compact, compaction.COMPACTION_CONFIGS,
               lambda config: compaction.compact_slots_(kv, pos, scores, destination, config=config))
    # Paged: the same eviction in pages of the pool's layout [P, num_pages, page_size, H, D].
    pages = (CACHE_SLOTS + PAGE_SIZE) // PAGE_SIZE
    kv_pages = torch.zeros(2 * layers, pages, PAGE_SIZE, KV_HEADS, D, dtype=dtype)
    pos_pages = torch.zeros(pages, PAGE_SIZE, dtype=torch.int64)
    scores_pages = torch.zeros(pages, PAGE_SIZE)
    table = torch.arange(pages, dtype=torch.int32)[None]
    paged_destination = torch.zeros(1, PAGE_SIZE, dtype=torch.int64)
    yield Case(compact.__name__, f"paged evict {PAGE_SIZE} of {CACHE_SLOTS + PAGE_SIZE} page={PAGE_SIZE}", compact,
               compaction.COMPACTION_CONFIGS,
               lambda config: compaction.paged_compact_slots_(kv_pages, pos_pages, scores_pages, table,
                                                              paged_destination, config=config))


def compile_all(arch: int, dtype_name: str, head_dim: int, only: str | None = None) -> list[ConfigReport]:
    """Compile every config of every case for ``sm_{arch}``; one report per compiled config."""
    dtype = DTYPES[dtype_name]
    reports = []
    all_cases = list(cases(head_dim, dtype))
    # A JIT function binds its target on first use: forget it when the target changes.
    for case in all_cases:
        case.jit_fn.device_caches.clear()
    # Restored as found (reset_active() would look for a real GPU driver and fail).
    previous_driver = triton.runtime.driver._active
    triton.runtime.driver.set_active(StandInDriver(arch))
    try:
        for case in all_cases:
            if only is not None and only not in case.kernel:
                continue
            case.jit_fn.device_caches.clear()  # an earlier case may have compiled the same specialisation
            for config in case.configs:
                name = case.fixed_config_name or config_name(config)
                report = ConfigReport(case.kernel, case.case, name, arch, dtype_name, head_dim)
                before = _compiled_kernels(case.jit_fn)
                try:
                    case.launch(config)
                    new = [kernel for key, kernel in _compiled_kernels(case.jit_fn).items() if key not in before]
                    if len(new) != 1:
                        raise RuntimeError(f"expected one new compiled kernel, got {len(new)}")
                    _read_kernel(new[0], report)
                except Exception as error:  # reported per config, the walk goes on
                    report.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                reports.append(report)
    finally:
        triton.runtime.driver.set_active(previous_driver)
        for case in all_cases:
            case.jit_fn.device_caches.clear()
    return reports


def report_in_fresh_process(arch: int, dtype_name: str, head_dim: int, timeout_s: float = 600.0) -> list[dict]:
    """:func:`compile_all`'s reports as plain dicts (the command line's JSON rows), from a new Python
    process with the interpreter off: for callers (tests, the perf suite) whose own process imported
    the kernels under ``TRITON_INTERPRET=1``."""
    command = [
        sys.executable, "-m", __spec__.name, "--arch", str(arch), "--dtype", dtype_name, "--head-dim", str(head_dim)
    ]
    done = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the static report failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    parser.add_argument("--head-dim", type=int, action="append")
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    parser.add_argument("--json", type=pathlib.Path, help="also write the reports here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any config fails to compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reports = [
        asdict(report)
        for arch in args.arch or [90]
        for dtype_name in args.dtype or ["bf16"]
        for head_dim in args.head_dim or [128]
        for report in compile_all(arch, dtype_name, head_dim, args.kernel)
    ]
    text = json.dumps(reports, indent=1)
    if args.json is not None:
        args.json.write_text(text)
    print(text)
    failed = [r for r in reports if r["error"] is not None]
    for r in failed:
        print(f"FAILED {r['kernel']} [{r['case']}] {r['config']} sm_{r['arch']}: {r['error']}", file=sys.stderr)
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
