"""Goodbyes said on a worker's behalf, and registry calls refused. Real scheduler and sim worker
daemons on loopback; the workers register themselves (`--scheduler`).

A `WorkerRegistry/DeregisterWorker` from any holder of the registry's credential used to keep a
healthy, non-draining worker out of the plan until it restarted: its heartbeats were refused as
"is leaving" while its feed stayed open (docs/reliability.md, "A sixth adversarial probe"). The
scheduler now asks the worker itself: one that answers that it is not draining stays
(FAILED_PRECONDITION), one that does not answer leaves as before and comes back once it answers
again, and a worker's own goodbye (said once it drains) is still honoured. Failed registry calls
used to leave no trace on the scheduler: each is counted by a fixed reason and logged, cut short.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import (
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

from tests.scheduler.test_restart import served_tokens
from tests.worker.daemons import SIM_WORKER, Daemon, free_port, start_scheduler, workers
from tests.worker.metrics import metrics_text

STAGES = "0-64:1,64-8192:1"
REFUSED = "cascade_scheduler_registrations_refused_total"


@dataclass
class Cluster:
    scheduler: Daemon
    workers: list[Daemon]
    metrics_port: int

    def registry(self) -> registry_pb2_grpc.WorkerRegistryStub:
        return registry_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(self.scheduler.address))

    def state(self) -> scheduler_pb2.ClusterState:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(
            grpc.insecure_channel(self.scheduler.address)
        )
        return stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)

    def placeable(self) -> list[str]:
        """Ids of the workers that are healthy and in a stage."""
        state = self.state()
        in_stages = {i for s in state.stages for i in s.worker_ids}
        return sorted(
            w.worker_id for w in state.workers if w.is_healthy and w.worker_id in in_stages
        )

    def wait_placeable(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.placeable()) == count:
                return
            time.sleep(0.1)
        raise AssertionError(f"{count} placeable workers expected: {self.state()}")

    def refusals(self) -> dict[tuple[str, str], float]:
        """`registrations_refused` by (rpc, reason), from the scheduler's exporter."""
        counts: dict[tuple[str, str], float] = {}
        for labels, n in re.findall(
            rf"^{REFUSED}\{{([^}}]*)\}} (\S+)$", metrics_text(self.metrics_port), re.M
        ):
            named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            counts[named["rpc"], named["reason"]] = float(n)
        return counts

    def refusal_lines(self) -> list[dict[str, object]]:
        return [
            e
            for e in _events(self.scheduler.log())
            if e.get("event") == "worker_registration_refused"
        ]


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    port = free_port()
    args = ["--min-workers", "2", "--stages", STAGES, "--metrics-port", str(port)]
    scheduler = start_scheduler(args, tmp_path)
    try:
        join = [*SIM_WORKER, "--scheduler", scheduler.address]
        with workers([join, join], tmp_path) as daemons:
            c = Cluster(scheduler, daemons, port)
            c.wait_placeable(2)
            yield c
    finally:
        scheduler.stop()


