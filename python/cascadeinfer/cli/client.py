"""Small helpers the client commands share: a scheduler stub and one streamed generation."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from cascadeinfer.daemon import CHANNEL_OPTIONS
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

FINISH_NAMES = {
    v: k.removeprefix("FINISH_REASON_").lower() for k, v in common_pb2.FinishReason.items()
}


def scheduler_stub(address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(
        grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    )


@dataclass
class Generation:
    request_id: str
    token_ids: list[int]
    finish_reason: str
    timings: scheduler_pb2.RequestTimings


def generate(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
    prompt_token_ids: list[int],
    max_tokens: int,
    request_id: str = "",
    on_tokens: object = None,
) -> Generation:
    request = scheduler_pb2.ClientGenerateRequest(
        request_id=request_id,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=prompt_token_ids),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    tokens: list[int] = []
    last = scheduler_pb2.ClientGenerateResponse()
    for r in stub.Generate(request):
        tokens.extend(r.tokens.token_ids)
        if callable(on_tokens):
            on_tokens(list(r.tokens.token_ids))
        last = r
    return Generation(
        last.request_id, tokens, FINISH_NAMES.get(last.finish_reason, "?"), last.timings
    )
