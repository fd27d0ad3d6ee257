"""Copies one request's KV blocks out of an engine's per-layer cache tensors and back in.

A block travels as one opaque blob: each layer's bytes for it, layer after layer (the layout
both ends share, since both run the same model with the same KV geometry). vLLM allocates each
layer's cache as one tensor whose first dimension is the block (an attention kernel may split a
block into several rows there), so in a contiguous cache a block is one run of bytes. Copying
those runs whole, as byte rows, is a plain memory copy: 1.8-5.5x faster to read and 3.4-4.7x
to write than gathering the rows by tensor indexing, as this did first, for Llama-3-8B's 2 MiB
blocks (docs/benchmarks.md, "KV block copies"; a migration's end-to-end rate on the 2-core
development VM did not move with it). A cache that is not contiguous (a strided view) falls
back to indexing.

No vLLM import here: the functions take the tensors, so tests run them on tensors of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def block_bytes_of(caches: Sequence[torch.Tensor], num_blocks: int) -> int:
    """Bytes one scheduler block takes across all layers."""
    return sum(c.numel() * c.element_size() // num_blocks for c in caches)


def copies_as_byte_rows(caches: Sequence[torch.Tensor], num_blocks: int) -> bool:
    """Whether every cache takes the byte-row path (else the blocks go by indexing)."""
    return _all_byte_rows(caches, num_blocks) is not None


def read_block_rows(
    caches: Sequence[torch.Tensor], num_blocks: int, block_ids: Sequence[int]
) -> list[memoryview]:
    """One blob per block, in `block_ids` order, as views of one buffer written here (the
    single copy out of the cache): for senders that take buffers without copying them
    (ZeroMQ's `copy=False`). The buffer lives as long as any view of it."""
    if not block_ids:
        return []
    layers = _all_byte_rows(caches, num_blocks)
    if layers is None:
        return [row.data for row in _gathered_table(caches, num_blocks, block_ids)]
    table = np.empty((len(block_ids), sum(rows.shape[1] for rows in layers)), dtype=np.uint8)
    runs = list(_runs(block_ids))
    offset = 0
    for rows in layers:
        width = rows.shape[1]
        for at, first, count in runs:
            table[at : at + count, offset : offset + width] = rows[first : first + count]
        offset += width
    return [row.data for row in table]


def read_blocks(
    caches: Sequence[torch.Tensor], num_blocks: int, block_ids: Sequence[int]
) -> list[bytes]:
    """`read_block_rows` as `bytes` (for protobuf fields, which take nothing else)."""
    return [row.tobytes() for row in read_block_rows(caches, num_blocks, block_ids)]


def write_blocks(
    caches: Sequence[torch.Tensor],
    num_blocks: int,
    block_ids: Sequence[int],
    blobs: Sequence[bytes | memoryview],
) -> None:
    """The inverse of `read_blocks`: blob i goes into block_ids[i]. Raises ValueError, writing
    nothing, when the blobs do not match the blocks in number or size (an export from an
    engine with another KV geometry)."""
    if len(blobs) != len(block_ids):
        raise ValueError(f"{len(blobs)} KV blobs for {len(block_ids)} blocks")
    block_bytes = block_bytes_of(caches, num_blocks)
    sources = [np.frombuffer(blob, dtype=np.uint8) for blob in blobs]
    for src in sources:
        if src.size != block_bytes:
            raise ValueError(f"a KV blob of {src.size} bytes for blocks of {block_bytes}")
    if not block_ids:
        return
    layers = _all_byte_rows(caches, num_blocks)
    if layers is None:
        _scatter(caches, num_blocks, block_ids, np.stack(sources))
        return
    for block, src in zip(block_ids, sources, strict=True):
        offset = 0
        for rows in layers:
            width = rows.shape[1]
            rows[block] = src[offset : offset + width]
            offset += width


def _all_byte_rows(caches: Sequence[torch.Tensor], num_blocks: int) -> list[np.ndarray] | None:
    """Every cache as byte rows (`_byte_rows`), or None when one cannot be."""
    layers = []
    for cache in caches:
        rows = _byte_rows(cache, num_blocks)
        if rows is None:
            return None
        layers.append(rows)
    return layers


def _byte_rows(cache: torch.Tensor, num_blocks: int) -> np.ndarray | None:
    """`cache` as a (num_blocks, bytes per block) array sharing its memory, or None when its
    layout does not allow that (strided, or rows that do not divide into the blocks)."""
    if cache.device.type != "cpu" or not cache.is_contiguous() or cache.shape[0] % num_blocks:
        return None
    return cache.view(torch.uint8).reshape(num_blocks, -1).numpy()


def _runs(block_ids: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(position in `block_ids`, first block, count) of each run of consecutive block ids:
    an engine's allocator hands out neighbouring blocks often, and a run copies in one go."""
    start = 0
    for k in range(1, len(block_ids) + 1):
        if k == len(block_ids) or block_ids[k] != block_ids[k - 1] + 1:
            yield start, block_ids[start], k - start
            start = k


def _kernel_rows(cache: torch.Tensor, num_blocks: int, block_ids: Sequence[int]) -> torch.Tensor:
    """Rows of `cache` holding the given scheduler blocks (a kernel may split each block)."""
    split = cache.shape[0] // num_blocks
    ids = torch.tensor(list(block_ids), dtype=torch.long)
    return (ids[:, None] * split + torch.arange(split)[None, :]).reshape(-1)


def _gathered_table(
    caches: Sequence[torch.Tensor], num_blocks: int, block_ids: Sequence[int]
) -> np.ndarray:
    """The blobs as rows of one array, gathered by indexing (any layout)."""
    parts = []
    for cache in caches:
        rows = cache[_kernel_rows(cache, num_blocks, block_ids)].contiguous()
        parts.append(rows.view(torch.uint8).reshape(len(block_ids), -1))
    return torch.cat(parts, dim=1).numpy()


def _scatter(
    caches: Sequence[torch.Tensor], num_blocks: int, block_ids: Sequence[int], table: np.ndarray
) -> None:
    """Writes the rows of `table` (one blob per block) by indexing (any layout)."""
    num = len(block_ids)
    data = torch.from_numpy(table)
    offset = 0
    for cache in caches:
        rows = _kernel_rows(cache, num_blocks, block_ids)
        width = rows.numel() // num * cache[0].numel() * cache.element_size()
        chunk = data[:, offset : offset + width].contiguous().view(cache.dtype)
        cache[rows] = chunk.reshape(rows.numel(), *cache.shape[1:])
        offset += width
