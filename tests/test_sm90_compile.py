"""Every Triton kernel config compiles for Hopper (sm_90), checked on any machine.

Triton compiles for a GPU it does not have (see :mod:`epikv_triton.ops.static_report`):
every config of every kernel is built through the project's launchers at a
Llama-3-8B-shaped layer, bf16, head_dim 128, so a config that cannot build —
or needs more shared memory than an H100 block has — fails here rather than
on a user's GPU. Attention and the H2O column sums must also be free of
register spills, and prefill attention must run wgmma on TMA-loaded tiles. The
paged variants compile from the same kernels (cases named "paged ..."): no spills
either, and wgmma on pointer-loaded tiles for paged prefill.
About 30 s on two CPU cores with a cold Triton cache.
"""

from __future__ import annotations

import pytest

from epikv_triton.ops.static_report import report_in_fresh_process

SPILL_FREE_KERNELS = ("_attention_fwd_kernel", "_combine_splits_kernel", "_column_sums_kernel")


@pytest.fixture(scope="module")
def sm90_report() -> list[dict]:
    return report_in_fresh_process(90, "bf16", 128)


def describe(row: dict) -> str:
    return f"{row['kernel']} [{row['case']}] {row['config']}"


def test_every_config_compiles_for_sm90(sm90_report):
    kernels = {row["kernel"] for row in sm90_report}
    assert {"_attention_fwd_kernel", "_combine_splits_kernel", "_column_sums_kernel",
            "_rolling_zscore_kernel", "_compact_slots_kernel"} <= kernels
    failed = [f"{describe(row)}: {row['error']}" for row in sm90_report if row["error"] is not None]
    assert not failed, "configs that do not compile for sm_90:\n" + "\n".join(failed)
    too_big = [describe(row) for row in sm90_report if not row["fits_shared"]]
    assert not too_big, f"configs above the H100's shared memory: {too_big}"


def test_attention_and_column_sums_never_spill_on_sm90(sm90_report):
    spilling = [
        f"{describe(row)}: {row['stack_bytes']} B of stack"
        for row in sm90_report
        if row["kernel"] in SPILL_FREE_KERNELS and row["error"] is None and row["stack_bytes"] != 0
    ]
    assert not spilling, "register spills on sm_90:\n" + "\n".join(spilling)


def test_prefill_attention_uses_wgmma_and_tma_on_sm90(sm90_report):
    """Prefill and chunks above the decode rows: wgmma dots on K/V tiles that TMA copies into shared
    memory; decode keeps the pointer loads (see ``attention.uses_tensor_descriptors``)."""
    attention = [row for row in sm90_report if row["kernel"] == "_attention_fwd_kernel" and "paged" not in row["case"]]
    prefill = [row for row in attention if not row["case"].startswith("decode")]
    decode = [row for row in attention if row["case"].startswith("decode")]
    assert prefill and all(row["wgmma"] for row in prefill), [describe(r) for r in prefill if not r["wgmma"]]
    assert all(row["tma"] for row in prefill), [describe(r) for r in prefill if not r["tma"]]
    assert decode and not any(row["tma"] for row in decode), [describe(r) for r in decode if r["tma"]]


def test_paged_variants_compile_for_sm90(sm90_report):
    """Every kernel with a paged variant has paged cases; a key tile spans pages, so paged K/V never go
    through TMA, and paged prefill still runs wgmma."""
    paged = [row for row in sm90_report if "paged" in row["case"]]
    assert {row["kernel"] for row in paged} == {"_attention_fwd_kernel", "_column_sums_kernel", "_compact_slots_kernel"}
    assert not any(row["tma"] for row in paged), [describe(r) for r in paged if r["tma"]]
    prefill = [row for row in paged if row["kernel"] == "_attention_fwd_kernel" and "prefill" in row["case"]]
    assert prefill and all(row["wgmma"] for row in prefill), [describe(r) for r in prefill if not r["wgmma"]]
