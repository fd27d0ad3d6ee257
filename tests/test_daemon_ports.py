"""A daemon started on a port already taken stops with a clear error and exit status 2: never
a traceback, and never a second server quietly sharing the port with the first (gRPC binds
with SO_REUSEPORT by default, so the kernel would spread new connections over both: clients
and workers would reach a scheduler or worker other than the one they were given)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from cascadeinfer.launcher import SCHEDULER, WORKER
from cascadeinfer.worker.tiny_model import write_tiny_tokenizer

from tests.worker.daemons import SIM_WORKER, start_scheduler, start_worker


def run(binary: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def assert_refused(out: subprocess.CompletedProcess[str], prog: str, address: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{prog}: error: cannot listen on {address}" in out.stderr
    assert "Traceback" not in out.stderr
    assert "serving on" not in out.stdout


def test_a_port_another_daemon_serves_on_is_refused(tmp_path: Path) -> None:
    worker = start_worker(SIM_WORKER, tmp_path)
    scheduler = start_scheduler(["--port", "0"], tmp_path)
    try:
        for binary, prog, taken in [
            (WORKER, "cascade-worker", worker.address),
            (SCHEDULER, "cascade-scheduler", scheduler.address),
        ]:
            args = SIM_WORKER if binary == WORKER else []
            port = taken.rsplit(":", 1)[1]
            out = run(binary, [*args, "--host", "127.0.0.1", "--port", port])
            assert_refused(out, prog, taken)
    finally:
        scheduler.kill()
        worker.kill()


@pytest.mark.parametrize(
    ("binary", "prog"), [(WORKER, "cascade-worker"), (SCHEDULER, "cascade-scheduler")]
)
def test_a_port_another_program_listens_on_is_refused(binary: str, prog: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = SIM_WORKER if binary == WORKER else []
        out = run(binary, [*args, "--host", "127.0.0.1", "--port", str(port)])
    assert_refused(out, prog, f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("binary", "prog"), [(WORKER, "cascade-worker"), (SCHEDULER, "cascade-scheduler")]
)
def test_a_metrics_port_in_use_is_refused(binary: str, prog: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = SIM_WORKER if binary == WORKER else []
        out = run(
            binary, [*args, "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port)]
        )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{prog}: error: cannot serve metrics on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_http_port_in_use_is_refused_without_a_traceback(tmp_path: Path) -> None:
    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run(
            SCHEDULER,
            [
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--http-port",
                str(port),
                "--tokenizer",
                str(tokenizer),
            ],
        )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("binary", "prog"), [(WORKER, "cascade-worker"), (SCHEDULER, "cascade-scheduler")]
)
def test_a_metrics_port_out_of_range_is_refused_without_a_traceback(binary: str, prog: str) -> None:
    """It was the socket module's OverflowError, a traceback and exit status 1, once the
    daemon had started (docs/reliability.md, "A tenth adversarial probe")."""
    args = SIM_WORKER if binary == WORKER else []
    out = run(binary, [*args, "--port", "0", "--metrics-port", "99999"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{prog}: error: metrics_port = 99999: must be in [0, 65535]" in out.stderr
    assert "Traceback" not in out.stderr
