"""A cluster spread over emulated hosts (tests/scheduler/hosts.py) under client load, with one
worker's link cut for a while: the run the CI test and bench/bench_emulated_hosts.py share.

The scheduler and each worker sit on their own host; clients run on the scheduler's host (as a
front end would), so every step feed and every KV transfer crosses a shaped link. Daemons use
the cluster's bearer token (they bind non-loopback addresses). The result holds the invariant
checker's verdict and the migrations the scheduler logged, with the bytes, pause and total
time each worker reported for them.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascadeinfer.launcher import SCHEDULER, WORKER, Daemon

from tests.scheduler.faults import KV_HEAVY_SIM
from tests.scheduler.hosts import emulated_hosts
from tests.scheduler.load import wait_until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AcrossHosts:
    shaping: str = ""
    verdict: dict[str, Any] = field(default_factory=dict)
    migrations: list[dict[str, Any]] = field(default_factory=list)
    """The scheduler's `migrated` events: num_bytes, pause_s, total_s, timestamp."""
    cut: tuple[str, float, float] = ("", 0.0, 0.0)
    """Which host's link was cut, when (seconds into the load) and for how long (-1: for good)."""
    logs: dict[str, str] = field(default_factory=dict)
    """Each daemon's log, by name (cascade-scheduler-sched, cascade-worker-w1, ...)."""

    def summary(self) -> dict[str, Any]:
        kv = [m for m in self.migrations if m["num_bytes"]]
        rates = [m["num_bytes"] / m["total_s"] for m in kv if m["total_s"] > 0]
        pauses = sorted(m["pause_s"] for m in self.migrations)
        v = self.verdict
        return {
            "shaping": self.shaping,
            "requests": v["num_requests"],
            "completed": v["num_completed"],
            "lost": len(v["lost"]),
            "tokens": v["num_tokens"],
            "load_s": round(v["seconds"], 1),
            "link_cut": f"{self.cut[0]} at {self.cut[1]:.0f} s for "
            + (f"{self.cut[2]:.0f} s" if self.cut[2] >= 0 else "good"),
            "longest_stream_stall_s": round(v["max_gap_s"], 1),
            "migrations": len(self.migrations),
            "mib_per_move": round(statistics.median(m["num_bytes"] for m in kv) / 2**20, 1)
            if kv
            else 0,
            "rate_mib_s_p50": round(statistics.median(rates) / 2**20) if rates else 0,
            "pause_ms_p50": round(1000 * statistics.median(pauses), 1) if pauses else 0,
            "pause_ms_p99": round(1000 * pauses[int(0.99 * (len(pauses) - 1))], 1) if pauses else 0,
            "total_ms_p50": round(1000 * statistics.median(m["total_s"] for m in kv), 1)
            if kv
            else 0,
        }


def migrations_in(log: str) -> list[dict[str, Any]]:
    events = []
    for line in log.splitlines():
        if '"event": "migrated"' in line:
            e = json.loads(line)
            events.append({k: e[k] for k in ("num_bytes", "pause_s", "total_s", "timestamp")})
    return events


def run_across_hosts(
    log_dir: Path,
    duration_s: float,
    cut_at_s: float,
    cut_for_s: float | None,
    concurrency: int = 8,
    num_workers: int = 3,
    link_timeout_s: float = 10.0,
    orphan_timeout_s: float = 30.0,
    stream_deadline_s: float = 90.0,
) -> AcrossHosts:
    """`cut_for_s` None: the link stays cut until the load ends (a host lost for good); its
    worker's log then tells what became of its requests (`worker_logs`)."""
    token = log_dir / "token"
    token.write_text(secrets.token_hex(16))
    auth = ["--auth-token-file", str(token)]
    names = ["sched", *(f"w{k}" for k in range(1, num_workers + 1))]
    result = AcrossHosts()
    daemons: list[Daemon] = []
    with emulated_hosts(names) as hosts:
        result.shaping = hosts.shaping
        try:
            stages = f"0-256:1,256-8192:{num_workers - 1}"
            scheduler = hosts.spawn(
                "sched", SCHEDULER, [*auth, "--min-workers", str(num_workers), "--stages", stages,
                                     "--worker-link-timeout-s", str(link_timeout_s)],
                log_dir,
            )  # fmt: skip
            daemons.append(scheduler)
            join = [*KV_HEAVY_SIM, *auth, "--scheduler", scheduler.address,
                    "--link-timeout-s", str(link_timeout_s),
                    "--orphan-timeout-s", str(orphan_timeout_s)]  # fmt: skip
            for name in names[1:]:
                daemons.append(hosts.spawn(name, WORKER, join, log_dir))
            wait_until(lambda: "policy_ready" in scheduler.log(), 60, "workers did not register")
            out = log_dir / "verdict.json"
            client = subprocess.Popen(
                hosts.command("sched", [
                    sys.executable, "-m", "tests.scheduler.remote_load",
                    "--address", scheduler.address, "--auth-token-file", str(token),
                    "--concurrency", str(concurrency), "--duration", str(duration_s),
                    "--out", str(out), "--stream-deadline", str(stream_deadline_s),
                ]),
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "load running", "the load never ran"
            running = time.monotonic()
            time.sleep(cut_at_s)
            cut = names[
                1
            ]  # the first stage's worker (it registers first): every request starts there
            hosts.cut(cut)
            result.cut = (cut, time.monotonic() - running, cut_for_s or -1)
            if cut_for_s is not None:
                time.sleep(cut_for_s)
                hosts.restore(cut)
            assert client.wait(timeout=duration_s + 200) == 0, "the load process failed"
            result.verdict = json.loads(out.read_text())
            result.migrations = migrations_in(scheduler.log())
            result.logs = {d.log_path.stem: d.log() for d in daemons}
        finally:
            for d in daemons:
                d.kill()
    return result
