"""A worker whose KV holds fewer tokens than its model's length: the scheduler refuses a request
no worker could ever hold, rather than accept it and leave it waiting for blocks forever (vLLM
refuses such a configuration at start; the sim engine allows it)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.security import TlsFiles, client_channel

from tests.worker.daemons import SIM_WORKER, start_scheduler, workers

KV_BLOCKS = 10  # 160 tokens of KV at the profile's 16-token blocks


def _request(rid: str, prompt_len: int, max_tokens: int) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=[5] * prompt_len),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def test_a_request_larger_than_every_workers_kv_is_refused_not_left_waiting(
    tmp_path: Path,
) -> None:
    small = [*SIM_WORKER, "--sim-num-blocks", str(KV_BLOCKS), "--sim-time-scale", "0"]
    with workers([small], tmp_path) as daemons:
        scheduler = start_scheduler(["--workers", daemons[0].address], tmp_path)
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(
                client_channel(scheduler.address, TlsFiles(), "")
            )
            fits = list(stub.Generate(_request("fits", 50, 20), timeout=30))
            assert fits[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(_request("too-big", 150, 20), timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the longest context every worker can hold" in (e.value.details() or "")
        finally:
            scheduler.stop()
