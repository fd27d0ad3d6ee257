"""Fault injection on real daemons for the reliability tests and benchmarks: a cluster whose
workers register themselves (so replacements join by themselves), and the faults, each of
which returns once the cluster is whole again."""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cascadeinfer.proto.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2

from tests.scheduler.load import Load, Window, wait_until
from tests.worker.daemons import Daemon, free_port, start_scheduler, start_worker

KV_HEAVY_SIM = [
    "--engine",
    "sim",
    "--sim-kv-bytes-per-token",
    "65536",
    "--sim-max-model-len",
    "8192",
]
"""Sim workers whose KV weighs half an 8B model's: a move at 256 tokens carries 16 MiB, long
enough to be caught in flight."""
LINK_TIMEOUT_S = 3.0
"""The scheduler's --worker-link-timeout-s in the fault runs: `hang` outlasts it, `freeze`
does not (a break is found between half of it and all of it after the last answer)."""


FAULT_SCHEDULER = [
    "--min-workers",
    "3",
    "--stages",
    "0-256:1,256-8192:2",
    "--worker-link-timeout-s",
    str(LINK_TIMEOUT_S),
]
"""The scheduler of the fault runs (CI test and benchmark): three workers in two stages."""
FAULT_WORKER = [*KV_HEAVY_SIM, "--drain-timeout-s", "20"]
"""... and its workers."""


def unread_bytes(port: int) -> int:
    """Bytes queued unread on the sockets of the server on `port` (/proc/net/tcp's rx_queue):
    with the server frozen, a KV stream in flight piles up there."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, queues = cols[1], cols[4]
                if int(local.rsplit(":", 1)[1], 16) == port:
                    total += int(queues.split(":")[1], 16)
    return total


@dataclass
class Cluster:
    """A scheduler on a fixed port and `num_workers` workers registered with it."""

    log_dir: Path
    scheduler_args: list[str]
    worker_args: list[str]
    num_workers: int
    port: int = field(default_factory=free_port)
    scheduler: Daemon | None = None
    workers: list[Daemon] = field(default_factory=list)
    retired: list[Daemon] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Cluster:
        """Starts every daemon; stops those already started if one fails."""
        try:
            self.scheduler = start_scheduler(
                ["--port", str(self.port), *self.scheduler_args], self.log_dir
            )
            for _ in range(self.num_workers):
                self.add_worker()
            self.wait_whole()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Every daemon it ever started is killed, whatever happened in the block."""
        self.stop()

    def add_worker(self) -> Daemon:
        d = start_worker([*self.worker_args, "--scheduler", self.address], self.log_dir)
        self.workers.append(d)
        return d

    def state(self) -> scheduler_pb2.ClusterState:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(self.address))
        return stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)

    def wait_whole(self, timeout: float = 60) -> None:
        """Until the scheduler routes over every live worker."""

        def whole() -> bool:
            try:
                state = self.state()
            except grpc.RpcError:
                return False
            healthy = {w.worker_id for w in state.workers if w.is_healthy}
            return bool(state.stages) and healthy >= {w.address for w in self.workers}

        wait_until(whole, timeout, "the cluster did not become whole again")

    def in_stage(self, min_len: int, timeout: float = 30) -> Daemon:
        """A live worker of the stage that starts at `min_len` (waiting while the core refills
        a stage a lost worker left)."""
        deadline = time.monotonic() + timeout
        while True:
            for s in self.state().stages:
                if s.min_len == min_len:
                    for w in self.workers:
                        if w.address in s.worker_ids:
                            return w
            assert time.monotonic() < deadline, f"no live worker in the stage from {min_len}"
            time.sleep(0.1)

    def replace(self, d: Daemon) -> None:
        self.workers.remove(d)
        self.retired.append(d)
        self.add_worker()
        self.wait_whole()

    def stop(self) -> None:
        for d in [*self.workers, *self.retired]:
            d.kill()
        if self.scheduler is not None:
            self.scheduler.kill()


# --- faults ------------------------------------------------------------------------------
def freeze(d: Daemon, seconds: float) -> None:
    d.process.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    d.process.send_signal(signal.SIGCONT)


def hang(c: Cluster, d: Daemon, seconds: float = 7.0) -> None:
    """Frozen longer than the scheduler's link timeout (LINK_TIMEOUT_S): it is taken as gone
    and its requests resume elsewhere; once thawed it registers again and its copies are
    aborted as ghosts."""
    freeze(d, seconds)
    c.wait_whole()


def kill_worker(c: Cluster, d: Daemon) -> None:
    d.process.kill()
    d.process.wait()
    c.replace(d)


