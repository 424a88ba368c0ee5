"""Tensor parallelism: a model sharded by transformers over two CPU ranks (gloo), patched on each rank, against the
single-process run of the same weights.

One spawn runs every family and evicting method on both ranks (process start and the transformers import cost
seconds; one spawn per case would cost minutes) and saves what each rank saw; the tests compare. The ops run
their PyTorch twins here, on the ranks and in the reference runs alike: this file tests the integration, the
kernels have their own tests, and the Triton interpreter would make the runs minutes long.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, CompileConfig

import epikv_triton
from epikv_triton.scoring import evicting_methods
from tests.methods import settings

from .models import CACHE, prompts, tiny_model

FAMILIES = ("llama", "qwen2-sliding", "qwen3")
SEED = 1  # weights whose greedy output is varied in every family (checked below)
#: The family loaded with the older ``from_pretrained(..., tp_plan="auto")``; the others with ``distributed_config``.
LEGACY_KEYWORD_FAMILY = "qwen3"
RANKS = 2
BUDGET = 24  # the 12-token prompt plus the recent window (6) fit; 30 new tokens evict at every step from the 13th
NEW_TOKENS = 30
BATCH = 2  # the second prompt left-padded
#: Seconds the two ranks may take together (about 15 on two busy cores).
SPAWN_TIMEOUT = 300
#: Runs with a value reserve, whose value norms are a maximum over every KV head: each rank holds half of them.
#: ``streaming`` makes the reserve decide (its own scores are positions); ``tova`` is the default method.
RESERVE_CASES = {
    "streaming+reserve": dict(method="streaming", value_reserve=6),
    "tova+reserve": dict(method="tova", value_reserve=6),
}

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build"),
    pytest.mark.skipif(dist.is_available() and not dist.is_gloo_available(), reason="torch has no gloo backend"),
]


def generate(model: torch.nn.Module, **kwargs) -> object:
    """Greedy generation of ``NEW_TOKENS`` from the tests' prompts, as a ``generate`` output record."""
    return model.generate(
        **prompts(BATCH), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        **kwargs,
    )


def run_methods(model: torch.nn.Module) -> dict:
    """The unpatched tokens, then per evicting method what the patched model generated and kept."""
    results = {"unpatched": generate(model).sequences}
    cases = {method: settings(method) for method in evicting_methods()} | RESERVE_CASES
    for method, case_settings in cases.items():
        epikv_triton.patch(model, budget=BUDGET, **case_settings)
        output = generate(model)
        cache = getattr(output, CACHE)
        stats = cache.stats()
        results[method] = dict(
            tokens=output.sequences, kept=cache.kept_positions(), kv_bytes=[s.kv_bytes for s in stats.sequences],
            capacity=stats.capacity, evictions=stats.eviction_passes, collective_bytes=stats.collective_bytes,
        )
        epikv_triton.unpatch(model)
    return results


def load_tensor_parallel(folder: Path, legacy_keyword: bool) -> torch.nn.Module:
    """``folder``'s model sharded over the ranks by transformers, with either loading keyword."""
    if legacy_keyword:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "pass it in distributed_config" (5.23 and later)
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, tp_plan="auto").eval()
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(tp_plan="auto")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, distributed_config=config).eval()


