"""TLS handshakes on the scheduler's HTTPS API (`--tls-cert` with `--http-port`), against a
real daemon on loopback: a connection that never finishes its handshake is closed after the
handshake timeout (it was held about 60 s, asyncio's default), and meanwhile others are served;
handshakes under way count against the connection bound (they counted against none)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cascadeinfer.scheduler.openai.protocol import EXCESS_CONNECTIONS
from cascadeinfer.worker.tiny_model import write_tiny_llama

from tests.scheduler.certs import make_certs
from tests.worker.daemons import Daemon, start_scheduler

REQUEST_TIMEOUT_S = 2.0
"""--http-request-timeout-s, which bounds the handshake too where it is under 10 s."""

# The start of a TLS 1.2 ClientHello record that never gets its rest.
PARTIAL_CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + b"\x00" * 16


@dataclass
class Https:
    scheduler: Daemon
    host: str
    port: int
    client: httpx.Client

    def models(self) -> httpx.Response:
        return self.client.get(f"https://{self.host}:{self.port}/v1/models", timeout=10)

    def models_status(self) -> int | None:
        """`models()`'s status, or None for a connection reset at its accept: the server has
        not yet seen closed connections leave, so their slots still count."""
        try:
            return self.models().status_code
        except httpx.ConnectError:
            return None


@contextmanager
def _https(tmp: Path, *extra: str) -> Iterator[Https]:
    certs = make_certs(tmp / "certs")
    model_dir = write_tiny_llama(tmp / "model")
    args = ["--tokenizer", str(model_dir), "--http-port", "0", "--min-workers", "1", *extra]
    args += ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-ca", str(certs.ca)]
    scheduler = start_scheduler(args, tmp)
    try:
        host, port = scheduler.openai_url.removeprefix("https://").split("/")[0].split(":")
        client = httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca)))
        with client:
            yield Https(scheduler, host, int(port), client)
    finally:
        scheduler.kill()


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Https]:
    with _https(
        tmp_path_factory.mktemp("https"), "--http-request-timeout-s", str(REQUEST_TIMEOUT_S)
    ) as h:
        yield h


def _connect(https: Https, first_bytes: bytes = b"") -> socket.socket:
    s = socket.create_connection((https.host, https.port), timeout=30)
    if first_bytes:
        s.sendall(first_bytes)
    return s


def _closed_after(s: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes `s` (reading and dropping whatever it sends)."""
    start = time.monotonic()
    s.settimeout(limit_s)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit_s} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_handshake_that_never_finishes_is_closed_after_the_timeout(https: Https) -> None:
    silent = _connect(https)  # accepted, and not one byte of a ClientHello
    stalled = _connect(https, PARTIAL_CLIENT_HELLO)
    try:
        assert https.models().status_code == 200  # served while those wait
        for s in (silent, stalled):
            took = _closed_after(s, 15)
            assert took < REQUEST_TIMEOUT_S + 3, took
        assert https.models().status_code == 200
    finally:
        silent.close()
        stalled.close()


def _is_closed(s: socket.socket) -> bool:
    """Whether the server closed `s` (looked at without waiting)."""
    s.setblocking(False)  # with a timeout, Python waits for input before it reads
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_handshakes_under_way_count_against_the_connection_bound(tmp_path: Path) -> None:
    """Past `--http-max-connections` and the EXCESS_CONNECTIONS taken in beyond it to be
    answered 503, a connection is closed as it comes: silent TLS handshakes counted too (they
    counted against nothing, and a flood was bounded only by the handshake timeout)."""
    limit, extra = 4, 40
    with _https(tmp_path, "--http-max-connections", str(limit)) as https:
        silent = [_connect(https) for _ in range(limit + EXCESS_CONNECTIONS + extra)]
        try:
            time.sleep(1)
            closed = sum(_is_closed(s) for s in silent)
            # Each closed at its accept, long before the 10 s handshake timeout.
            assert extra <= closed <= extra + 5, closed
        finally:
            for s in silent:
                s.close()
        deadline = time.monotonic() + 10
        while https.models_status() != 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # their slots are free again once they closed
        assert https.models().status_code == 200


def test_plain_http_to_the_https_port_is_400(https: Https) -> None:
    """nginx's answer ("The plain HTTP request was sent to HTTPS port"), in the OpenAI error
    shape; it was an empty reply (the TLS layer closed the socket on the first bytes)."""
    s = _connect(https, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        s.settimeout(5)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"plain HTTP was sent to this HTTPS port" in answer
    assert https.models().status_code == 200
