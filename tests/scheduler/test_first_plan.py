"""The scheduler's first plan, made when enough workers have joined, against what its workers
and its traffic forecast allow: a forecast past the fleet's capacity is planned for at the
highest rate the fleet carries, and a plan that cannot be made for the workers falls back to
one stage placed by least load. Either way the scheduler serves; it used to refuse every
request for good while listing the worker as healthy."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from tests.worker.daemons import SIM_WORKER, start_scheduler, workers


def _serves(address: str) -> scheduler_pb2.ClusterState:
    """Waits until a request through the scheduler completes; returns the cluster state."""
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    request = scheduler_pb2.ClientGenerateRequest(
        request_id="first",
        prompt_token_ids=scheduler_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=common_pb2.SamplingParams(max_tokens=5, ignore_eos=True),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            replies = list(stub.Generate(request, timeout=30))
            break
        except grpc.RpcError as e:
            # UNAVAILABLE until the worker's registration lands; it must not last.
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    return stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)


@pytest.mark.parametrize(
    ("scheduler_args", "worker_args", "policy"),
    [
        # The planner's length buckets need a longer context than 4 blocks of KV (64 tokens).
        ([], ["--sim-num-blocks", "4"], "least-load"),
        # Far past what one worker carries: planned for what it does carry.
        (["--workload", "short-chat", "--rate", "5000"], [], "cascade"),
    ],
    ids=["no-plan-for-the-workers", "rate-past-capacity"],
)
def test_a_registering_worker_is_served_whatever_the_first_plan_meets(
    tmp_path: Path, scheduler_args: list[str], worker_args: list[str], policy: str
) -> None:
    scheduler = start_scheduler(["--min-workers", "1", *scheduler_args], tmp_path)
    try:
        join = [*SIM_WORKER, *worker_args, "--scheduler", scheduler.address]
        with workers([join], tmp_path):
            state = _serves(scheduler.address)
            assert state.policy == policy
            assert [w.is_healthy for w in state.workers] == [True]
            assert len(state.stages) >= 1
    finally:
        scheduler.stop()
    if policy == "least-load":
        assert "plan_failed" in scheduler.log_path.read_text()


def test_a_workload_that_cannot_be_read_is_refused_at_start(tmp_path: Path) -> None:
    """It was read only at the first plan: the scheduler said it was serving, then stopped
    when its --workers joined, or refused every request when workers registered."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "prompt_len": Infinity, "output_len": 5}\n')
    for workload, message in [
        (str(tmp_path / "missing.jsonl"), "neither a preset"),
        (str(bad), "finite"),
    ]:
        try:
            started = start_scheduler(["--workload", workload], tmp_path, timeout=30)
        except RuntimeError as e:
            assert message in str(e)
        else:
            started.kill()
            pytest.fail(f"served with --workload {workload}")
