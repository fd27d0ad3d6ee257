"""A worker whose StartDetached caller vanishes (a scheduler killed, or its link cut) logs no
asyncio error. Real sim worker daemon on loopback; the caller is a subprocess killed with
SIGKILL, so its connection ends with a reset as at a scheduler crash.

Before the fix, each such end left a read of the stream's request iterator finished with
StopAsyncIteration and never looked at: asyncio logged "Task exception was never retrieved" at
error level on every worker at every scheduler crash or cut link (docs/reliability.md, "A tenth
adversarial probe")."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.worker.daemons import SIM_WORKER, Daemon, start_worker

CALLER = """
import sys, time, grpc
from cascadeinfer.proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc

def batches():
    request = worker_pb2.GenerateRequest(
        request_id="r1", prompt_token_ids=[1, 2, 3], detach=True,
        sampling=common_pb2.SamplingParams(max_tokens=5, ignore_eos=True),
    )
    yield worker_pb2.StartBatch(requests=[request])
    time.sleep(600)  # the stream stays open, as a scheduler keeps it for its next placements

stub = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(sys.argv[1]))
for results in stub.StartDetached(batches()):
    print("answered", results.results[0].code, flush=True)
"""
UNRETRIEVED = "never retrieved"


def _open_start_stream(worker: Daemon) -> subprocess.Popen[str]:
    """A caller with a StartDetached stream open on `worker`, its first batch answered."""
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, worker.address], stdout=subprocess.PIPE, text=True
    )
    assert caller.stdout is not None
    assert caller.stdout.readline().strip() == "answered 0"
    return caller


def test_a_start_stream_whose_caller_is_killed_leaves_no_asyncio_error(tmp_path: Path) -> None:
    worker = start_worker(SIM_WORKER, tmp_path)
    try:
        for _ in range(3):  # the race is won by the read nearly always; three make it sure
            caller = _open_start_stream(worker)
            caller.kill()
            caller.wait()
        # The worker cancels the call as the reset arrives; the unread task was collected, and
        # logged, within a fraction of a second of it.
        time.sleep(2)
        assert worker.stop() == 0
        assert UNRETRIEVED not in worker.log()
    finally:
        worker.kill()
