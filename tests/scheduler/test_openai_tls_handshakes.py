"""TLS handshakes on the scheduler's HTTPS API (`--tls-cert` with `--http-port`), against a
real daemon on loopback: a connection that never finishes its handshake is closed after the
handshake timeout (it was held about 60 s, asyncio's default), and meanwhile others are served."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
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


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Https]:
    tmp = tmp_path_factory.mktemp("https")
    certs = make_certs(tmp / "certs")
    model_dir = write_tiny_llama(tmp / "model")
    args = ["--tokenizer", str(model_dir), "--http-port", "0", "--min-workers", "1"]
    args += ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-ca", str(certs.ca)]
    args += ["--http-request-timeout-s", str(REQUEST_TIMEOUT_S)]
    scheduler = start_scheduler(args, tmp)
    try:
        host, port = scheduler.openai_url.removeprefix("https://").split("/")[0].split(":")
        client = httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca)))
        with client:
            yield Https(scheduler, host, int(port), client)
    finally:
        scheduler.kill()


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
