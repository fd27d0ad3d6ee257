"""How soon a `--workers` worker that was down for a while is placed on again once it serves.

Starts two `cascade-worker --engine sim` daemons (the simulated engine: what is timed is the
scheduler's reconnection, not an engine) and a scheduler over them with `--workers`, kills
one, waits `--outage` seconds, starts it again on the same port and reports the time from
its serving to the scheduler's cluster state counting it healthy (polled every 0.2 s).

    .venv/bin/python bench/bench_static_rejoin.py --outage 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scheduler.test_restart import SIM, first_of_two_static_workers_down, wait_until_workers
from tests.worker.daemons import start_worker


def rejoin_s(outage_s: float, log_dir: Path) -> float:
    round_robin = ["--policy", "round-robin"]
    with first_of_two_static_workers_down(round_robin, log_dir) as (scheduler, workers, port):
        time.sleep(outage_s)
        workers[0] = start_worker([*SIM, "--port", str(port)], log_dir)
        started = time.monotonic()
        wait_until_workers(scheduler.address, 2, timeout=180)
        return time.monotonic() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outage", type=float, default=60.0, help="seconds the worker is down")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            took = rejoin_s(args.outage, Path(tmp))
            print(f"outage {args.outage:g} s: healthy again {took:.2f} s after it served")


if __name__ == "__main__":
    main()