def test_a_goodbye_the_worker_did_not_say_leaves_it_in_the_plan(cluster: Cluster) -> None:
    ids = sorted(w.address for w in cluster.workers)  # a worker's default id is its address
    registry = cluster.registry()
    for worker_id in ids:
        with pytest.raises(grpc.RpcError) as e:
            registry.DeregisterWorker(
                registry_pb2.DeregisterWorkerRequest(worker_id=worker_id), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not draining" in (e.value.details() or "")
    assert cluster.placeable() == ids
    time.sleep(5)  # two heartbeats at least: they are not refused as leaving either
    assert cluster.placeable() == ids
    assert served_tokens(cluster.scheduler.address) == 60
    for w in cluster.workers:
        assert "scheduler_unreachable" not in w.log()
    assert cluster.refusals() == {("deregister", "not_draining"): 2.0}
    lines = cluster.refusal_lines()
    assert sorted(str(e["worker_id"]) for e in lines) == ids
    assert {(e["rpc"], e["reason"], e["code"]) for e in lines} == {
        ("deregister", "not_draining", "FAILED_PRECONDITION")
    }

    # A worker's own goodbye (SIGTERM: it marks itself draining, then deregisters) still counts.
    leaving = cluster.workers[0]
    assert leaving.stop() == 0
    assert "deregister_failed" not in leaving.log()
    cluster.wait_placeable(1)
    assert cluster.placeable() == [cluster.workers[1].address]
    assert cluster.refusals() == {("deregister", "not_draining"): 2.0}
    assert served_tokens(cluster.scheduler.address) == 60


def test_a_worker_taken_out_while_it_could_not_answer_comes_back_without_a_restart(
    cluster: Cluster,
) -> None:
    """A goodbye for a worker that does not answer (here: stopped) is honoured, as for a dead
    one; once it answers again that it is not draining, its next heartbeat puts it back."""
    stalled = cluster.workers[0]
    os.kill(stalled.process.pid, signal.SIGSTOP)
    try:
        cluster.registry().DeregisterWorker(
            registry_pb2.DeregisterWorkerRequest(worker_id=stalled.address), timeout=10
        )
        assert cluster.placeable() == [cluster.workers[1].address], "it was taken out"
    finally:
        os.kill(stalled.process.pid, signal.SIGCONT)
    cluster.wait_placeable(2, timeout=15)
    rejoined = [e for e in _events(cluster.scheduler.log()) if e.get("event") == "worker_rejoined"]
    assert [e["worker_id"] for e in rejoined] == [stalled.address]
    assert served_tokens(cluster.scheduler.address) == 60


def test_refused_registry_calls_are_counted_and_logged_cut_short(
    cluster: Cluster, tmp_path: Path
) -> None:
    with workers([SIM_WORKER], tmp_path) as (loner,):  # a worker that answers to its own id
        _refuse_some(cluster, loner)


def _refuse_some(cluster: Cluster, loner: Daemon) -> None:
    registry = cluster.registry()
    long_id = "x" * 200
    calls: list[tuple[object, str]] = [
        # twice: both counted, logged once (a refused worker tries again every second)
        (
            registry_pb2.RegisterWorkerRequest(worker_id=long_id, address="127.0.0.1:1"),
            "UNAVAILABLE",
        ),
        (
            registry_pb2.RegisterWorkerRequest(worker_id=long_id, address="127.0.0.1:1"),
            "UNAVAILABLE",
        ),
        (
            registry_pb2.RegisterWorkerRequest(worker_id="", address="127.0.0.1:1"),
            "INVALID_ARGUMENT",
        ),
        (
            registry_pb2.RegisterWorkerRequest(worker_id="w" * 5000, address="h:1"),
            "INVALID_ARGUMENT",
        ),
        # ANSI escapes that `cascade status` printed raw onto the operator's terminal.
        (
            registry_pb2.RegisterWorkerRequest(worker_id="ok\n\x1b[2J", address="h:1"),
            "INVALID_ARGUMENT",
        ),
        (
            registry_pb2.RegisterWorkerRequest(worker_id="impostor", address=loner.address),
            "FAILED_PRECONDITION",
        ),
        (registry_pb2.DeregisterWorkerRequest(worker_id="nobody"), "NOT_FOUND"),
        (registry_pb2.DeregisterWorkerRequest(worker_id="d" * 5000), "INVALID_ARGUMENT"),
    ]
    for request, code in calls:
        with pytest.raises(grpc.RpcError) as e:
            if isinstance(request, registry_pb2.RegisterWorkerRequest):
                registry.RegisterWorker(request, timeout=10)
            else:
                assert isinstance(request, registry_pb2.DeregisterWorkerRequest)
                registry.DeregisterWorker(request, timeout=10)
        assert e.value.code().name == code, request
    assert cluster.refusals() == {
        ("register", "unreachable"): 2.0,
        ("register", "invalid_argument"): 3.0,
        ("register", "id_mismatch"): 1.0,
        ("deregister", "unknown_worker"): 1.0,
        ("deregister", "invalid_argument"): 1.0,
    }
    lines = cluster.refusal_lines()
    assert sorted((str(line["rpc"]), str(line["reason"])) for line in lines) == sorted(
        [
            ("register", "unreachable"),
            ("register", "invalid_argument"),
            ("register", "invalid_argument"),
            ("register", "invalid_argument"),
            ("register", "id_mismatch"),
            ("deregister", "unknown_worker"),
            ("deregister", "invalid_argument"),
        ]
    )
    for line in lines:
        assert line["level"] == "warning" and str(line["peer"]).startswith("ipv4:127.0.0.1")
        for key in ("worker_id", "address", "error"):
            assert len(str(line[key])) <= 4 * 64 + 3, (key, line)
    unreachable = next(line for line in lines if line["reason"] == "unreachable")
    assert unreachable["worker_id"] == "x" * 64 + "..."
    log = cluster.scheduler.log()
    assert "x" * 65 not in log and "w" * 65 not in log and "d" * 65 not in log
    # Nothing the callers sent is a label value.
    assert "impostor" not in metrics_text(cluster.metrics_port)
    assert cluster.placeable() == sorted(w.address for w in cluster.workers)
