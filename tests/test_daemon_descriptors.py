"""Connections that hold descriptors and send nothing cannot starve a daemon for long: a gRPC
port closes them after its handshake timeout, and those that finished it once they carry no
call for a while; it holds at most a quarter of the descriptors; the daemons raise their soft
open-files limit to the hard one, and the HTTP front leaves half the descriptors to the other
ports."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cascadeinfer.daemon import (
    HANDSHAKE_TIMEOUT_MS,
    IDLE_CONNECTION_MS,
    STREAMS_PER_CONNECTION,
    connection_limit_options,
)
from cascadeinfer.health_port import HEALTH_STREAMS_PER_CONNECTION
from cascadeinfer.launcher import SCHEDULER, Daemon, _daemon_env, wait_serving
from cascadeinfer.scheduler.openai.protocol import EXCESS_CONNECTIONS
from cascadeinfer.scheduler.openai.server import connection_limit
from cascadeinfer.worker.tiny_model import write_tiny_tokenizer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import h2_raw
from tests.worker.daemons import free_port, start_scheduler


def _idle_connections(address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]


def _answers(address: str) -> bool:
    """Whether the gRPC health check answers at all (a scheduler without workers is not
    serving, and says so)."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )


def test_a_grpc_connection_that_sends_nothing_is_closed_after_the_handshake_timeout(
    tmp_path: Path,
) -> None:
    scheduler = start_scheduler([], tmp_path)
    conns = _idle_connections(scheduler.address, 20)
    try:
        opened = time.monotonic()
        for c in conns:
            c.settimeout(HANDSHAKE_TIMEOUT_MS / 1000 + 10 - (time.monotonic() - opened))
            with contextlib.suppress(ConnectionResetError):
                while c.recv(4096):  # the server's settings, then nothing until it closes
                    pass
        closed_after = time.monotonic() - opened
        assert closed_after > HANDSHAKE_TIMEOUT_MS / 2000, "closed by the timeout, not at once"
        assert _answers(scheduler.address)
    finally:
        for c in conns:
            c.close()
        scheduler.kill()


def _start_scheduler_limited_to(limit: int, tmp_path: Path) -> Daemon:
    """A scheduler (with its HTTP front) whose open-files limit, hard and soft, is `limit`."""
    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    log_path = tmp_path / "scheduler.log"
    args = ["--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--tokenizer", str(tokenizer)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [SCHEDULER, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=_daemon_env(),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
    return wait_serving(process, log_path, 120)


def _http_answers(scheduler: Daemon) -> bool:
    """Whether the HTTP front answers at all (503 without workers)."""
    url = scheduler.openai_url.removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError as e:
        return e.code == 503


def test_idle_grpc_connections_are_bounded_and_closed(tmp_path: Path) -> None:
    """Connections that finish the HTTP/2 handshake and then carry no call: at most a quarter
    of the descriptors are taken (new gRPC clients are refused meanwhile, the HTTP front and
    everything else keep theirs), and each is closed after IDLE_CONNECTION_MS. Both were
    unbounded: 1,100 of them took every descriptor of a scheduler limited to 1,024."""
    assert connection_limit_options(1024) == [("grpc.max_allowed_incoming_connections", 256)]
    assert connection_limit_options(resource.RLIM_INFINITY)[0][1] == 10_000
    limit = 1024
    scheduler = _start_scheduler_limited_to(limit, tmp_path)
    port = int(scheduler.address.rsplit(":", 1)[1])
    conns: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(limit // 4 + 100):
            with contextlib.suppress(ConnectionError):  # past the bound: closed as it arrives
                conns.append(h2_raw.connect(port))
        time.sleep(1.0)
        descriptors = len(os.listdir(f"/proc/{scheduler.process.pid}/fd"))
        assert descriptors < limit // 2, "the connections past the bound were closed"
        assert _http_answers(scheduler)
        with pytest.raises(grpc.RpcError):
            _answers(scheduler.address)  # every gRPC slot is taken, for now
        closed = [h2_raw.is_closed_by_peer(c, IDLE_CONNECTION_MS / 1000 + 15) for c in conns]
        assert all(closed)
        assert time.monotonic() - opened > IDLE_CONNECTION_MS / 2000, "closed for idling"
        assert _answers(scheduler.address)
    finally:
        for c in conns:
            c.close()
        scheduler.kill()


def test_a_connection_carries_a_bounded_number_of_calls_at_once(tmp_path: Path) -> None:
    """gRPC's default is no bound: streams opened and reset at once ("rapid reset") each
    started a call in Python, and four such connections took a scheduler from 79 to 236 MB.
    The bound is what the server announces in its first SETTINGS (MAX_CONCURRENT_STREAMS),
    which gRPC's core enforces before Python sees a stream; the health port keeps its own."""
    health_port = free_port()
    scheduler = start_scheduler(["--health-port", str(health_port)], tmp_path)
    try:
        port = int(scheduler.address.rsplit(":", 1)[1])
        assert h2_raw.server_settings(port)[3] == STREAMS_PER_CONNECTION
        assert h2_raw.server_settings(health_port)[3] == HEALTH_STREAMS_PER_CONNECTION
    finally:
        scheduler.kill()


def test_the_http_front_keeps_half_the_descriptors_for_the_other_ports(tmp_path: Path) -> None:
    assert connection_limit(8192, 1024) == 512 - EXCESS_CONNECTIONS
    assert connection_limit(8192, 65536) == 8192
    assert connection_limit(8192, resource.RLIM_INFINITY) == 8192
    assert connection_limit(8192, 300) == 1
    # A scheduler whose hard limit is 1,024 (systemd's default soft limit) serves HTTP to 256
    # connections, says so, and its gRPC port answers with every HTTP slot and overflow taken.
    limit = 1024
    scheduler = _start_scheduler_limited_to(limit, tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns: list[socket.socket] = []
    try:
        assert "http_max_connections_lowered" in scheduler.log()
        assert f'"allowed": {limit // 2 - EXCESS_CONNECTIONS}' in scheduler.log()
        http = scheduler.openai_url.removeprefix("http://").removesuffix("/v1")
        conns = _idle_connections(http, 2 * limit // 2)
        assert _answers(scheduler.address)
    finally:
        for c in conns:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        scheduler.kill()


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    code = "from cascadeinfer.daemon import raise_descriptor_limit; print(raise_descriptor_limit())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)),
    )
    assert out.stdout.strip() == "4096"
