"""The paged ops against their twins and against the dense ops on the same data.

A dense cache (``k``, ``v [B, Hkv, S, D]``, ``pos``, ``scores [B, S]``) is
scattered here, independently of ``ops.pages``, into pools of odd page sizes
(3, 5, 16) in a shuffled page order, with pages nobody names holding stale
data, block tables that are strided views with ``-1`` past each sequence's
pages. The paged kernels must match the paged twins, and the dense kernels
over the dense cache (extended with the empty slots of the unallocated pages).
Every Triton call runs with ``torch.empty`` poisoned (NaN-filled). Shapes stay
small: on CPU the kernels run in Triton's interpreter.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from epikv_triton import ops
from epikv_triton.ops import _library, attention, compaction, h2o, naive, pages, selection
from tests.helpers import assert_close_rms, cache_positions, device, poisoning_runner, randn

from .test_compile import assert_one_graph_equal_to_eager, backend  # noqa: F401 (backend: a fixture used here)

# --------------------------------------------------------------------------- #
# A dense cache scattered into pages
# --------------------------------------------------------------------------- #


class Paged(NamedTuple):
    block_table: torch.Tensor  # [B, max_pages], a strided view, -1 past each sequence's pages
    used_pages: list[int]      # pages named per sequence
    num_pages: int


def page_layout(B, used_pages, spare_columns, spare_pages, generator) -> Paged:
    """A shuffled page assignment: sequence ``b`` owns ``used_pages[b]`` distinct pages, in a random order
    of the pool, with ``spare_pages`` pages nobody names; the table is a strided view of a wider one."""
    max_pages = max(used_pages) + spare_columns
    num_pages = sum(used_pages) + spare_pages
    order = torch.randperm(num_pages, generator=generator)
    wide = torch.full((B, 2 * max_pages), 999, dtype=torch.int32)
    table = wide[:, ::2]
    table.fill_(-1)
    taken = 0
    for b, count in enumerate(used_pages):
        table[b, :count] = order[taken : taken + count]
        taken += count
    assert not table.is_contiguous()
    return Paged(table.to(device()), list(used_pages), num_pages)


def scatter_to_pages(dense, paged: Paged, page_size, stale, generator):
    """``dense [B, S, *rest]`` into a fresh pool ``[num_pages, page_size, *rest]``: logical slot ``s`` of
    sequence ``b`` at page ``table[b, s // page_size]``, offset ``s % page_size``, written slot by slot.
    Slots no sequence names hold ``stale`` (a callable of a shape)."""
    B, S = dense.shape[:2]
    pool = stale((paged.num_pages, page_size, *dense.shape[2:]), generator).to(dense.dtype)
    table = paged.block_table.cpu()
    for b in range(B):
        for s in range(S):
            pool[int(table[b, s // page_size]), s % page_size] = dense[b, s].cpu()
    return pool.to(device())


def stale_floats(shape, generator):
    return torch.randn(shape, generator=generator)


def stale_positions(shape, generator):
    """Real-looking positions: a stray read of an unnamed page would make them visible."""
    return torch.randint(0, 50, shape, generator=generator)


def extend_slots(x, width, fill):
    """``x [B, S, *rest]`` with ``fill`` slots appended up to ``width``: the dense image of a paged cache
    whose table has columns past a sequence's pages (their slots are empty)."""
    pad = torch.full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def paged_inputs(k, v, pos, page_size, generator, *, spare_columns=1, spare_pages=3, pool_padding=0):
    """The pools and table of a dense cache whose sequences use every one of their slots: ``(k_pages,
    v_pages, pos_pages, paged, dense)`` with ``dense = (k, v, pos)`` over the table's logical slots.
    ``pool_padding`` pads the head dim of the K/V storage, so the pools are strided views."""
    B, _, S, D = k.shape
    used = -(-S // page_size)
    paged = page_layout(B, [used] * B, spare_columns, spare_pages, generator)
    width = paged.block_table.shape[1] * page_size
    # The last named page's slots past S are empty: position -1, finite K/V.
    pos = extend_slots(pos, width, -1)
    k, v = (extend_slots(x.transpose(1, 2), width, 0.0).transpose(1, 2) for x in (k, v))
    pools = []
    for x in (k, v):
        values = x.transpose(1, 2)[:, : used * page_size]
        if pool_padding:
            values = torch.cat([values, torch.zeros(*values.shape[:3], pool_padding, dtype=x.dtype,
                                                    device=x.device)], dim=3)
        pool = scatter_to_pages(values, paged, page_size, stale_floats, generator)
        pools.append(pool[..., :D] if pool_padding else pool)
    pos_pages = scatter_to_pages(pos[:, : used * page_size], paged, page_size, stale_positions, generator)
    return pools[0], pools[1], pos_pages, paged, (k, v, pos)


def qkv(B, Hq, Hkv, T, S, D, dtype):
    return randn(B, Hq, T, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype)


def last_slots(B, T, S):
    return torch.arange(S - T, S, device=device()).expand(B, T)


# --------------------------------------------------------------------------- #
# Attention and H2O column sums
# --------------------------------------------------------------------------- #


@pytest.fixture
def poisoned(monkeypatch):
    """The launchers with every float ``torch.empty`` NaN-filled."""
    return {
        "attention": poisoning_runner(monkeypatch, attention.paged_slot_attention),
        "dense attention": poisoning_runner(monkeypatch, attention.slot_attention),
        "column sums": poisoning_runner(monkeypatch, h2o.paged_attention_column_sums),
        "dense column sums": poisoning_runner(monkeypatch, h2o.attention_column_sums),
    }


def compare_results(got, want, dtype, what):
    for name in ("out", "dk", "dv", "lse"):
        mine, ref = getattr(got, name), getattr(want, name)
        assert (mine is None) == (ref is None), f"{what}: {name}"
        if ref is not None:
            assert_close_rms(mine, ref, dtype if name in ("out", "lse") else torch.float32, f"{what}: {name}")


def check_attention(poisoned, q, k_pages, v_pages, pos_pages, table, dense, **kwargs):
    """Paged kernel against the paged twin and against the dense kernel on the dense cache."""
    got = poisoned["attention"](q, k_pages, v_pages, pos_pages, table, **kwargs)
    launch = {n: a for n, a in kwargs.items() if n != "config"}
    twin = naive.paged_slot_attention(q, k_pages, v_pages, pos_pages, table, **launch)
    compare_results(got, twin, q.dtype, "paged kernel vs paged twin")
    dense_got = poisoned["dense attention"](q, *dense, **launch)
    compare_results(got, dense_got, q.dtype, "paged kernel vs dense kernel")
    return got


# (page size, cache slots C, new tokens T, window, dtype): decode, chunk and prefill-like chunks.
ATTENTION_CASES = [
    (3, 40, 1, None, torch.float32),
    (5, 33, 20, 12, torch.bfloat16),
    (16, 30, 41, None, torch.float16),
    (16, 0, 37, 9, torch.float32),
]


@pytest.mark.parametrize("page_size, C, T, window, dtype", ATTENTION_CASES)
def test_paged_attention_matches_twin_and_dense(poisoned, page_size, C, T, window, dtype):
    """Shuffled cache slots with holes, a left-padded sequence, the new tokens last in logical order;
    deltas against ``prev_k``, the lse returned; the pools are strided views in one case."""
    generator = torch.Generator().manual_seed(page_size + C + T)
    torch.manual_seed(page_size + C + T)
    B, Hq, Hkv, D = 2, 4, 2, 32
    S = C + T
    q, k, v = qkv(B, Hq, Hkv, T, S, D, dtype)
    pos = cache_positions(B, C, T, seen=C + 10, holes=3, pad=(0, 4)) if C else torch.arange(T).repeat(B, 1)
    k_pages, v_pages, pos_pages, paged, dense = paged_inputs(
        k, v, pos.to(device()), page_size, generator, pool_padding=8 if page_size == 5 else 0
    )
    prev = randn(B, Hkv, 1, D, dtype=dtype)[:, :, 0]
    check_attention(
        poisoned, q, k_pages, v_pages, pos_pages, paged.block_table, dense, query_slots=last_slots(B, T, S),
        window=window, prev_k=prev, prev_v=prev, return_lse=True,
    )


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_attention_any_query_slots_and_slot_count(poisoned, num_splits):
    """New tokens in shuffled logical slots, ``slot_count`` hiding stale slots inside named pages, a
    table column of -1 in the middle of sequence 1 (a page never allocated) and an entry past the pool
    (no page either): the twin, the dense kernel and the kernel agree, split or not."""
    generator = torch.Generator().manual_seed(30 + num_splits)
    torch.manual_seed(30 + num_splits)
    B, Hq, Hkv, D, T, page_size = 2, 8, 2, 16, 3, 5
    S = 160
    q, k, v = qkv(B, Hq, Hkv, T, S, D, torch.float32)
    pos = torch.stack([torch.randperm(S) for _ in range(B)]).to(device())
    pos[:, :7] = -1
    query_slots = torch.stack([torch.randperm(90)[:T] for _ in range(B)]).to(device())
    pos.scatter_(1, query_slots, torch.arange(S, S + T, device=device()).expand(B, T))
    slot_count = torch.tensor([120, 100], device=device())  # the slots past it hold real-looking positions
    k_pages, v_pages, pos_pages, paged, dense = paged_inputs(k, v, pos, page_size, generator)
    table = paged.block_table
    table[1, 4] = -1
    table[1, 9] = paged.num_pages + 7
    k, v, pos = dense
    for column in (4, 9):
        pos[1, column * page_size : (column + 1) * page_size] = -1
        k[1, :, column * page_size : (column + 1) * page_size] = 0
        v[1, :, column * page_size : (column + 1) * page_size] = 0
    check_attention(
        poisoned, q, k_pages, v_pages, pos_pages, table, (k, v, pos), query_slots=query_slots,
        slot_count=slot_count, num_splits=num_splits, return_lse=True,
    )


@pytest.mark.parametrize(
    "config", [attention.DECODE_CONFIGS[0], attention.DECODE_CONFIGS[2], attention.PREFILL_CONFIGS[0],
               attention.PREFILL_CONFIGS[-1]],
    ids=lambda c: f"M{c.kwargs['BLOCK_M']}-N{c.kwargs['BLOCK_N']}",
)
def test_paged_attention_explicit_configs(poisoned, config):
    """Decode and prefill tile shapes over 3-slot pages: every key tile spans many pages."""
    generator = torch.Generator().manual_seed(40)
    torch.manual_seed(40)
    decode = config.kwargs["BLOCK_M"] == 16
    B, Hq, Hkv, D, C = 1, 4, 2, 32, 61
    T = 1 if decode else 20
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.float16)
    pos = cache_positions(B, C, T, seen=C + 5, holes=4)
    k_pages, v_pages, pos_pages, paged, dense = paged_inputs(k, v, pos, 3, generator)
    check_attention(
        poisoned, q, k_pages, v_pages, pos_pages, paged.block_table, dense, query_slots=last_slots(B, T, C + T),
        prev_k=k[:, :, 0], return_lse=True, config=config, num_splits=2 if decode else 1,
    )


@pytest.mark.parametrize("page_size, T, window", [(3, 1, None), (5, 23, 10), (16, 40, None)])
def test_paged_column_sums_match_twin_and_dense(poisoned, page_size, T, window):
    generator = torch.Generator().manual_seed(50 + T)
    torch.manual_seed(50 + T)
    B, Hq, Hkv, D, C = 2, 4, 2, 32, 37
    q, k, v = qkv(B, Hq, Hkv, T, C + T, D, torch.bfloat16)
    pos = cache_positions(B, C, T, seen=C + 6, holes=2, pad=(0, 5))
    k_pages, v_pages, pos_pages, paged, (dense_k, _, dense_pos) = paged_inputs(k, v, pos, page_size, generator)
    query_slots = last_slots(B, T, C + T)
    lse = naive.paged_slot_attention(
        q, k_pages, v_pages, pos_pages, paged.block_table, query_slots=query_slots, window=window, return_lse=True
    ).lse
    kwargs = dict(query_slots=query_slots, window=window)
    got = poisoned["column sums"](q, k_pages, pos_pages, paged.block_table, lse, **kwargs)
    twin = naive.paged_attention_column_sums(q, k_pages, pos_pages, paged.block_table, lse, **kwargs)
    dense = poisoned["dense column sums"](q, dense_k, dense_pos, lse, **kwargs)
    S = paged.block_table.shape[1] * page_size
    assert got.shape == (B, Hkv, S) and got.dtype == torch.float32
    for what, want in (("paged twin", twin), ("dense kernel", dense)):
        assert bool(torch.isfinite(got).all()), "a slot left unwritten"
        error = torch.sqrt(torch.mean((got - want) ** 2)) / torch.sqrt(torch.mean(want**2))
        assert error <= 1e-4, f"column sums vs {what}: relative RMS error {float(error):.3g}"
    assert bool((got[:, :, C + T :] == 0).all()), "slots in no page (or past the tokens) must get 0"


# --------------------------------------------------------------------------- #
# Compaction and eviction
# --------------------------------------------------------------------------- #


def paged_cache_state(B, S, page_size, generator, planes=3, H=2, D=8, dtype=torch.float16, interleaved=False):
    """A random dense cache ``(kv [P, B, H, S, D], pos, scores)`` and its pages ``(kv_pages [P, num_pages,
    page_size, H, D], pos_pages, scores_pages, paged)``. ``interleaved``: the K/V pools are transformers'
    layout, one page of every plane after another in one buffer (planes a stride apart inside a page)."""
    kv = torch.randn(planes, B, H, S, D, generator=generator).to(dtype).to(device())
    pos = torch.stack([torch.randperm(3 * S, generator=generator)[:S] for _ in range(B)]).to(device())
    pos[:, -3:] = -1
    scores = torch.randn(B, S, generator=generator).to(device())
    used = -(-S // page_size)
    paged = page_layout(B, [used] * B, 1, 4, generator)
    # The last page's slots past S are empty (position -1, score NaN, finite K/V).
    values = extend_slots(kv.permute(1, 3, 0, 2, 4), used * page_size, 0.0)  # [B, S', P, H, D]
    pool = scatter_to_pages(values, paged, page_size, stale_floats, generator)  # [N, page, P, H, D]
    if interleaved:
        buffer = torch.empty(paged.num_pages, planes, page_size, H, D, dtype=dtype, device=device())
        kv_pages = buffer.permute(1, 0, 2, 3, 4)
        kv_pages.copy_(pool.permute(2, 0, 1, 3, 4))
    else:
        kv_pages = pool.permute(2, 0, 1, 3, 4).contiguous()
    pos_pages = scatter_to_pages(extend_slots(pos, used * page_size, -1), paged, page_size, stale_positions, generator)
    scores_pages = scatter_to_pages(
        extend_slots(scores, used * page_size, float("nan")), paged, page_size, stale_floats, generator
    )
    return (kv, pos, scores), (kv_pages, pos_pages, scores_pages, paged)


def dense_image(kv_pages, pos_pages, scores_pages, table, S):
    """The first ``S`` logical slots of every sequence, read slot by slot (independently of ``ops.pages``)."""
    B, page_size = table.shape[0], kv_pages.shape[2]
    kv = torch.stack([
        torch.stack([kv_pages[:, int(table[b, s // page_size]), s % page_size] for s in range(S)], dim=2)
        for b in range(B)
    ], dim=1)
    pos = torch.tensor([[int(pos_pages[int(table[b, s // page_size]), s % page_size]) for s in range(S)]
                        for b in range(B)], device=pos_pages.device)
    scores = torch.stack([torch.stack([scores_pages[int(table[b, s // page_size]), s % page_size] for s in range(S)])
                          for b in range(B)])
    return kv, pos, scores


def unnamed_pages(paged):
    named = set(paged.block_table[paged.block_table >= 0].tolist())
    return [p for p in range(paged.num_pages) if p not in named]


def clone_all(*xs):
    return [x.clone() if x.is_contiguous() else x.permute(1, 0, 2, 3, 4).clone().permute(1, 0, 2, 3, 4) for x in xs]


@pytest.mark.parametrize("interleaved", [False, True], ids=["plane-major", "transformers-layout"])
@pytest.mark.parametrize("page_size, S, fill", [(3, 31, 13), (5, 40, 20), (16, 45, 17)])
def test_paged_compaction_matches_twin_and_dense(page_size, S, fill, interleaved):
    """Kernel and twin, bit for bit, over the whole pools: moved slots land in the lowest pages, stale
    pages nobody names are untouched, and the dense op on the same cache gives the same slots."""
    generator = torch.Generator().manual_seed(page_size + S)
    B = 2
    (kv, pos, scores), (kv_pages, pos_pages, scores_pages, paged) = paged_cache_state(
        B, S, page_size, generator, interleaved=interleaved
    )
    table = paged.block_table
    width = table.shape[1] * page_size
    keep = selection.select_slots(extend_slots(scores, width, float("nan")), extend_slots(pos, width, -1),
                                  fill, protect_prefix=2, recent=2)
    destination = selection.compaction_plan(keep, fill)
    assert bool((destination >= 0).any()), "test setup: something must move"

    kernel_state = clone_all(kv_pages, pos_pages, scores_pages)
    twin_state = clone_all(kv_pages, pos_pages, scores_pages)
    compaction.paged_compact_slots_(*kernel_state, table, destination)
    naive.paged_compact_slots_(*twin_state, table, destination)
    assert torch.equal(kernel_state[0], twin_state[0]) and torch.equal(kernel_state[1], twin_state[1])
    torch.testing.assert_close(kernel_state[2], twin_state[2], rtol=0, atol=0, equal_nan=True)
    spare = unnamed_pages(paged)
    assert torch.equal(kernel_state[0][:, spare], kv_pages[:, spare]) and torch.equal(
        kernel_state[1][spare], pos_pages[spare]
    ), "a page nobody names was written"

    dense_kv, dense_pos, dense_scores = (extend_slots(x, width, f) for x, f in (
        (kv.permute(1, 3, 0, 2, 4), 0.0), (pos, -1), (scores, float("nan"))))
    dense_kv = dense_kv.permute(2, 0, 3, 1, 4).contiguous()
    compaction.compact_slots_(dense_kv, dense_pos, dense_scores, destination)
    got_kv, got_pos, got_scores = dense_image(*kernel_state, table, S)
    assert torch.equal(got_pos, dense_pos[:, :S])
    torch.testing.assert_close(got_scores, dense_scores[:, :S], rtol=0, atol=0, equal_nan=True)
    kept = got_pos >= 0
    for b in range(B):
        assert torch.equal(got_kv[:, b][:, :, kept[b]], dense_kv[:, b, :, :S][:, :, kept[b]])
    assert not bool(kept[:, fill:].any()), "a kept slot above the new fill"


def test_paged_compaction_every_config_and_bad_pages():
    """Every GPU config, with moves into a page that does not exist (-1, past the pool) dropped as the
    twin drops them, and the freed entries returned by the public op."""
    generator = torch.Generator().manual_seed(61)
    B, S, page_size, fill = 2, 38, 5, 16
    (_, pos, scores), (kv_pages, pos_pages, scores_pages, paged) = paged_cache_state(B, S, page_size, generator)
    table = paged.block_table
    keep = selection.select_slots(extend_slots(scores, 45, float("nan")), extend_slots(pos, 45, -1), fill,
                                  protect_prefix=1, recent=1)
    destination = selection.compaction_plan(keep, fill)
    broken = table.clone()
    broken[0, 1] = -1  # holes of sequence 0 in slots 5..9 have no page: those moves are dropped
    broken[1, 3] = paged.num_pages + 2  # past the pool: sequence 1's slots 15..19 (a hole, movers) have no page
    twin_state = clone_all(kv_pages, pos_pages, scores_pages)
    naive.paged_compact_slots_(*twin_state, broken, destination)
    for config in compaction.COMPACTION_CONFIGS:
        kernel_state = clone_all(kv_pages, pos_pages, scores_pages)
        compaction.paged_compact_slots_(*kernel_state, broken, destination, config=config)
        assert torch.equal(kernel_state[0], twin_state[0]), config
        assert torch.equal(kernel_state[1], twin_state[1]), config
    kernel_state = clone_all(kv_pages, pos_pages, scores_pages)
    freed = ops.paged_compact_slots_(*kernel_state, table, destination)
    assert torch.equal(freed, table[:, -(-fill // page_size) :])


@pytest.mark.parametrize("page_size", [3, 16])
def test_paged_evict_matches_dense_evict(page_size):
    """``paged_evict_`` equals ``evict_`` on the same cache: the same plan, the same kept slots with their
    K/V, positions and scores, and the freed entries are the table's columns past the kept pages."""
    generator = torch.Generator().manual_seed(70 + page_size)
    B, S, budget = 3, 40, 19
    (kv, pos, scores), (kv_pages, pos_pages, scores_pages, paged) = paged_cache_state(
        B, S, page_size, generator, planes=4
    )
    table = paged.block_table
    width = table.shape[1] * page_size
    dense_kv = extend_slots(kv.permute(1, 3, 0, 2, 4), width, 0.0).permute(2, 0, 3, 1, 4).contiguous()
    dense_pos, dense_scores = extend_slots(pos, width, -1), extend_slots(scores, width, float("nan"))
    prefix = torch.tensor([2, 0, 5], device=device())
    expected = ops.evict_(dense_kv, dense_pos, dense_scores, budget, protect_prefix=prefix, recent=3)
    eviction = ops.paged_evict_(kv_pages, pos_pages, scores_pages, table, budget, protect_prefix=prefix, recent=3)
    assert torch.equal(eviction.destination, expected)
    first_freed = -(-budget // page_size)
    assert torch.equal(eviction.freed_pages, table[:, first_freed:])
    got_kv, got_pos, got_scores = dense_image(kv_pages, pos_pages, scores_pages, table, S)
    assert torch.equal(got_pos, dense_pos[:, :S])
    torch.testing.assert_close(got_scores, dense_scores[:, :S], rtol=0, atol=0, equal_nan=True)
    for b in range(B):
        kept = got_pos[b] >= 0
        assert int(kept.sum()) == budget and not bool(kept[budget:].any())
        assert torch.equal(got_kv[:, b][:, :, kept], dense_kv[:, b, :, :S][:, :, kept])
        for page in eviction.freed_pages[b].tolist():
            if page >= 0:
                assert bool((pos_pages[page] == -1).all()), "a freed page still holds a token"


def test_paged_evict_respects_slot_count():
    """Slots past ``slot_count`` hold stale positions in named pages: never kept, cleared by the eviction."""
    generator = torch.Generator().manual_seed(80)
    B, S, page_size, budget = 2, 30, 5, 12
    (_, pos, _), (kv_pages, pos_pages, scores_pages, paged) = paged_cache_state(B, S, page_size, generator)
    slot_count = torch.tensor([30, 20], device=device())
    stale = set(pos[1, 20:].tolist()) - {-1}
    ops.paged_evict_(kv_pages, pos_pages, scores_pages, paged.block_table, budget, protect_prefix=0, recent=1,
                     slot_count=slot_count)
    _, got_pos, _ = dense_image(kv_pages, pos_pages, scores_pages, paged.block_table, S)
    assert not stale & set(got_pos[1].tolist()), "a slot past slot_count was kept"
    assert int((got_pos[1] >= 0).sum()) == budget


# --------------------------------------------------------------------------- #
# Validation, the layout helpers and the custom ops
# --------------------------------------------------------------------------- #


def paged_attention_inputs():
    q = torch.randn(2, 4, 3, 16)
    k_pages, v_pages = torch.randn(6, 5, 2, 16), torch.randn(6, 5, 2, 16)
    pos_pages = torch.full((6, 5), -1)
    table = torch.tensor([[0, 2, -1], [4, 1, 3]])
    pos_pages[0] = pos_pages[4] = torch.arange(5)
    pos_pages[2] = pos_pages[1] = torch.arange(5, 10)
    pos_pages[3] = torch.arange(10, 15)
    query_slots = torch.tensor([[2, 3, 4], [2, 3, 4]])
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, pos_pages=pos_pages, block_table=table,
                query_slots=query_slots)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(k_pages=a["k_pages"][..., :8]), "k_pages must have shape"),
        (lambda a: a.update(v_pages=a["v_pages"][:3]), "v_pages must have shape"),
        (lambda a: a.update(v_pages=a["v_pages"].half()), "must share one dtype"),
        (lambda a: a.update(pos_pages=a["pos_pages"][:, :4]), r"pos_pages must have shape \[num_pages, page_size\]"),
        (lambda a: a.update(pos_pages=a["pos_pages"].float()), "pos_pages must have dtype"),
        (lambda a: a.update(block_table=a["block_table"].float()), "block_table must have dtype"),
        (lambda a: a.update(block_table=a["block_table"][:1]), r"block_table must have shape \[B, max_pages\]"),
        (lambda a: a.update(block_table=a["block_table"][:, :0]), r"max_pages >= 1"),
        (lambda a: a.update(block_table=a["block_table"].to("meta")), "one device"),
        (lambda a: a.update(query_slots=None), "need query_slots"),
        (lambda a: a["block_table"].__setitem__((0, 2), 6), r"page ids in \[0, num_pages=6\) or -1"),
        (lambda a: a["block_table"].__setitem__((1, 0), -2), r"page ids in \[0, num_pages=6\) or -1"),
        (lambda a: a.update(query_slots=torch.tensor([[2, 3, 4], [2, 3, 15]])), r"every entry in \[0, S=15\)"),
        (lambda a: a.update(query_slots=torch.tensor([[4, 3, 2], [2, 3, 4]])), "positions out of order"),
        (lambda a: a.update(k_pages=a["k_pages"][:, :0], v_pages=a["v_pages"][:, :0]), "holds no slot"),
    ],
)
def test_paged_attention_rejects_bad_input(mutate, message):
    args = paged_attention_inputs()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ops.paged_slot_attention(
            args.pop("q"), args.pop("k_pages"), args.pop("v_pages"), args.pop("pos_pages"), args.pop("block_table"),
            **args,
        )


def test_paged_column_sums_and_compaction_reject_bad_input():
    args = paged_attention_inputs()
    lse = torch.zeros(2, 4, 3)
    common = (args["q"], args["k_pages"], args["pos_pages"], args["block_table"])
    with pytest.raises(ValueError, match="lse must have shape"):
        ops.paged_attention_column_sums(*common, lse[:, :2], query_slots=args["query_slots"])
    with pytest.raises(ValueError, match="need query_slots"):
        ops.paged_attention_column_sums(*common, lse, query_slots=None)
    kv_pages = torch.randn(2, 6, 5, 2, 8)
    pos_pages, scores_pages = args["pos_pages"], torch.zeros(6, 5)
    table = torch.tensor([[0, 2, 5], [4, 1, 3]])
    destination = torch.full((2, 6), -1)
    with pytest.raises(ValueError, match="names page 2 more than once"):
        ops.paged_compact_slots_(kv_pages, pos_pages, scores_pages, torch.tensor([[0, 2, 5], [4, 2, 3]]), destination)
    with pytest.raises(ValueError, match=r"page ids in \[0, num_pages=6\)"):
        ops.paged_compact_slots_(kv_pages, pos_pages, scores_pages, table + 1, destination)
    with pytest.raises(ValueError, match=r"destination must have shape \[B, W\]"):
        ops.paged_compact_slots_(kv_pages, pos_pages, scores_pages, table, torch.full((2, 16), -1))
    with pytest.raises(ValueError, match="scores_pages must have shape"):
        ops.paged_compact_slots_(kv_pages, pos_pages, scores_pages[:3], table, destination)
    with pytest.raises(ValueError, match="kv_pages must have 5 dimensions"):
        ops.paged_compact_slots_(kv_pages[0], pos_pages, scores_pages, table, destination)
    # Unchecked, nothing is read on the host (the engine vouches for its table).
    ops.paged_compact_slots_(kv_pages, pos_pages, scores_pages, table, destination, check_pages=False)


def test_slot_index_and_freed_pages():
    table = torch.tensor([[3, -1, 7], [0, 9, 2]])
    index = pages.slot_index(table, 4, 8)
    assert index.tolist() == [
        [12, 13, 14, 15, -1, -1, -1, -1, 28, 29, 30, 31],
        [0, 1, 2, 3, -1, -1, -1, -1, 8, 9, 10, 11],  # page 9 is past the pool of 8: no page
    ]
    assert pages.freed_pages(table, 5, 4).tolist() == [[7], [2]]
    assert pages.freed_pages(table, 4, 4).tolist() == [[-1, 7], [9, 2]]
    assert pages.freed_pages(table, 0, 4).shape == (2, 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_custom_ops(monkeypatch, backend):
    """Schemas, fake implementations and declared mutations (``torch.library.opcheck``), on both backends."""
    monkeypatch.setenv("EPIKV_BACKEND", backend)
    args = paged_attention_inputs()
    q, k_pages, v_pages, pos_pages, table, query_slots = args.values()
    slot_count = torch.tensor([10, 15])
    prev = torch.randn(2, 2, 16)
    torch.library.opcheck(
        _library.paged_slot_attention.custom_op,
        (q, k_pages, v_pages, pos_pages, table, query_slots, 0.3, 4, prev, prev, True, True, 2, slot_count),
    )
    lse = ops.paged_slot_attention(q, k_pages, v_pages, pos_pages, table, query_slots=query_slots,
                                   return_lse=True).lse
    torch.library.opcheck(
        _library.paged_attention_column_sums.custom_op,
        (q, k_pages, pos_pages, table, lse, query_slots, None, None, slot_count),
    )
    kv_pages = torch.randn(2, 6, 5, 2, 16)
    scores_pages = torch.randn(6, 5)
    destination = torch.tensor([[1, -1, -1, -1, -1], [3, -1, 0, -1, -1]])
    torch.library.opcheck(
        _library.paged_compact_slots_.custom_op, (kv_pages, pos_pages.clone(), scores_pages, table, destination)
    )


def paged_step(q, k_pages, v_pages, kv_pages, pos_pages, scores_pages, table, query_slots, prefix):
    """One engine step on pages: attention, its H2O column sums, then an eviction to 7 slots."""
    result = ops.paged_slot_attention(q, k_pages, v_pages, pos_pages, table, query_slots=query_slots, window=6,
                                      return_lse=True, check_positions=False)
    sums = ops.paged_attention_column_sums(q, k_pages, pos_pages, table, result.lse, query_slots=query_slots,
                                           window=6, check_positions=False)
    eviction = ops.paged_evict_(kv_pages, pos_pages, scores_pages, table, 7, protect_prefix=prefix, recent=1,
                                check_pages=False)
    return (*result, sums, *eviction)


def test_paged_ops_trace_as_one_graph_equal_to_eager(backend):
    """Attention, column sums and an eviction on pages, compiled with no graph break, exactly eager (the
    ``backend`` fixture of ``test_compile`` runs it on the twins and on the kernels)."""
    args = paged_attention_inputs()
    q, k_pages, v_pages, pos_pages, table, query_slots = args.values()
    kv_pages = torch.stack([k_pages, v_pages])
    scores_pages = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    inputs = (q, k_pages, v_pages, kv_pages, pos_pages, scores_pages, table, query_slots, torch.tensor([1, 0]))
    expected = assert_one_graph_equal_to_eager(
        paged_step, inputs, ("paged_slot_attention", "paged_attention_column_sums", "paged_compact_slots_")
    )
    assert bool((expected[5] >= 0).any()), "test setup: the eviction must move slots"
