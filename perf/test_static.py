"""The ``static`` group: what every kernel config compiles to on Hopper and Ampere, no GPU needed.

``pytest perf/ --benchmark -k static`` compiles every config of every kernel
(attention prefill, chunked prefill and decode with its split combine, H2O
column sums, z-score, compaction) for sm_90 and sm_80, bf16 and fp16,
head_dim 128 and 64, through the real launchers (:mod:`epikv_triton.ops.static_report`),
and records per config: registers per thread, stack bytes (spills), shared
memory against the target's per-block limit, whether the dots lower to
Hopper wgmma and the loads to TMA. The rows also go to ``--static-json``
(default ``perf-static.json``). Each target is compiled in its own process,
two at a time: a few minutes on two CPU cores with a cold Triton cache.
"""

from __future__ import annotations

import json
import pathlib
from concurrent.futures import ThreadPoolExecutor

from epikv_triton.ops.static_report import report_in_fresh_process

TARGETS = [(arch, dtype, head_dim) for arch in (90, 80) for dtype in ("bf16", "fp16") for head_dim in (128, 64)]
PARALLEL_PROCESSES = 2


def test_static_report(record, request):
    with ThreadPoolExecutor(max_workers=PARALLEL_PROCESSES) as pool:
        reports = list(pool.map(lambda target: report_in_fresh_process(*target), TARGETS))
    rows = [row for report in reports for row in report]
    pathlib.Path(request.config.getoption("--static-json")).write_text(json.dumps(rows, indent=1))
    for row in rows:
        record(
            "static",
            kernel=row["kernel"].strip("_").removesuffix("_kernel"),
            case=row["case"],
            config=row["config"],
            target=f"sm_{row['arch']} {row['dtype']} D={row['head_dim']}",
            registers=row["registers"],
            stack_bytes=row["stack_bytes"],
            shared_KiB=None if row["shared_bytes"] is None else round(row["shared_bytes"] / 1024, 1),
            fits_shared=row["fits_shared"],
            wgmma=row["wgmma"],
            tma=row["tma"],
            error=row["error"] or "",
        )
    failed = [row for row in rows if row["error"] is not None]
    assert not failed, f"{len(failed)} configs failed to compile; see the table's error column"