def run_rank(rank: int, port: int, folder: Path) -> None:
    """One rank: the environment ``torchrun`` would give it, then every family and method; saves its results."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        EPIKV_BACKEND="torch",
    )
    torch.set_num_threads(1)
    results = {}
    for family in FAMILIES:
        model = load_tensor_parallel(folder / family, legacy_keyword=family == LEGACY_KEYWORD_FAMILY)
        results[family] = run_methods(model)
        epikv_triton.patch(model, budget=BUDGET)
        try:
            generate(model, compile_config=CompileConfig())
        except NotImplementedError as error:
            results[family]["compile_refusal"] = str(error)
    torch.save(results, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_ranks(folder: Path) -> list[dict]:
    """:func:`run_rank` on ``RANKS`` fresh processes, bounded by ``SPAWN_TIMEOUT``; each rank's results."""
    context = mp.start_processes(run_rank, args=(free_port(), folder), nprocs=RANKS, join=False, start_method="spawn")
    try:
        for _ in range(SPAWN_TIMEOUT):
            if context.join(timeout=1):  # raises with the rank's traceback when one failed
                break
        else:
            pytest.fail(f"the {RANKS} tensor-parallel ranks did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(RANKS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """``(single, ranks)``: per family, :func:`run_methods` on one process, and what each rank saved."""
    pytest.importorskip("accelerate", reason="transformers loads a model tensor-parallel only with accelerate")
    folder = tmp_path_factory.mktemp("tensor_parallel")
    single = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EPIKV_BACKEND", "torch")
        for family in FAMILIES:
            tiny_model(family, seed=SEED).save_pretrained(folder / family)
            model = AutoModelForCausalLM.from_pretrained(folder / family, dtype=torch.float32).eval()
            single[family] = run_methods(model)
    return single, spawn_ranks(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_model_generates_the_single_process_tokens(runs, family):
    """The premise of the comparisons below: unpatched, sharding changes no greedy token, and they are varied."""
    single, ranks = runs
    tokens = single[family]["unpatched"]
    assert all(torch.equal(rank[family]["unpatched"], tokens) for rank in ranks)
    for row in tokens[:, -NEW_TOKENS:]:
        assert len(set(row.tolist())) >= NEW_TOKENS // 3, "degenerate greedy output: the comparison would be weak"


@pytest.mark.parametrize("method", evicting_methods())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_rank_keeps_the_single_process_tokens(runs, family, method):
    single, ranks = runs
    expected = single[family][method]
    assert expected["evictions"] > 0 and expected["collective_bytes"] == 0
    for rank in ranks:
        got = rank[family][method]
        assert got["kept"] == expected["kept"]
        assert torch.equal(got["tokens"], expected["tokens"])
        assert got["capacity"] == expected["capacity"]
        assert got["evictions"] == expected["evictions"]
        # Each rank holds half the KV heads: half the KV bytes.
        assert [2 * n for n in got["kv_bytes"]] == expected["kv_bytes"]


@pytest.mark.parametrize("case", RESERVE_CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_value_reserve_keeps_the_single_process_tokens(runs, family, case):
    """The reserve's value norms are a maximum over the KV heads, which the ranks split: exchanged, every rank
    reserves the single process's tokens."""
    single, ranks = runs
    expected = single[family][case]
    if case == "streaming+reserve":  # the reserve decides something the scores alone would not
        assert expected["kept"] != single[family]["streaming"]["kept"]
    for rank in ranks:
        assert rank[family][case]["kept"] == expected["kept"]
        assert torch.equal(rank[family][case]["tokens"], expected["tokens"])
    got = ranks[0][family][case]
    per_eviction = (RANKS - 1) * BATCH * (BUDGET + 1) * 4
    assert got["collective_bytes"] == 2 * got["evictions"] * per_eviction  # the scores, then the value norms


@pytest.mark.parametrize("method", evicting_methods())
def test_collective_bytes_are_the_documented_ones(runs, method):
    """Per eviction, every slot's score from each other rank; for ``kv``, also each chunk's two band values."""
    _, ranks = runs
    got = ranks[0]["llama"][method]
    per_eviction = (RANKS - 1) * BATCH * (BUDGET + 1) * 4  # evict_every = 1: BUDGET + 1 slots in use
    per_chunk = (RANKS - 1) * BATCH * 2 * (prompts(BATCH)["input_ids"].shape[1] + NEW_TOKENS - 1) * 4
    assert got["collective_bytes"] == got["evictions"] * per_eviction + (per_chunk if method == "kv" else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decoding_is_refused_under_tensor_parallelism(runs, family):
    _, ranks = runs
    for rank in ranks:
        assert "compile_config" in rank[family].get("compile_refusal", "")


def split_by_device_map(model: torch.nn.Module) -> None:
    """What ``from_pretrained(device_map=...)`` records for layers on two GPUs."""
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1}


def split_parameters(model: torch.nn.Module) -> None:
    """Parameters on two devices without a device map (a hand-placed or offloaded layer)."""
    model.model.layers[2].to("meta")


@pytest.mark.parametrize("place", [split_by_device_map, split_parameters])
def test_a_model_placed_on_several_devices_is_refused(place):
    model = tiny_model("llama")
    place(model)
    with pytest.raises(NotImplementedError, match="several devices"):
        epikv_triton.patch(model, budget=BUDGET)
    assert epikv_triton.integrations.state.state_of(model) is None  # left as it was
