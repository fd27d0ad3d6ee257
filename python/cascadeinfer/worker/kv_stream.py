"""A request's KV snapshot as a stream of KVChunk messages, and back.

Order on the wire: one header (request id, layout), block chunks numbered consecutively from 0,
one commit (token state). The reader refuses anything else with INVALID_ARGUMENT, and a layout
mismatch with FAILED_PRECONDITION as soon as the header arrives. Where the blocks went rank to
rank (`KVSnapshot.transfer_id`), the stream has no block chunks and the commit names the
transfer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from cascadeinfer.domain import check_bounded_text, check_request_id
from cascadeinfer.proto.v1 import worker_pb2
from cascadeinfer.worker import convert
from cascadeinfer.worker.engine import (
    EngineError,
    EngineRequest,
    ErrorCode,
    KVLayout,
    KVSnapshot,
)

MAX_TRANSFER_ID_CHARS = 64
"""Longest rank-to-rank transfer id taken (the daemons make 32 hex digits)."""
MAX_CHUNK_BYTES = 1 << 20
"""Blocks per message are grouped up to this size (one block may exceed it alone). Measured on
loopback: 1 MiB messages moved bytes several times faster than 4 or 16 MiB ones."""


def header(request_id: str, layout: KVLayout | None) -> worker_pb2.KVChunk:
    """`layout=None` for a recompute resume (token ids only)."""
    h = worker_pb2.KVHeader(request_id=request_id)
    if layout is not None:
        h.layout.CopyFrom(convert.layout_to_proto(layout))
    return worker_pb2.KVChunk(header=h)


def block_chunks(blocks: list[bytes], first_block: int) -> Iterator[worker_pb2.KVChunk]:
    start, size = 0, 0
    for i, blob in enumerate(blocks):
        if i > start and size + len(blob) > MAX_CHUNK_BYTES:
            yield worker_pb2.KVChunk(
                blocks=worker_pb2.KVBlocks(first_block=first_block + start, blocks=blocks[start:i])
            )
            start, size = i, 0
        size += len(blob)
    if start < len(blocks):
        yield worker_pb2.KVChunk(
            blocks=worker_pb2.KVBlocks(first_block=first_block + start, blocks=blocks[start:])
        )


def commit(snapshot: KVSnapshot, num_blocks: int) -> worker_pb2.KVChunk:
    req = snapshot.request
    return worker_pb2.KVChunk(
        commit=worker_pb2.KVCommit(
            prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids),
            sampling=convert.sampling_to_proto(req.sampling),
            num_cached_tokens=snapshot.num_cached_tokens,
            num_blocks=num_blocks,
            transfer_id=snapshot.transfer_id or "",
        )
    )


def snapshot_chunks(snapshot: KVSnapshot) -> Iterator[worker_pb2.KVChunk]:
    yield header(snapshot.request.request_id, snapshot.layout)
    yield from block_chunks(snapshot.blocks, 0)
    yield commit(snapshot, len(snapshot.blocks))


def _invalid(message: str) -> EngineError:
    return EngineError(ErrorCode.INVALID_ARGUMENT, message)


IMPORT_MEMORY_SHARE = 4
"""The imports in flight may hold at most 1/IMPORT_MEMORY_SHARE of the memory available when
each begins: a block buffered in flight took 2.2 times its size in RSS (50 stalled streams of
8 MiB: +870 MiB), and the free KV alone is no bound on the host's memory (a sim worker's
default KV is 50 GiB; a GPU's can exceed the host's free memory, a CPU one is that memory)."""


def available_memory_bytes() -> int | None:
    """The kernel's estimate of the memory available without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class ImportBudget:
    """The KV blocks that the imports in flight on one worker hold in memory, together. Each
    stream alone was bounded by the free KV it could land in; eight stalled ones (header and
    blocks sent, no commit) held eight times that (600 MiB of one-MiB blocks, until their
    callers' deadlines). Now their sum is bounded by the free KV each sees at its start, and
    by the host memory: `max_bytes` (0: a share of the memory available at each start)."""

    def __init__(self, max_bytes: int = 0) -> None:
        self.held = 0
        self.max_bytes = max_bytes

    def _memory_blocks(self, block_bytes: int) -> int | None:
        """The blocks in flight that host memory allows, counting those held already."""
        if self.max_bytes:
            return self.max_bytes // block_bytes
        available = available_memory_bytes()
        if available is None:
            return None
        # What the imports in flight hold is no longer available: count it back in.
        return available // IMPORT_MEMORY_SHARE // block_bytes + self.held

    @contextlib.contextmanager
    def stream(self, free_blocks: int, block_bytes: int) -> Iterator[Callable[[int], None]]:
        """One import's share: the function it gets reserves blocks as they arrive (raising
        RESOURCE_EXHAUSTED once the imports in flight would hold more than `free_blocks`, or
        more blocks of `block_bytes` than host memory allows); what it reserved is given back
        when the import ends, landed in the engine or not."""
        mine = 0
        by_memory = self._memory_blocks(block_bytes) if block_bytes > 0 else None

        def reserve(num_blocks: int) -> None:
            nonlocal mine
            if self.held + num_blocks > free_blocks:
                raise EngineError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"KV imports in flight would hold over {free_blocks} blocks, more than free",
                )
            if by_memory is not None and self.held + num_blocks > by_memory:
                raise EngineError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"KV imports in flight would hold over {by_memory} blocks of {block_bytes} "
                    "bytes, more than this host's memory allows",
                )
            self.held += num_blocks
            mine += num_blocks

        try:
            yield reserve
        finally:
            self.held -= mine


