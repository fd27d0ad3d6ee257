"""The scrape endpoint (`--metrics-port`) of both daemons: idle connections are closed, the
connections served at once are bounded, and a port in use is a clear configuration error."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from cascadeinfer import metrics_http
from cascadeinfer.metrics_http import serve_metrics
from prometheus_client import CollectorRegistry, Counter


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("probe_total", "a counter", registry=registry).inc()
    return registry


def test_idle_connections_are_closed_and_scrapes_still_served() -> None:
    server = serve_metrics("127.0.0.1", 0, _registry(), read_timeout_s=0.5)
    port = server.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for s in idle:
            s.settimeout(5)
        started = time.monotonic()
        for s in idle:
            assert s.recv(1) == b"", "the server closed the idle connection"
        assert time.monotonic() - started < 4
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"probe_total 1.0" in body
    finally:
        server.shutdown()


def test_connections_past_the_bound_are_closed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 3)
    server = serve_metrics("127.0.0.1", 0, _registry(), read_timeout_s=30)
    port = server.server_address[1]
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert extra.recv(1) == b"", "a fourth connection is not held"
        for s in held:
            s.close()
        time.sleep(0.3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
        assert b"probe_total" in body
    finally:
        server.shutdown()


def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics("127.0.0.1", port, _registry())