def drain_worker(c: Cluster, d: Daemon) -> None:
    d.process.send_signal(signal.SIGTERM)
    assert d.process.wait(timeout=60) == 0, "a draining worker exits 0"
    c.replace(d)


def kill_target_mid_transfer(c: Cluster, target: Daemon, timeout: float = 30) -> bool:
    """Kills `target` while a KV stream into it is in flight: freezes it at random moments
    until over 256 KiB wait unread on its port (else lets it go on), then kills it, so the
    transfer breaks part way. True when the scheduler then saw a move into it break."""
    assert c.scheduler is not None
    broken = f"target {target.address} refused"
    port = int(target.address.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no KV transfer into the target was seen"
        target.process.send_signal(signal.SIGSTOP)
        time.sleep(0.15)
        if unread_bytes(port) > 256 << 10:
            break
        target.process.send_signal(signal.SIGCONT)
        time.sleep(random.uniform(0.05, 0.3))
    target.process.kill()
    target.process.wait()
    c.replace(target)
    scheduler = c.scheduler

    def seen() -> bool:
        return any(
            "migration_failed" in line and broken in line for line in scheduler.log().splitlines()
        )

    # The source learns of the broken stream, and the scheduler logs it, after the kill: wait.
    deadline = time.monotonic() + 10
    while not seen() and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen()


def restart_scheduler(c: Cluster) -> None:
    """SIGKILL, then the same command on the same port; returns once the workers are back."""
    assert c.scheduler is not None
    c.scheduler.kill()
    c.scheduler = start_scheduler(["--port", str(c.port), *c.scheduler_args], c.log_dir)
    c.wait_whole()


@dataclass
class FaultRun:
    windows: list[Window] = field(default_factory=list)
    """Where a request may fail with a clear status (the scheduler's restarts)."""
    timeline: list[str] = field(default_factory=list)
    num_injected: dict[str, int] = field(default_factory=dict)


def inject_all(
    c: Cluster,
    load: Load,
    rounds: int = 1,
    between: int = 12,
    kill_mid_transfer: bool = True,
    progress_timeout_s: float = 60,
) -> FaultRun:
    """Each fault once per round, in turn, with `between` requests completed before each one
    (so every fault lands on a busy cluster), and as many after the last. `kill_mid_transfer`
    off where KV does not come in on the target's gRPC port, which that fault watches (vLLM
    workers: rank to rank, on their side channel)."""
    run = FaultRun()

    def step(name: str, fault: Callable[[], object]) -> object:
        done = load.num_completed()
        wait_until(
            lambda: load.num_completed() >= done + between,
            progress_timeout_s,
            f"no progress before {name}",
        )
        started = time.monotonic()
        result = fault()
        run.timeline.append(f"{name}: {time.monotonic() - started:.1f} s")
        run.num_injected[name] = run.num_injected.get(name, 0) + 1
        return result

    for _ in range(rounds):
        step("freeze 1 s", lambda: freeze(c.workers[0], 1.0))
        # Past the link timeout: the scheduler takes it as gone while placements to it hang.
        step("hang 7 s", lambda: hang(c, c.in_stage(0)))
        step("kill", lambda: kill_worker(c, c.workers[1]))
        step("drain", lambda: drain_worker(c, c.in_stage(256)))
        # A kill can miss: the bytes waiting on the target's port were a stream that ended
        # just then, or no move was under way. Up to three kills; one must break a move.
        for _ in range(3 if kill_mid_transfer else 0):
            hit = step(
                "kill target mid-transfer", lambda: kill_target_mid_transfer(c, c.in_stage(256))
            )
            if hit:
                break
        else:
            assert not kill_mid_transfer, "no kill broke a move into the target, of three"
        crashed = time.monotonic()
        step("restart scheduler", lambda: restart_scheduler(c))
        run.windows.append(
            Window(crashed, time.monotonic(), frozenset({grpc.StatusCode.UNAVAILABLE}))
        )
    done = load.num_completed()
    wait_until(
        lambda: load.num_completed() >= done + between,
        progress_timeout_s,
        "no progress after the faults",
    )
    return run


def no_requests_left(c: Cluster, timeout: float = 15) -> bool:
    """Whether every live worker runs nothing within `timeout` (no ghosts, no leftovers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loads = [w.stub().GetLoad(worker_pb2.GetLoadRequest(), timeout=10) for w in c.workers]
        if sum(x.num_running + x.num_waiting for x in loads) == 0:
            return True
        time.sleep(0.2)
    return False