def _check_blocks(
    new: Sequence[bytes], num_before: int, expected: KVLayout, max_blocks: int
) -> None:
    num = num_before + len(new)
    if num > max_blocks:
        raise _invalid(f"KV stream has over {max_blocks} blocks, more than any request holds")
    for k, blob in enumerate(new):
        if len(blob) != expected.block_bytes:
            raise _invalid(
                f"KV block {num_before + k} has {len(blob)} bytes; blocks have "
                f"{expected.block_bytes}"
            )


async def read_snapshot(
    chunks: AsyncIterator[worker_pb2.KVChunk],
    expected: KVLayout,
    max_blocks: int,
    reserve: Callable[[int], None],
) -> KVSnapshot:
    """Assembles a snapshot; a commit with num_cached_tokens == 0 and no blocks asks for a
    recompute resume (the layout is then not checked).

    Refuses as soon as a block is not `expected.block_bytes` long or the blocks outnumber
    `max_blocks` (what the longest request holds: INVALID_ARGUMENT), or `reserve` (an
    `ImportBudget.stream`) refuses them (RESOURCE_EXHAUSTED), so no stream buffers more than
    one request's KV and all of them together no more than is free; on a refusal the blocks
    read so far are dropped at once (the error's traceback must not keep them)."""
    blocks: list[bytes] = []
    try:
        return await _read(chunks, expected, max_blocks, reserve, blocks)
    except BaseException:
        blocks.clear()
        raise


async def _read(
    chunks: AsyncIterator[worker_pb2.KVChunk],
    expected: KVLayout,
    max_blocks: int,
    reserve: Callable[[int], None],
    blocks: list[bytes],
) -> KVSnapshot:
    request_id: str | None = None
    layout: KVLayout | None = None
    has_layout = False
    async for chunk in chunks:
        part = chunk.WhichOneof("part")
        if part == "header":
            if request_id is not None:
                raise _invalid("a second KV header arrived")
            request_id, layout = (
                chunk.header.request_id,
                convert.layout_from_proto(chunk.header.layout),
            )
            check_request_id(request_id)  # before any block is buffered for it
            # A recompute resume sends no layout; KV blocks are refused early on a mismatch.
            has_layout = chunk.header.HasField("layout")
            problem = expected.mismatch(layout) if has_layout else None
            if problem is not None:
                raise EngineError(ErrorCode.FAILED_PRECONDITION, f"KV layout mismatch: {problem}")
        elif request_id is None or layout is None:
            raise _invalid(f"KV {part} arrived before the header")
        elif part == "blocks":
            if chunk.blocks.first_block != len(blocks):
                raise _invalid(
                    f"KV blocks out of order: got block {chunk.blocks.first_block}, expected {len(blocks)}"
                )
            if not has_layout:
                raise _invalid("KV blocks arrived after a header without a layout")
            _check_blocks(chunk.blocks.blocks, len(blocks), expected, max_blocks)
            reserve(len(chunk.blocks.blocks))
            blocks.extend(chunk.blocks.blocks)
        elif part == "commit":
            c = chunk.commit
            transfer_id = c.transfer_id or None
            if transfer_id is not None:
                check_bounded_text("transfer_id", transfer_id, MAX_TRANSFER_ID_CHARS)
                if blocks or not has_layout or c.num_cached_tokens == 0:
                    raise _invalid("a rank-to-rank commit comes after a layout and no blocks")
            elif c.num_blocks != len(blocks):
                raise _invalid(
                    f"KV stream truncated: commit says {c.num_blocks} blocks, {len(blocks)} arrived"
                )
            request = EngineRequest(
                request_id,
                tuple(c.prompt_token_ids),
                convert.sampling_from_proto(c.sampling),
                tuple(c.output_token_ids),
            )
            if c.num_cached_tokens > 0 and not has_layout:
                raise _invalid("a KV commit with cached tokens needs a header with a layout")
            async for _ in chunks:
                raise _invalid("a KV chunk arrived after the commit")
            return KVSnapshot(request, layout, c.num_cached_tokens, blocks, transfer_id)
        else:
            raise _invalid("empty KV chunk")
    raise _invalid("KV stream truncated: it ended without a commit")
