"""A soak (`.venv/bin/python bench/bench_soak.py --minutes 5`): real scheduler and 3 sim worker
daemons on loopback in two stages (most requests migrate once, 16 MiB of KV each), a steady
closed-loop load of `--concurrency` clients, and the daemons' resident memory sampled from
/proc every `--sample-s` seconds. Ends with the invariant checker's verdict on every request
and the memory of each daemon after warm-up, at the end and at its peak."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scheduler.faults import KV_HEAVY_SIM, Cluster, no_requests_left
from tests.scheduler.load import Load, check
from tests.worker.daemons import Daemon


def rss_mib(d: Daemon) -> float:
    for line in Path(f"/proc/{d.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--sample-s", type=float, default=10)
    p.add_argument("--warm-up-s", type=float, default=30)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(
            Path(tmp),
            ["--min-workers", "3", "--stages", "0-256:1,256-8192:2"],
            KV_HEAVY_SIM,
            num_workers=3,
        ).start()
        assert cluster.scheduler is not None
        daemons = {"scheduler": cluster.scheduler} | {
            f"worker {k}": w for k, w in enumerate(cluster.workers)
        }
        samples: list[tuple[float, dict[str, float]]] = []
        started = time.monotonic()
        load = Load(cluster.address, a.concurrency, seed=a.seed).start()
        try:
            while (elapsed := time.monotonic() - started) < 60 * a.minutes:
                samples.append((elapsed, {n: rss_mib(d) for n, d in daemons.items()}))
                print(f"{elapsed:6.0f} s  completed {load.num_completed():6d}  ", samples[-1][1])
                time.sleep(a.sample_s)
        finally:
            outcomes = load.stop()
        seconds = time.monotonic() - started
        samples.append((seconds, {n: rss_mib(d) for n, d in daemons.items()}))
        try:
            idle = no_requests_left(cluster)
            v = check(outcomes)
        finally:
            cluster.stop()
    warm = next(s for t, s in samples if t >= a.warm_up_s)
    print(f"\n{seconds:.0f} s, {a.concurrency} clients: {v.num_requests} requests, "
          f"{v.num_completed} completed, {len(v.lost)} lost, {v.num_tokens} tokens "
          f"({v.num_tokens / seconds:.0f}/s), {v.num_migrations} migrations; idle after: {idle}")  # fmt: skip
    print("RSS MiB: daemon | first sample | after warm-up | end | peak")
    for name in daemons:
        series = [s[name] for _, s in samples]
        print(
            f"  {name} | {series[0]:.0f} | {warm[name]:.0f} | {series[-1]:.0f} | {max(series):.0f}"
        )
    for line in v.lost[:20]:
        print("  lost:", line)


if __name__ == "__main__":
    main()
