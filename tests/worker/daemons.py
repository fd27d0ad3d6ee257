"""Starts real cascade-worker daemons as subprocesses on loopback, for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from cascadeinfer.proto.v1 import worker_pb2_grpc

WORKER = str(Path(sys.executable).parent / "cascade-worker")
SCHEDULER = str(Path(sys.executable).parent / "cascade-scheduler")
SERVING = re.compile(r"cascade-(?:worker|scheduler) serving on (\S+) (?:engine|policy)=([\w-]+)")


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    address: str
    log_path: Path
    engine: str

    def stub(self) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(self.address))

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_scheduler(args: list[str], log_dir: Path, timeout: float = 120) -> Daemon:
    """Starts `cascade-scheduler ARGS --port 0`; `Daemon.engine` holds its policy."""
    return start_worker(args, log_dir, timeout, binary=SCHEDULER)


def start_worker(
    args: list[str], log_dir: Path, timeout: float = 240, binary: str = WORKER
) -> Daemon:
    """Starts `cascade-worker ARGS --port 0` and waits for its 'serving on' line. Both output
    streams go to a log file (vLLM logs on stdout; an unread pipe would block the daemon)."""
    log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", "0", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if m := SERVING.search(log_path.read_text()):
            return Daemon(process, m.group(1), log_path, m.group(2))
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"worker did not start: {log_path.read_text()[-3000:]}")


@contextmanager
def workers(arg_lists: list[list[str]], log_dir: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    try:
        for args in arg_lists:
            daemons.append(start_worker(args, log_dir))
        yield daemons
    finally:
        for d in daemons:
            if d.process.poll() is None:
                d.process.kill()
                d.process.wait()
