"""The paged layout's vocabulary, shared by the paged twins, the launchers and the input checks.

A paged cache keeps every sequence's slots in fixed-size pages of one pool,
the layout of vLLM, SGLang, TensorRT-LLM and transformers' continuous
batching. ``block_table [B, max_pages]`` (int32/int64) names them: logical
slot ``s`` of sequence ``b`` lives in page ``block_table[b, s // page_size]``
at offset ``s % page_size``, so a sequence has ``S = max_pages · page_size``
logical slots. An entry outside ``[0, num_pages)`` (``-1`` for a page not
allocated) makes its slots empty: nothing is read or written there. The pools
are indexed by page: K or V ``[num_pages, page_size, Hkv, D]``, positions and
scores ``[num_pages, page_size]``. Slot order still carries no meaning:
positions say which token a slot holds.

The dense ops are the paged ones over an identity table (one page per
sequence, ``page_size = S``); the kernels take either through one address
translation (``_triton_support``'s slot addressing), and the paged twins
gather the pages into the dense layout and run the dense twins.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PageTable(NamedTuple):
    """A launch's paging: the block table, the pages' size and how many pages the pool holds."""

    block_table: torch.Tensor
    page_size: int
    num_pages: int

    @property
    def slots(self) -> int:
        """Logical slots per sequence, ``max_pages · page_size``."""
        return self.block_table.shape[1] * self.page_size


class PagedEviction(NamedTuple):
    """What :func:`epikv_triton.ops.paged_evict_` returns.

    ``destination``: ``[B, S - fill]`` int64, the plan applied (as :func:`~epikv_triton.ops.compaction_plan`).
    ``freed_pages``: ``[B, max_pages - ceil(fill / page_size)]`` (a view of ``block_table``), the entries of
    the pages the compaction emptied: return those that name a page to the pool.
    """

    destination: torch.Tensor
    freed_pages: torch.Tensor


def kernel_paging(paging: PageTable | None) -> tuple[tuple, dict]:
    """A kernel's paging arguments ``(BLOCK_TABLE, stride_tb, stride_tp, num_pages)`` and constexprs
    ``{PAGED, PAGE_SIZE}``. A dense launch passes ``None`` for all four, which Triton specialises away:
    the dense kernels keep exactly their parameters (extra unused ones shift ptxas's register
    allocation, enough to make one H2O config spill)."""
    if paging is None:
        return (None, None, None, None), {"PAGED": False, "PAGE_SIZE": 1}
    table = paging.block_table
    return (table, table.stride(0), table.stride(1), paging.num_pages), {"PAGED": True, "PAGE_SIZE": paging.page_size}


def slot_index(block_table: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    """``[B, max_pages · page_size]`` int64: logical slot ``s`` of sequence ``b`` as an index into a pool
    flattened over its first two dims (``page · page_size + offset``, vLLM's "slot mapping"), ``-1``
    where its page does not exist. Sync-free; an engine can write new tokens' K/V with it."""
    B, max_pages = block_table.shape
    page = block_table.long()
    exists = (page >= 0) & (page < num_pages)
    offset = torch.arange(page_size, device=block_table.device)
    flat = page[:, :, None] * page_size + offset
    return torch.where(exists[:, :, None], flat, -1).reshape(B, max_pages * page_size)


def gather_slots(pool: torch.Tensor, index: torch.Tensor, empty: float | int) -> torch.Tensor:
    """``pool [num_pages, page_size, *rest]`` (any strides) at ``index [B, S]`` (:func:`slot_index`):
    ``[B, S, *rest]``, ``empty`` where the index is ``-1``."""
    page_size = pool.shape[1]
    safe = index.clamp(min=0)
    taken = pool[safe // page_size, safe % page_size]
    missing = (index < 0).reshape(*index.shape, *([1] * (pool.ndim - 2)))
    return taken.masked_fill(missing, empty)


def scatter_slots_(pool: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values [B, S, *rest]`` into ``pool [num_pages, page_size, *rest]`` (any strides) at
    ``index [B, S]``, skipping ``-1`` (masked indexing: a host sync). Every valid index must be distinct."""
    exists = index >= 0
    chosen = index[exists]
    pool[chosen // pool.shape[1], chosen % pool.shape[1]] = values[exists]


def dense_planes(pages: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """K or V pages ``[num_pages, page_size, H, D]`` as the dense ``[B, H, S, D]`` (a copy; zeros in no page)."""
    return gather_slots(pages, index, 0.0).transpose(1, 2)


def freed_pages(block_table: torch.Tensor, fill: int, page_size: int) -> torch.Tensor:
    """The block table entries a compaction to ``fill`` kept slots empties: ``block_table[:, ceil(fill /
    page_size):]`` (a view). Known on the host from the engine's own table, so no sync is needed."""
    return block_table[:, -(-fill // page_size) :]


__all__ = [
    "PageTable",
    "PagedEviction",
    "dense_planes",
    "freed_pages",
    "gather_slots",
    "kernel_paging",
    "scatter_slots_",
    "slot_index",
]
