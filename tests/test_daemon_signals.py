"""Signals other than the stop signals leave a daemon serving: SIGUSR1 (what log rotation
tools send), SIGUSR2 and SIGALRM each ended either daemon at once, mid-stream, with no drain."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
from cascadeinfer.proto.v1 import scheduler_pb2, scheduler_pb2_grpc

from tests.worker.daemons import sim_cluster

STRAY = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def test_stray_signals_are_logged_and_both_daemons_serve_on(tmp_path: Path) -> None:
    with sim_cluster(1, [], tmp_path) as (scheduler, workers):
        for daemon in (scheduler, workers[0]):
            for sig in STRAY:
                daemon.process.send_signal(sig)
        time.sleep(1)
        for daemon in (scheduler, workers[0]):
            assert daemon.process.poll() is None, daemon.log()[-2000:]
            for sig in STRAY:
                assert f'"signal": "{sig.name}"' in daemon.log(), daemon.log()[-2000:]
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
        state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
        assert [w.is_healthy for w in state.workers] == [True]
