"""MigrateOut: move one running request to another worker, keeping it alive on failure.

KV mode, Llumnix-style two-stage copy: the full blocks are copied and streamed while the request
keeps decoding; then the request is stopped, the few blocks filled meanwhile plus the partial
last block are sent, and the target resumes it. The pause therefore covers about one block's
worth of copying whatever the sequence length. Recompute mode sends only token ids and the
target re-prefills them (for workers whose KV layouts differ, and always from an engine that
cannot move KV blocks: vLLM with its engine core in another process).

Between two engines whose ranks talk to each other (`RankToRankKV`: vLLM with its engine core
in its own process, the target's GetInfo naming its ranks' side channel) the blocks go rank to
rank and the ImportKV stream carries only the header and the commit; where the target's ranks
cannot be reached before the stop, the blocks take the ImportKV stream as before.

On any failure after the stop, the caller's cancellation included, the source resumes the
request from its own snapshot (by recompute where its blocks went rank to rank), so the
client's stream goes on here without a gap; a target that may have resumed it too (the outcome
is unknown) is told to drop its copy.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from cascadeinfer.domain import check_bounded_text, check_request_id
from cascadeinfer.proto.v1 import worker_pb2
from cascadeinfer.worker import convert, kv_stream
from cascadeinfer.worker.engine import (
    Engine,
    EngineError,
    ErrorCode,
    FinishReason,
    KVSnapshot,
    KVTransfer,
    RankToRankKV,
    kv_peer_of,
)
from cascadeinfer.worker.state import MIGRATION_DEADLINE_S, WorkerState

if TYPE_CHECKING:
    from cascadeinfer.proto.v1.worker_pb2_grpc import WorkerServiceAsyncStub

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MigrationResult:
    context_len: int
    num_bytes: int
    pause_s: float
    total_s: float


class MigrationFailed(Exception):
    """The target refused or the transfer broke; the request is running on the source again."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


MAX_TARGET_CHARS = 512
"""Longest target address taken (a DNS name has at most 253 characters, a unix socket path
108); a longer one is refused without being echoed into the status."""


async def migrate_out(
    state: WorkerState, request_id: str, target: str, recompute: bool
) -> MigrationResult:
    check_request_id(request_id)
    check_bounded_text("target_address", target, MAX_TARGET_CHARS)
    if request_id not in state.hub.requests:
        raise EngineError(ErrorCode.NOT_FOUND, f"no request {request_id!r} on this worker")
    started = time.perf_counter()
    peer = state.peer(target)
    layout = state.loop.engine.layout
    if not recompute and not state.loop.engine.can_move_kv:
        # The scheduler asks for KV mode; an engine whose blocks cannot leave resumes the
        # request on the target by recompute instead of refusing the move.
        recompute = True
    pre: list[bytes] = []
    num_pre = 0
    transfer: KVTransfer | None = None
    if not recompute:
        # Refuse before touching the request when the target could not use our blocks.
        try:
            info = await peer.GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise MigrationFailed(
                grpc.StatusCode.UNAVAILABLE, f"target {target} unreachable: {e.details()}"
            ) from None
        problem = layout.mismatch(convert.layout_from_proto(info.layout))
        if problem is not None:
            raise MigrationFailed(
                grpc.StatusCode.FAILED_PRECONDITION, f"target KV layout differs: {problem}"
            )
        transfer = _rank_to_rank(state.loop.engine, info)
        if transfer is not None and not state.may_go_rank_to_rank(target, time.monotonic()):
            transfer = None
        if transfer is not None:
            road = transfer
            try:
                num_pre = await state.loop.call(lambda e: _send(e, request_id, 0, road))
            except RuntimeError as e:
                # Before the stop nothing is lost: the blocks take the ImportKV stream, now
                # and for a while (RANK_TO_RANK_RETRY_S).
                state.rank_to_rank_failed(target, time.monotonic())
                log.warning(
                    "kv_rank_to_rank_failed", request_id=request_id, target=target, error=str(e)
                )
                transfer = None
        if transfer is None:
            pre = await state.loop.call(lambda e: e.copy_full_blocks(request_id, 0))
            num_pre = len(pre)

    call = peer.ImportKV(timeout=MIGRATION_DEADLINE_S)
    export: asyncio.Future[KVSnapshot] | None = None
    rest: KVSnapshot | None = None
    snapshot: KVSnapshot | None = None
    is_committed = False
    try:
        await _write(call, kv_stream.header(request_id, None if recompute else layout))
        for chunk in kv_stream.block_chunks(pre, 0):
            await _write(call, chunk)
        paused = time.perf_counter()
        # Shielded: a cancelled caller must not drop the snapshot of a request already stopped.
        export = asyncio.ensure_future(
            state.loop.call(lambda e: _export(e, request_id, num_pre, transfer))
        )
        rest = await asyncio.shield(export)
        if transfer is not None and rest.transfer_id is None:
            # The ranks could not deliver after the stop: it resumes there by recompute.
            state.rank_to_rank_failed(target, time.monotonic())
        snapshot = KVSnapshot(
            rest.request, rest.layout, rest.num_cached_tokens, pre + rest.blocks, rest.transfer_id
        )
        is_committed = True
        if recompute:
            final = KVSnapshot(rest.request, rest.layout, 0, [])
            await _write(call, kv_stream.commit(final, 0))
        elif snapshot.transfer_id is not None:
            num_blocks = math.ceil(snapshot.num_cached_tokens / layout.block_size)
            await _write(call, kv_stream.commit(snapshot, num_blocks))
        else:
            for chunk in kv_stream.block_chunks(rest.blocks, len(pre)):
                await _write(call, chunk)
            await _write(call, kv_stream.commit(snapshot, len(snapshot.blocks)))
        await call.done_writing()
        response = await call
    except BaseException as e:
        # Any failure or cancellation (the caller's deadline) after the stop: resume here.
        call.cancel()
        state.metrics.migration_failures.labels(state.engine_name, "out").inc()
        undecided = is_committed and not _is_refusal(e)
        await asyncio.shield(_recover(state, export, pre, peer if undecided else None))
        # The error raised from here holds this frame (its traceback) and the frame holds the
        # error: a cycle only a full collection frees. Drop the KV bytes it would keep alive.
        pre.clear()
        export = rest = snapshot = None
        if isinstance(e, grpc.aio.AioRpcError):
            raise MigrationFailed(e.code(), f"target {target} refused: {e.details()}") from None
        raise
    assert snapshot is not None
    resumed = time.perf_counter()
    # Recompute sends token ids only.
    num_blocks = math.ceil(snapshot.num_cached_tokens / layout.block_size)
    num_bytes = 0 if recompute else num_blocks * layout.block_bytes
    state.hub.end(request_id, FinishReason.MIGRATED, migrated_to=target, tell_feeds=True)
    m = state.metrics
    m.migrations.labels(state.engine_name, "out", "recompute" if recompute else "kv").inc()
    m.migration_bytes.labels(state.engine_name, "out").inc(num_bytes)
    m.migration_pause.observe(resumed - paused)
    log.info(
        "migrated_out",
        request_id=request_id,
        target=target,
        blocks=num_blocks,
        precopied=num_pre,
        rank_to_rank=snapshot.transfer_id is not None,
        bytes=num_bytes,
        pause_s=resumed - paused,
        imported=response.request_id,
    )
    return MigrationResult(
        snapshot.request.context_len, num_bytes, resumed - paused, resumed - started
    )


