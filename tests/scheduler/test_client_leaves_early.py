"""A gRPC client that leaves while its request is being admitted (it cancels the call at once,
or its deadline passes during the placement) leaves nothing behind: no copy running unread on
a worker to its max_tokens, and no placement the scheduler keeps counting (which would hold
the instance's capacity forever). A real scheduler and sim worker on loopback."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from tests import h2_raw
from tests.worker.daemons import SIM_WORKER, Daemon, free_port, start_scheduler, workers

METRICS_PORT = free_port()
MAX_TOKENS = 3000
"""Under the default max_stream_lag_tokens, so an unread copy is not cut off by that bound:
at the sim's pace it runs for tens of seconds."""


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("leaves")
    with workers([SIM_WORKER], tmp) as (worker,):
        s = start_scheduler(["--workers", worker.address, "--metrics-port", str(METRICS_PORT)], tmp)
        try:
            yield s
        finally:
            s.stop()


def request(max_tokens: int) -> scheduler_pb2.ClientGenerateRequest:
    r = scheduler_pb2.ClientGenerateRequest(
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )
    r.prompt_token_ids.ids.extend(range(1, 9))
    return r


def placed(stub: scheduler_pb2_grpc.SchedulerServiceStub) -> tuple[int, int]:
    """Requests the worker runs (as it reports) and those the scheduler counts as placed."""
    state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
    on_workers = sum(w.num_running + w.num_waiting for w in state.workers)
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("cascade_scheduler_running ")]
    return on_workers, int(float(line.split()[1]))


def test_a_request_whose_client_leaves_during_admission_does_not_run_on(
    scheduler: Daemon,
) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
    for _ in range(20):
        stub.Generate(request(MAX_TOKENS)).cancel()
        with contextlib.suppress(grpc.RpcError):
            list(stub.Generate(request(MAX_TOKENS), timeout=0.005))
    deadline = time.monotonic() + 5
    while placed(stub) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placed(stub) == (0, 0)
    tokens = [t for r in stub.Generate(request(5), timeout=30) for t in r.tokens.token_ids]
    assert len(tokens) == 5, "the scheduler serves on"


def test_a_client_that_leaves_while_its_stream_waits_on_it_is_a_disconnect(
    scheduler: Daemon,
) -> None:
    """Streams that give the scheduler no window to write in (HTTP/2 flow control), then
    leave: each is a client that left (`client_disconnected`, its request aborted on the
    worker), not a failure of the stream's handler logged at error level with gRPC's
    traceback (`ExecuteBatchError`, as it was)."""
    port = int(scheduler.address.rsplit(":", 1)[1])
    message = request(MAX_TOKENS).SerializeToString()
    before = scheduler.log().count('"client_disconnected"')
    connections = []
    for _ in range(4):
        s = h2_raw.connect(port, window=0)
        for k in range(3):
            h2_raw.open_unary_stream(
                s, 1 + 2 * k, "/cascadeinfer.v1.SchedulerService/Generate", message
            )
        connections.append(s)
    time.sleep(2.0)  # each stream's first write waits for a window that never comes
    for s in connections:
        s.close()
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
    deadline = time.monotonic() + 10
    while placed(stub) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placed(stub) == (0, 0)
    log = scheduler.log()
    assert log.count('"client_disconnected"') - before == 12
    assert "ExecuteBatchError" not in log
    assert '"level": "error"' not in log
