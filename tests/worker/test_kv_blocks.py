"""KV block copies (`worker/engines/kv_blocks.py`) on tensors shaped as vLLM's caches are:
the blob layout, round trips into other blocks, the fallback for strided caches, and refusals."""

from __future__ import annotations

import pytest
import torch
from cascadeinfer.worker.engines import kv_blocks

NUM_BLOCKS = 12


def _caches(seed: int) -> list[torch.Tensor]:
    """Three layers: one row per block (bf16), two rows per block (a kernel that splits
    blocks), and float32, as vLLM allocates them: contiguous, block first."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(NUM_BLOCKS, 2, 16, 2, 8, generator=g).to(torch.bfloat16),
        torch.randn(2 * NUM_BLOCKS, 8, 2, 4, generator=g).to(torch.bfloat16),
        torch.randn(NUM_BLOCKS, 16, 4, generator=g),
    ]


def _block(cache: torch.Tensor, block: int) -> torch.Tensor:
    split = cache.shape[0] // NUM_BLOCKS
    return cache[block * split : (block + 1) * split]


def test_blobs_hold_each_layers_rows_for_the_block_layer_after_layer() -> None:
    caches = _caches(0)
    ids = [3, 4, 5, 9, 0]
    blobs = kv_blocks.read_blocks(caches, NUM_BLOCKS, ids)
    for blob, block in zip(blobs, ids, strict=True):
        expected = b"".join(
            _block(c, block).contiguous().view(torch.uint8).numpy().tobytes() for c in caches
        )
        assert blob == expected
    assert all(len(b) == kv_blocks.block_bytes_of(caches, NUM_BLOCKS) for b in blobs)
    # The views a sender takes without copying hold the same bytes.
    rows = kv_blocks.read_block_rows(caches, NUM_BLOCKS, ids)
    assert [bytes(r) for r in rows] == blobs


def test_blocks_written_elsewhere_hold_what_was_read_and_nothing_else_changes() -> None:
    source, target = _caches(1), [torch.zeros_like(c) for c in _caches(2)]
    before = [c.clone() for c in target]
    from_ids, to_ids = [0, 1, 2, 7, 11], [5, 6, 10, 3, 4]
    kv_blocks.write_blocks(
        target, NUM_BLOCKS, to_ids, kv_blocks.read_block_rows(source, NUM_BLOCKS, from_ids)
    )
    for s, t, b in zip(source, target, before, strict=True):
        for f, to in zip(from_ids, to_ids, strict=True):
            assert torch.equal(_block(t, to), _block(s, f))
        for other in set(range(NUM_BLOCKS)) - set(to_ids):
            assert torch.equal(_block(t, other), _block(b, other))


def test_a_strided_cache_is_copied_by_indexing_with_the_same_blobs() -> None:
    caches = _caches(3)
    # The same values as the first layer, held in a transposed buffer: not contiguous.
    strided = caches[0].transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous() and torch.equal(strided, caches[0])
    ids = [2, 8, 9]
    mixed = [strided, *caches[1:]]
    assert kv_blocks.copies_as_byte_rows(caches, NUM_BLOCKS)
    assert not kv_blocks.copies_as_byte_rows(mixed, NUM_BLOCKS)
    assert kv_blocks.read_blocks(mixed, NUM_BLOCKS, ids) == kv_blocks.read_blocks(
        caches, NUM_BLOCKS, ids
    )
    target = [torch.zeros_like(strided), *(torch.zeros_like(c) for c in caches[1:])]
    kv_blocks.write_blocks(
        target, NUM_BLOCKS, [0, 1, 2], kv_blocks.read_blocks(caches, NUM_BLOCKS, ids)
    )
    for s, t in zip(caches, target, strict=True):
        for f, to in zip(ids, [0, 1, 2], strict=True):
            assert torch.equal(_block(t, to), _block(s, f))


@pytest.mark.parametrize(
    ("blobs", "message"),
    [
        (lambda good: good[:-1], "2 KV blobs for 3 blocks"),
        (lambda good: [good[0], good[1][:-2], good[2]], "a KV blob of"),
    ],
)
def test_blobs_of_another_geometry_are_refused_before_anything_is_written(blobs, message) -> None:
    caches = _caches(4)
    good = kv_blocks.read_blocks(caches, NUM_BLOCKS, [0, 1, 2])
    target = [torch.zeros_like(c) for c in caches]
    with pytest.raises(ValueError, match=message):
        kv_blocks.write_blocks(target, NUM_BLOCKS, [3, 4, 5], blobs(good))
    assert all(not t.any() for t in target)


def test_no_blocks_no_blobs() -> None:
    caches = _caches(5)
    assert kv_blocks.read_block_rows(caches, NUM_BLOCKS, []) == []
    kv_blocks.write_blocks(caches, NUM_BLOCKS, [], [])
