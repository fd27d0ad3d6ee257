"""Faults under load, longer than the CI test (`.venv/bin/python bench/bench_faults.py`): real
scheduler and sim worker daemons on loopback, `--concurrency` clients, and `--rounds` rounds of
every fault of tests/scheduler/test_faults_under_load.py (a worker frozen 2 s, killed, drained;
a migration target killed with a KV stream into it in flight; the scheduler restarted). Every
request is judged by the invariant checker (tests/scheduler/load.py); prints the counts."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scheduler.faults import (
    KV_HEAVY_SIM,
    LINK_TIMEOUT_S,
    Cluster,
    inject_all,
    no_requests_left,
)
from tests.scheduler.load import Load, check


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--log-dir", type=Path, help="keep the daemons' logs here (default: dropped)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.log_dir is not None:
            a.log_dir.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(
            a.log_dir or Path(tmp),
            [
                "--min-workers",
                "3",
                "--stages",
                "0-256:1,256-8192:2",
                "--worker-link-timeout-s",
                str(LINK_TIMEOUT_S),
            ],
            [*KV_HEAVY_SIM, "--drain-timeout-s", "20"],
            num_workers=3,
        ).start()
        started = time.monotonic()
        load = Load(cluster.address, a.concurrency, seed=a.seed).start()
        try:
            run = inject_all(cluster, load, rounds=a.rounds)
        finally:
            outcomes = load.stop()
        seconds = time.monotonic() - started
        try:
            v = check(outcomes, run.windows)
            idle = no_requests_left(cluster)
        finally:
            cluster.stop()
    print(f"{a.rounds} rounds, {a.concurrency} clients, {seconds:.0f} s under load")
    print("faults injected:", ", ".join(f"{k} x{n}" for k, n in run.num_injected.items()))
    print(
        f"requests {v.num_requests}: completed {v.num_completed} (exact tokens), "
        f"failed with UNAVAILABLE at a scheduler crash {v.num_failed_clearly} "
        f"({v.num_failed_with_tokens} of them running, the rest sent while it was down), "
        f"lost {len(v.lost)}"
    )
    print(f"tokens {v.num_tokens}, migrations {v.num_migrations}, workers idle after: {idle}")
    for line in v.lost[:20]:
        print("  lost:", line)


if __name__ == "__main__":
    main()
