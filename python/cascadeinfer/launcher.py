"""Starts cascade daemons as subprocesses on this machine and waits until they serve; used by
`cascade up` and by the tests (which run the real daemons, never in-process stand-ins)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from cascadeinfer.daemon import PARENT_PID_ENV
from cascadeinfer.proto.v1 import worker_pb2_grpc

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
WORKER = str(BIN / "cascade-worker")
SCHEDULER = str(BIN / "cascade-scheduler")
SERVING = re.compile(r"cascade-(?:worker|scheduler) serving on (\S+) (?:engine|policy)=([\w-]+)")
OPENAI = re.compile(r"cascade-scheduler openai api on (\S+) models=(\S+)")


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    address: str
    log_path: Path
    engine: str
    """The worker's engine, or the scheduler's policy."""
    openai_url: str = ""
    """A scheduler's OpenAI base URL (http://HOST:PORT/v1) when it serves one."""
    openai_models: tuple[str, ...] = ()
    """The model names it served when it started."""

    def stub(self) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(self.address))

    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def name(self) -> str:
        """The daemon's program: cascade-worker or cascade-scheduler."""
        return Path(str(self.process.args[0])).name  # type: ignore[index]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait (the daemons drain first)."""
        self.terminate()
        return self.process.wait(timeout=timeout)

    def terminate(self) -> None:
        """SIGTERM (the daemon drains, then exits), unless it has exited."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """Whether the daemon exits within `timeout` seconds."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def spawn(
    binary: str,
    args: list[str],
    log_dir: Path,
    host: str = LOOPBACK,
    *,
    stop_with_parent: bool = False,
) -> tuple[subprocess.Popen[str], Path]:
    """Starts a daemon on a free port; both output streams go to a log file (vLLM logs on
    stdout, and an unread pipe would block the daemon). `stop_with_parent`: the daemon gets
    SIGTERM (and drains) when this process ends, however it ends (`daemon.stop_with_parent`);
    only for a parent that spawns from its main thread, since Linux sends the signal when the
    spawning thread exits."""
    log_path = log_dir / f"{Path(binary).name}-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [binary, "--host", host, "--port", "0", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=_daemon_env(stop_with_parent),
        )
    return process, log_path


def can_listen(port: int, host: str = LOOPBACK) -> bool:
    """Whether a daemon could listen on host:port now. Bound as the daemons bind, with
    SO_REUSEADDR: a port that a closed connection still holds (TIME_WAIT) is free to them, a port
    some process listens on is not. Only a hint: the port may be taken before the daemon binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _daemon_env(stop_with_parent: bool = False) -> dict[str, str]:
    """This process's environment, less VLLM_ENABLE_V1_MULTIPROCESSING: the in-process vLLM
    engine sets it to 0 in the process that hosts it (a test run, a calibration), and a worker
    inheriting that would run its multiprocess engine's model inside the engine core, not in
    a worker process per rank. Each worker's engine sets what it needs."""
    skip = ("VLLM_ENABLE_V1_MULTIPROCESSING", PARENT_PID_ENV)
    env = {k: v for k, v in os.environ.items() if k not in skip}
    if stop_with_parent:
        env[PARENT_PID_ENV] = str(os.getpid())
    return {**env, "PYTHONUNBUFFERED": "1"}


def wait_serving(process: subprocess.Popen[str], log_path: Path, timeout: float) -> Daemon:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        text = log_path.read_text()
        if m := SERVING.search(text):
            http = OPENAI.search(text)
            url, models = (http.group(1), http.group(2).split(",")) if http else ("", [])
            models = tuple(name for name in models if name != "-")
            return Daemon(process, m.group(1), log_path, m.group(2), url, models)
        time.sleep(0.1)
    end_processes([process])
    raise DaemonStartError(log_path)


STOP_GRACE_S = 10.0
"""How long a daemon that is not serving yet gets, after SIGTERM, to end what it started (a
vLLM worker: the engine core it is building) before SIGKILL."""


def end_processes(processes: list[subprocess.Popen[str]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each live process, then SIGKILL to those still there after `grace_s` (or at
    once on a second Ctrl-C). Not SIGKILL first: a vLLM worker killed while its engine starts
    leaves the engine core behind, waiting minutes for its start-up handshake."""
    live = [p for p in processes if p.poll() is None]
    try:
        for p in live:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for p in live:
            if p.poll() is None:
                p.kill()
                p.wait()


class DaemonStartError(RuntimeError):
    """A daemon exited, or did not say it serves in time. `reason` is what it said about it:
    its own error lines (`PROG: error: ...`), else the end of its log."""

    def __init__(self, log_path: Path) -> None:
        text = log_path.read_text(errors="replace")
        said = [line for line in text.splitlines() if ": error: " in line or ": fatal: " in line]
        self.log_path = log_path
        self.reason = "\n".join(said) if said else text[-3000:]
        super().__init__(f"{log_path.name} did not start serving:\n{self.reason}")


def start_many(
    binary: str,
    arg_lists: list[list[str]],
    log_dir: Path,
    timeout: float = 240,
    *,
    stop_with_parent: bool = False,
) -> list[Daemon]:
    """Starts several daemons at once (engines load in parallel) and waits for all."""
    spawned = [spawn(binary, a, log_dir, stop_with_parent=stop_with_parent) for a in arg_lists]
    daemons: list[Daemon] = []
    try:
        for process, log_path in spawned:
            daemons.append(wait_serving(process, log_path, timeout))
    except BaseException:
        end_processes([process for process, _ in spawned])
        raise
    return daemons
