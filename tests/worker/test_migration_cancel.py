"""A MigrateOut whose caller gives up after the request was stopped for the move (its deadline
expires while the target hangs) resumes the request on the source: the client's stream goes
on to the end, and no copy is left behind on either worker. Real sim daemons on loopback; the
target is frozen with SIGSTOP."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, worker_pb2

from tests.worker.daemons import SIM_WORKER, Daemon, workers
from tests.worker.streams import GenerateReader, Spliced, generate_request, run_to_end

PROMPT = list(range(1, 60))
MAX_TOKENS = 1500


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[list[Daemon]]:
    with workers([SIM_WORKER, SIM_WORKER], tmp_path) as daemons:
        yield daemons


def num_requests(d: Daemon) -> int:
    load = d.stub().GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return int(load.num_running + load.num_waiting)


def test_cancelled_migrate_out_resumes_the_request_on_the_source(pair: list[Daemon]) -> None:
    a, b = pair
    reference = run_to_end(a.stub(), "ref", PROMPT, MAX_TOKENS)
    # One migration first, so A's channel to B is up and the frozen B hangs the transfer only
    # after A has stopped the request (a new connection would hang before).
    warm = GenerateReader(a.stub(), generate_request("warm", PROMPT, MAX_TOKENS), Spliced())
    warm.wait_tokens(1)
    a.stub().MigrateOut(
        worker_pb2.MigrateOutRequest(
            request_id="warm", target_address=b.address, mode=worker_pb2.MIGRATION_MODE_RECOMPUTE
        ),
        timeout=30,
    )
    warm.join()
    b.stub().Abort(worker_pb2.AbortRequest(request_id="warm"), timeout=10)
    out = Spliced()
    reader = GenerateReader(a.stub(), generate_request("moving", PROMPT, MAX_TOKENS), out)
    reader.wait_tokens(5)
    b.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as e:
            a.stub().MigrateOut(
                worker_pb2.MigrateOutRequest(
                    request_id="moving",
                    target_address=b.address,
                    mode=worker_pb2.MIGRATION_MODE_RECOMPUTE,
                ),
                timeout=1.0,
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        b.process.send_signal(signal.SIGCONT)
    reader.join(timeout=60)
    assert out.finish == common_pb2.FINISH_REASON_LENGTH, "the stream went on to its end"
    assert out.ordered() == reference
    assert out.duplicates == 0
    assert "migration_failed_resumed_on_source" in a.log()
    deadline = time.monotonic() + 10
    while (num_requests(a), num_requests(b)) != (0, 0):
        assert time.monotonic() < deadline, "a copy of the request was left behind"
        time.sleep(0.2)
