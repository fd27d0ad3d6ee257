"""How long a vLLM worker's processes outlive it when it is signalled during its start.

Starts `cascade-worker --engine vllm` (the built-in tiny model), waits until vLLM's engine core
shows among its descendants (still waiting for its start-up handshake), sends the signal, and
reports when every process under the daemon has ended (zombies count as ended). SIGKILL is the
case the helper guard covers (`helper_guard.py`), SIGTERM and SIGINT the daemon's own stop.

    .venv/bin/python bench/bench_start_kill.py --signal KILL --repeats 3
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

import psutil
from cascadeinfer.launcher import WORKER, spawn


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def one_run(sig: signal.Signals, wait_s: float) -> tuple[float, float, int, list[str]]:
    """(seconds from start to the signal, seconds from the signal to the last descendant's
    end, descendants, those still running after `wait_s`)."""
    process, _ = spawn(WORKER, ["--engine", "vllm"], Path(tempfile.mkdtemp()))
    daemon = psutil.Process(process.pid)
    started = time.monotonic()
    try:
        while True:
            helpers = daemon.children(recursive=True)
            titles = " ".join(" ".join(p.cmdline()) for p in _running(helpers))
            if "EngineCore" in titles or "spawn_main" in titles:
                break
            if process.poll() is not None or time.monotonic() - started > 180:
                raise RuntimeError("no engine core appeared")
            time.sleep(0.1)
        process.send_signal(sig)
        signalled = time.monotonic()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    while _running(helpers) and time.monotonic() - signalled < wait_s:
        time.sleep(0.05)
    left = [f"{p.pid} {p.name()}" for p in _running(helpers)]
    for p in _running(helpers):
        p.kill()
    return signalled - started, time.monotonic() - signalled, len(helpers), left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--wait-s", type=float, default=60.0, help="how long to wait for the processes to end"
    )
    args = parser.parse_args()
    sig = signal.Signals[f"SIG{args.signal}"]
    for k in range(args.repeats):
        into, ended, count, left = one_run(sig, args.wait_s)
        outcome = f"still running after {args.wait_s:.0f} s: {left}" if left else "none left"
        print(
            f"run {k + 1}: SIG{args.signal} {into:.1f} s into the start; {count} processes under"
            f" the daemon, the last ended {ended:.2f} s after the signal ({outcome})",
            flush=True,
        )


if __name__ == "__main__":
    main()
