"""Proto <-> domain conversions of the worker's own types (requests, progress, steps, KV
layouts); what the scheduler shares (sampling, finish reasons) is in `cascadeinfer.wire`."""

from __future__ import annotations

from cascadeinfer.domain import check_context_fits
from cascadeinfer.proto.v1 import common_pb2, worker_pb2
from cascadeinfer.wire import FINISH_TO_PROTO as FINISH_TO_PROTO
from cascadeinfer.wire import sampling_from_proto as sampling_from_proto
from cascadeinfer.wire import sampling_to_proto as sampling_to_proto
from cascadeinfer.worker.engine import (
    EngineRequest,
    KVLayout,
    KVPeer,
    RequestProgress,
    StepReport,
)


def request_from_generate(m: worker_pb2.GenerateRequest, max_model_len: int) -> EngineRequest:
    """Raises INVALID_ARGUMENT for a context that leaves no room below `max_model_len` before
    its token ids become Python ints: one 40 MB call of 8 million ids took a worker from 56 to
    486 MiB, kept after the engine refused it (docs/reliability.md, "A fourteenth probe")."""
    check_context_fits(len(m.prompt_token_ids) + len(m.output_token_ids), max_model_len)
    return EngineRequest(
        request_id=m.request_id,
        prompt_token_ids=tuple(m.prompt_token_ids),
        sampling=sampling_from_proto(m.sampling),
        output_token_ids=tuple(m.output_token_ids),
    )


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        model=layout.model,
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_size=layout.head_size,
        block_size=layout.block_size,
        backend=layout.backend,
        block_bytes=layout.block_bytes,
    )


def layout_from_proto(p: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        model=p.model,
        dtype=p.dtype,
        num_layers=p.num_layers,
        num_kv_heads=p.num_kv_heads,
        head_size=p.head_size,
        block_size=p.block_size,
        backend=p.backend,
        block_bytes=p.block_bytes,
    )


def progress_to_response(p: RequestProgress) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(
        request_id=p.request_id,
        tokens=common_pb2.TokenChunk(token_ids=list(p.new_token_ids), first_index=p.first_index),
        finish_reason=FINISH_TO_PROTO[p.finish_reason],
        context_len=p.context_len,
    )


def step_to_proto(worker_id: str, r: StepReport) -> worker_pb2.StepUpdate:
    return worker_pb2.StepUpdate(
        worker_id=worker_id,
        step_index=r.step_index,
        step_time_s=r.step_time_s,
        requests=[
            worker_pb2.RequestStep(
                request_id=p.request_id,
                tokens=common_pb2.TokenChunk(
                    token_ids=list(p.new_token_ids), first_index=p.first_index
                ),
                context_len=p.context_len,
                finish_reason=FINISH_TO_PROTO[p.finish_reason],
            )
            for p in r.progress
        ],
        num_running=r.num_running,
        num_waiting=r.num_waiting,
        kv_blocks_used=r.kv_blocks_used,
        kv_blocks_free=r.kv_blocks_free,
    )


def kv_peer_to_proto(peer: KVPeer | None) -> worker_pb2.KVPeer | None:
    if peer is None:
        return None
    return worker_pb2.KVPeer(
        endpoints=list(peer.endpoints), server_key=peer.server_key, ticket=peer.ticket
    )


def kv_peer_from_proto(info: worker_pb2.WorkerInfo) -> KVPeer | None:
    """A worker's rank-to-rank side channel as its GetInfo tells it; None without one."""
    if not info.HasField("kv_peer") or not info.kv_peer.endpoints:
        return None
    p = info.kv_peer
    return KVPeer(tuple(p.endpoints), p.server_key, p.ticket)