def _rank_to_rank(engine: Engine, target: worker_pb2.WorkerInfo) -> KVTransfer | None:
    """The road for this migration's blocks when both ends' ranks talk to each other."""
    peer = convert.kv_peer_from_proto(target)
    if kv_peer_of(engine) is None or peer is None:
        return None
    return KVTransfer(peer, uuid.uuid4().hex)


def _send(engine: Engine, request_id: str, start_block: int, transfer: KVTransfer) -> int:
    assert isinstance(engine, RankToRankKV)
    return engine.send_full_blocks(request_id, start_block, transfer)


def _export(
    engine: Engine, request_id: str, skip_blocks: int, transfer: KVTransfer | None
) -> KVSnapshot:
    if transfer is None:
        return engine.export_kv(request_id, skip_blocks=skip_blocks)
    assert isinstance(engine, RankToRankKV)
    return engine.export_kv_to(request_id, skip_blocks, transfer)


async def _write(call: Any, chunk: worker_pb2.KVChunk) -> None:
    """Writes one chunk; a target that already answered (an early refusal) raises its status.
    A write racing that answer can also fail in grpc's core ("Internal error from Core",
    INTERNAL; seen once in CI on a refusal for want of blocks): the call's own status is then
    the target's answer too."""
    try:
        await call.write(chunk)
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        await call  # raises grpc.aio.AioRpcError with the target's status
        raise


REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
"""Answers by which the target says it did not take the request."""


def _is_refusal(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in REFUSALS


async def _recover(
    state: WorkerState,
    export: asyncio.Future[KVSnapshot] | None,
    pre: list[bytes],
    undecided_peer: WorkerServiceAsyncStub | None,
) -> None:
    """Resumes a request stopped for a migration that did not complete. `undecided_peer`: the
    target got the whole request and may have resumed it; it is told to drop its copy."""
    if export is None:
        return  # never stopped: it is still running here
    try:
        rest = await export
    except EngineError as e:
        if e.code is ErrorCode.NOT_FOUND:
            # It finished (or was aborted) as its move began: nothing to resume.
            log.info("migration_export_found_nothing", error=str(e))
            return
        log.exception("migration_export_failed")
        return
    except Exception:
        log.exception("migration_export_failed")
        return
    if rest.transfer_id is not None:
        # Its blocks went to the target's ranks: it resumes here by recompute.
        snapshot = KVSnapshot(rest.request, rest.layout, 0, [])
    else:
        snapshot = KVSnapshot(rest.request, rest.layout, rest.num_cached_tokens, pre + rest.blocks)
    rid = snapshot.request.request_id

    def resume(e: Engine) -> None:
        e.import_kv(snapshot)

    await state.loop.call(resume)
    log.warning("migration_failed_resumed_on_source", request_id=rid)
    if undecided_peer is not None:
        try:
            await undecided_peer.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5)
            log.info("migration_target_copy_dropped", request_id=rid)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("migration_target_unreachable", request_id=rid, error=e.details())
