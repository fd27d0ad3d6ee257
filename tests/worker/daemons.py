"""Real cascade daemons as subprocesses on loopback, for tests (see cascadeinfer.launcher)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cascadeinfer.launcher import SCHEDULER, WORKER, Daemon, spawn, start_many, wait_serving

__all__ = [
    "SIM_WORKER",
    "Daemon",
    "free_port",
    "sim_cluster",
    "start_scheduler",
    "start_worker",
    "workers",
]

SIM_WORKER = ["--engine", "sim", "--sim-kv-bytes-per-token", "64", "--sim-max-model-len", "8192"]
"""A sim worker with small KV per token, so migrations move little over loopback."""


def free_port() -> int:
    """A port free right now, for daemons that must come back on the same address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(args: list[str], log_dir: Path, timeout: float = 240) -> Daemon:
    process, log_path = spawn(WORKER, args, log_dir)
    return wait_serving(process, log_path, timeout)


def start_scheduler(args: list[str], log_dir: Path, timeout: float = 120) -> Daemon:
    """`Daemon.engine` holds the scheduler's policy."""
    process, log_path = spawn(SCHEDULER, args, log_dir)
    return wait_serving(process, log_path, timeout)


@contextmanager
def workers(arg_lists: list[list[str]], log_dir: Path) -> Iterator[list[Daemon]]:
    """Workers started together; killed at the end whatever happened."""
    daemons = start_many(WORKER, arg_lists, log_dir)
    try:
        yield daemons
    finally:
        for d in daemons:
            d.kill()


@contextmanager
def sim_cluster(
    num_workers: int, scheduler_args: list[str], log_dir: Path
) -> Iterator[tuple[Daemon, list[Daemon]]]:
    """`num_workers` SIM_WORKER daemons and a scheduler over them (`--workers` filled in);
    everything is stopped at the end."""
    with workers([SIM_WORKER] * num_workers, log_dir) as daemons:
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(["--workers", addresses, *scheduler_args], log_dir)
        try:
            yield scheduler, daemons
        finally:
            scheduler.stop()
