"""cascade-scheduler benchmarks (`make bench-scheduler`), all against sim workers on loopback:

1. overhead: TTFT of sequential requests sent to a worker directly and through the scheduler
   (same worker, same prompts, one at a time so nothing queues); the added p50/p99.
2. streams: ghz, short outputs (8 tokens), many concurrent streams: Generate calls per second.
3. relay: ghz, long outputs (1,000 tokens) at high concurrency: output tokens per second
   streamed through the scheduler.
4. core decision latency: the scheduler's own histogram
   (`cascade_scheduler_core_decision_seconds`), read from its metrics after runs 2 and 3.

Sim workers run with `--sim-time-scale 0` in runs 2 and 3 (steps take no wall time), so the
scheduler, not the engines, is what is measured. Prints a JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from tests.worker.daemons import free_port, start_scheduler, workers
from tests.worker.streams import generate_request

GHZ = Path(sys.executable).parent / "ghz"
PY_SPY = Path(sys.executable).parent / "py-spy"
NATIVE = ["--native"] if os.environ.get("PY_SPY_NATIVE") else []
PROTO = Path(__file__).resolve().parents[1] / "proto"
SIM = ["--engine", "sim", "--sim-kv-bytes-per-token", "64", "--sim-max-model-len", "8192"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ttft_direct(address: str, prompts: list[list[int]]) -> list[float]:
    from cascadeinfer.proto.v1 import worker_pb2_grpc

    stub = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(address))
    out = []
    for i, p in enumerate(prompts):
        started = time.perf_counter()
        stream = stub.Generate(generate_request(f"direct-{i}", p, 4), timeout=30)
        next(iter(stream))
        out.append(time.perf_counter() - started)
        for _ in stream:
            pass
    return out


def ttft_scheduler(address: str, prompts: list[list[int]]) -> list[float]:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    out = []
    for p in prompts:
        request = scheduler_pb2.ClientGenerateRequest(
            prompt_token_ids=scheduler_pb2.TokenIds(ids=p),
            sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
        )
        started = time.perf_counter()
        stream = stub.Generate(request, timeout=30)
        next(iter(stream))
        out.append(time.perf_counter() - started)
        for _ in stream:
            pass
    return out


def overhead(n: int, tmp: Path) -> dict[str, float]:
    prompts = [[(i * 31 + k) % 1000 + 1 for k in range(32)] for i in range(n + 20)]
    with workers([SIM], tmp) as (worker,):
        scheduler = start_scheduler(["--workers", worker.address], tmp)
        try:
            ttft_direct(worker.address, prompts[:20])  # warm-up both paths
            ttft_scheduler(scheduler.address, prompts[:20])
            direct, via = [], []
            for k in range(20, n + 20, 50):  # interleave so drift hits both alike
                direct += ttft_direct(worker.address, prompts[k : k + 50])
                via += ttft_scheduler(scheduler.address, prompts[k : k + 50])
        finally:
            scheduler.stop()
    return {
        "requests": len(via),
        "direct_ttft_p50_ms": percentile(direct, 0.5) * 1e3,
        "direct_ttft_p99_ms": percentile(direct, 0.99) * 1e3,
        "scheduler_ttft_p50_ms": percentile(via, 0.5) * 1e3,
        "scheduler_ttft_p99_ms": percentile(via, 0.99) * 1e3,
        "added_p50_ms": (percentile(via, 0.5) - percentile(direct, 0.5)) * 1e3,
        "added_p99_ms": (percentile(via, 0.99) - percentile(direct, 0.99)) * 1e3,
        "added_mean_ms": (statistics.mean(via) - statistics.mean(direct)) * 1e3,
    }


def require_tool(path: Path, why: str, install: str) -> None:
    """Exits 2 with one line when the tool at `path` is missing, before any daemon starts:
    found only when first run, it was a FileNotFoundError traceback after the warm-up."""
    if not os.access(path, os.X_OK):
        print(
            f"{Path(sys.argv[0]).name}: error: {path.name} is not installed at {path} ({why}): "
            f"{install}",
            file=sys.stderr,
        )
        raise SystemExit(2)


def require_py_spy() -> None:
    """py-spy is not a dev dependency (`make setup` leaves it out); .venv is made by uv, with no
    pip in it, so the hint names uv as scripts/bootstrap.sh finds it."""
    uv = "uv" if shutil.which("uv") else ".venv-tools/bin/uv"
    install = f"install it with `{uv} pip install --python {sys.executable} py-spy`"
    require_tool(PY_SPY, "--profile-dir samples the scheduler with it", install)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """Samples `pid` with py-spy (`require_py_spy` says how to install it) into `out`
    (collapsed stacks, thread names included) while the block runs; nothing when `out` is
    None."""
    if out is None:
        yield
        return
    record = subprocess.Popen(
        [
            str(PY_SPY),
            "record",
            "-p",
            str(pid),
            "-r",
            "250",
            "-f",
            "raw",
            "-t",
            *NATIVE,
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # py-spy attaches
        yield
    finally:
        record.send_signal(signal.SIGINT)
        record.wait(timeout=60)


def ghz_generate(
    address: str,
    total: int,
    concurrency: int,
    data: dict[str, object],
    extra_args: list[str],
    timeout_s: float,
) -> dict[str, Any]:
    """`total` insecure SchedulerService.Generate calls with `data` through ghz, `concurrency`
    at a time; ghz's JSON report."""
    out = subprocess.run(
        [
            str(GHZ),
            "--proto",
            str(PROTO / "cascadeinfer/v1/scheduler.proto"),
            "--import-paths",
            str(PROTO),
            "--call",
            "cascadeinfer.v1.SchedulerService.Generate",
            "--insecure",
            "--total",
            str(total),
            "--concurrency",
            str(concurrency),
            *extra_args,
            "--data",
            json.dumps(data),
            "--format",
            "json",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def ghz(
    address: str, total: int, concurrency: int, max_tokens: int, scheduler_pid: int
) -> dict[str, float]:
    """One ghz run; also the scheduler's CPU time per call (what one core would sustain)."""
    cpu_before = cpu_seconds(scheduler_pid)
    data = {
        "prompt_token_ids": {"ids": list(range(1, 17))},
        "sampling": {"max_tokens": max_tokens, "ignore_eos": True},
    }
    report = ghz_generate(address, total, concurrency, data, ["--timeout", "120s"], timeout_s=900)
    cpu = cpu_seconds(scheduler_pid) - cpu_before
    seconds = report["total"] / 1e9
    ok = report["statusCodeDistribution"].get("OK", 0)
    return {
        "calls": report["count"],
        "ok": ok,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "seconds": seconds,
        "streams_per_s": ok / seconds,
        "tokens_per_s": ok * max_tokens / seconds,
        "scheduler_cpu_s": cpu,
        "scheduler_cpu_share": cpu / seconds,
        "streams_per_scheduler_cpu_s": ok / cpu,
        "tokens_per_scheduler_cpu_s": ok * max_tokens / cpu,
        "latency_p50_ms": report["latencyDistribution"][4]["latency"] / 1e6,
        "latency_p99_ms": report["latencyDistribution"][-1]["latency"] / 1e6,
    }


def decision_latency(metrics_port: int) -> dict[str, dict[str, float]]:
    """Mean and bucket-interpolated p50/p99 of each core call, from the scheduler's histogram."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in body.splitlines():
        if not line.startswith("cascade_scheduler_core_decision_seconds"):
            continue
        name, value = line.rsplit(" ", 1)
        call = name.split('call="')[1].split('"')[0]
        if "_bucket" in name:
            le = name.split('le="')[1].split('"')[0]
            buckets.setdefault(call, []).append((float(le), float(value)))
        elif name.startswith("cascade_scheduler_core_decision_seconds_sum"):
            sums[call] = float(value)
        elif name.startswith("cascade_scheduler_core_decision_seconds_count"):
            counts[call] = float(value)

    def quantile(call: str, q: float) -> float:
        target = q * counts[call]
        previous_le, previous_count = 0.0, 0.0
        for le, count in sorted(buckets[call]):
            if count >= target:
                if le == float("inf"):
                    return previous_le
                share = (target - previous_count) / max(count - previous_count, 1e-9)
                return previous_le + share * (le - previous_le)
            previous_le, previous_count = le, count
        return previous_le

    return {
        call: {
            "calls": counts[call],
            "mean_us": sums[call] / counts[call] * 1e6,
            "p50_us": quantile(call, 0.5) * 1e6,
            "p99_us": quantile(call, 0.99) * 1e6,
        }
        for call in counts
        if counts[call]
    }


def load(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    fast = [*SIM, "--sim-time-scale", "0"]
    port = free_port()
    with workers([fast] * args.workers, tmp) as daemons:
        third = args.workers // 3
        stages = f"0-256:{third},256-512:{third},512-8192:{args.workers - 2 * third}"
        scheduler = start_scheduler(
            [
                "--workers",
                ",".join(d.address for d in daemons),
                "--stages",
                stages,
                "--metrics-port",
                str(port),
                "--max-queue",
                "100000",
            ],
            tmp,
        )
        try:
            pid = scheduler.process.pid
            ghz(scheduler.address, 500, args.concurrency, 8, pid)  # warm-up
            profiles = Path(args.profile_dir) if args.profile_dir else None
            if profiles is not None:
                profiles.mkdir(parents=True, exist_ok=True)
            with py_spy(pid, profiles / "streams.txt" if profiles else None):
                streams = ghz(scheduler.address, args.calls, args.concurrency, 8, pid)
            with py_spy(pid, profiles / "relay.txt" if profiles else None):
                relay = ghz(scheduler.address, args.relay_calls, args.relay_concurrency, 1000, pid)
            decisions = decision_latency(port)
        finally:
            scheduler.stop()
    return {"streams": streams, "relay": relay, "core_decision": decisions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overhead-requests", type=int, default=500)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--relay-calls", type=int, default=200)
    p.add_argument("--relay-concurrency", type=int, default=100)
    p.add_argument(
        "--profile-dir",
        help="py-spy the scheduler during the two ghz runs into DIR/streams.txt and "
        "DIR/relay.txt (collapsed stacks; summarize with bench/profile_summary.py)",
    )
    args = p.parse_args()
    require_tool(
        GHZ, "the streams and relay runs use it", "`make setup-engine` installs it (needs go)"
    )
    if args.profile_dir:
        require_py_spy()
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {}
        if args.overhead_requests:
            result["overhead"] = overhead(args.overhead_requests, Path(tmp))
        result.update(load(args, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
