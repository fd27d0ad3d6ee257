"""Faults under load, judged by the invariant checker (tests/scheduler/load.py): real scheduler
and sim worker daemons on loopback, 12 clients sending requests that cross a stage bound (so
most migrate), and one fault after another, each once the cluster is whole again:

- a worker frozen (SIGSTOP) for 1 s, then resumed (within the link timeout: streams stall);
- the first stage's worker frozen for 7 s (past the 3 s link timeout: taken as gone while
  placements to it hang; its requests resume elsewhere; thawed, it registers again);
- a worker killed (SIGKILL);
- a worker drained (SIGTERM): its requests move away;
- a migration target killed while a KV transfer into it is in flight;
- the scheduler killed and restarted on the same port.

Every request must end with all its tokens, in order, equal to an unmoved run; only those in
flight at the scheduler's crash (or sent while it was down) may instead fail, with UNAVAILABLE,
and none may hang. Afterwards no worker runs anything (no ghosts)."""

from __future__ import annotations

from pathlib import Path

from tests.scheduler.faults import (
    KV_HEAVY_SIM,
    LINK_TIMEOUT_S,
    Cluster,
    inject_all,
    no_requests_left,
)
from tests.scheduler.load import Load, check

SCHEDULER = [
    "--min-workers",
    "3",
    "--stages",
    "0-256:1,256-8192:2",
    "--worker-link-timeout-s",
    str(LINK_TIMEOUT_S),
]
WORKER = [*KV_HEAVY_SIM, "--drain-timeout-s", "20"]


def test_no_request_is_lost_to_worker_and_scheduler_faults(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, SCHEDULER, WORKER, num_workers=3).start()
    load = Load(cluster.address, concurrency=12, seed=14).start()
    try:
        run = inject_all(cluster, load)
    finally:
        outcomes = load.stop()
    try:
        verdict = check(outcomes, run.windows)
        print(
            f"{verdict.num_requests} requests: {verdict.num_completed} completed, "
            f"{verdict.num_failed_clearly} failed clearly at the scheduler's crash "
            f"({verdict.num_failed_with_tokens} of them running), "
            f"{len(verdict.lost)} lost; {verdict.num_migrations} migrations; {run.timeline}"
        )
        assert verdict.lost == [], verdict.lost[:10]
        assert verdict.num_completed >= 60
        assert verdict.num_migrations >= 30, "requests crossed the stage bound"
        assert no_requests_left(cluster), "requests still run on the workers after the load ended"
    finally:
        cluster.stop()
