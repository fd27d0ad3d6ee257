"""Wire <-> domain conversions both daemons use (sampling settings and finish reasons), in one
place: the scheduler and the worker import this, never each other's modules."""

from __future__ import annotations

from cascadeinfer.domain import FinishReason, SamplingSpec, check_num_stop_ids
from cascadeinfer.proto.v1 import common_pb2

PLACED_BY_KEY = "cascade-scheduler-id"
"""The call metadata in which a scheduler names itself on its placements (StartDetached, a
detached Generate): a worker takes them from the scheduler that holds it only
(`worker/claim.py`)."""

FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.MIGRATED: common_pb2.FINISH_REASON_MIGRATED,
}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingSpec:
    """Raises INVALID_ARGUMENT for more than MAX_STOP_TOKEN_IDS stop ids before they become a
    tuple of Python ints (`SamplingSpec.validate` checks it again for specs made otherwise)."""
    check_num_stop_ids(len(p.stop_token_ids))
    return SamplingSpec(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p if p.top_p != 0 else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def sampling_to_proto(s: SamplingSpec) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
    if s.seed is not None:
        p.seed = s.seed
    return p


FINISH_FROM_PROTO = {
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}
"""The finishes a client sees (a MIGRATED step is not an end for the scheduler)."""
