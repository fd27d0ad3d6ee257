"""Faults under load, judged by the invariant checker (tests/scheduler/load.py): real scheduler
and sim worker daemons on loopback, 12 clients sending requests that cross a stage bound (so
most migrate), and one fault after another, each once the cluster is whole again:

- a worker frozen (SIGSTOP) for 2 s, then resumed;
- a worker killed (SIGKILL);
- a worker drained (SIGTERM): its requests move away;
- a migration target killed while a KV transfer into it is in flight;
- the scheduler killed and restarted on the same port.

Every request must end with all its tokens, in order, equal to an unmoved run; only those in
flight at the scheduler's crash (or sent while it was down) may instead fail, with UNAVAILABLE,
and none may hang. Afterwards no worker runs anything (no ghosts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
from cascadeinfer.proto.v1 import worker_pb2

from tests.scheduler import faults
from tests.scheduler.faults import KV_HEAVY_SIM, Cluster
from tests.scheduler.load import Load, Window, check, wait_until
from tests.worker.daemons import Daemon

SCHEDULER = ["--min-workers", "3", "--stages", "0-256:1,256-8192:2"]
WORKER = [*KV_HEAVY_SIM, "--drain-timeout-s", "20"]


def test_no_request_is_lost_to_worker_and_scheduler_faults(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, SCHEDULER, WORKER, num_workers=3).start()
    load = Load(cluster.address, concurrency=12, seed=14).start()
    windows: list[Window] = []
    timeline: list[str] = []

    def target() -> Daemon:
        return cluster.in_stage(256)

    def run(name: str, fault: Callable[[], object]) -> object:
        # Let load flow between faults, so each one lands on a busy cluster.
        done = load.num_completed()
        wait_until(lambda: load.num_completed() >= done + 12, 60, f"no progress before {name}")
        started = time.monotonic()
        result = fault()
        timeline.append(f"{name}: {time.monotonic() - started:.1f} s")
        return result

    try:
        run("freeze", lambda: faults.freeze(cluster.workers[0], 2.0))
        run("kill", lambda: faults.kill_worker(cluster, cluster.workers[1]))
        run("drain", lambda: faults.drain_worker(cluster, cluster.in_stage(256)))
        hit = run("kill target", lambda: faults.kill_target_mid_transfer(cluster, target()))
        assert hit, "a move into the killed target broke part way"
        crashed = time.monotonic()
        run("restart scheduler", lambda: faults.restart_scheduler(cluster))
        windows.append(Window(crashed, time.monotonic(), frozenset({grpc.StatusCode.UNAVAILABLE})))
        done = load.num_completed()
        wait_until(lambda: load.num_completed() >= done + 12, 60, "no progress after the restart")
    finally:
        outcomes = load.stop()
    try:
        verdict = check(outcomes, windows)
        print(
            f"{verdict.num_requests} requests: {verdict.num_completed} completed, "
            f"{verdict.num_failed_clearly} failed clearly at the scheduler's crash "
            f"({verdict.num_failed_with_tokens} of them running), "
            f"{len(verdict.lost)} lost; {verdict.num_migrations} migrations; {timeline}"
        )
        assert verdict.lost == [], verdict.lost[:10]
        assert verdict.num_completed >= 60
        assert verdict.num_migrations >= 30, "requests crossed the stage bound"

        def idle() -> bool:
            loads = [
                w.stub().GetLoad(worker_pb2.GetLoadRequest(), timeout=10) for w in cluster.workers
            ]
            return sum(x.num_running + x.num_waiting for x in loads) == 0

        wait_until(idle, 15, "requests still run on the workers after the load ended")
    finally:
        cluster.stop()
