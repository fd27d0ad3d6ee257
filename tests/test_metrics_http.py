"""The scrape endpoint (`--metrics-port`) of both daemons: idle connections are closed, the
connections served at once are bounded, renders are bounded however fast scrapes come, and a
port in use is a clear configuration error."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from cascadeinfer import metrics_http
from cascadeinfer.metrics_http import serve_metrics
from cascadeinfer.metrics_page import RENDER_BURST, RENDERS_PER_S
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric


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


class CountingRegistry(CollectorRegistry):
    """Counts its collections: each render of a page collects once."""

    num_collects = 0

    def collect(self) -> Iterator[Metric]:
        self.num_collects += 1
        yield from super().collect()


def test_a_burst_of_scrapes_renders_the_page_a_bounded_number_of_times() -> None:
    # Each scrape rendered the registry anew under the GIL, beside the daemon's event loop:
    # 32 connections scraping without pause cost it as much as a flood of the API's /metrics.
    registry = CountingRegistry()
    counter = Counter("probe", "a counter", registry=registry)
    server = serve_metrics("127.0.0.1", 0, registry)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"

    def scrape_many() -> None:
        for _ in range(25):
            assert b"probe_total" in urllib.request.urlopen(url, timeout=10).read()

    try:
        started = time.monotonic()
        scrapers = [threading.Thread(target=scrape_many) for _ in range(8)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join()
        took = time.monotonic() - started
        renders = registry.num_collects
        assert renders <= RENDER_BURST + RENDERS_PER_S * took + 1, (renders, took)
        # The page follows the registry once a render is due again.
        counter.inc()
        time.sleep(1 / RENDERS_PER_S + 0.1)
        assert b"probe_total 1.0" in urllib.request.urlopen(url, timeout=10).read()
        # Prometheus asks for OpenMetrics, gzipped; it gets that, as from prometheus_client.
        asked = urllib.request.Request(
            url,
            headers={
                "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                "Accept-Encoding": "gzip",
            },
        )
        with urllib.request.urlopen(asked, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(r.read()).endswith(b"# EOF\n")
    finally:
        server.shutdown()


def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics("127.0.0.1", port, _registry())


def test_clients_dripping_a_request_head_lose_their_slots_at_the_head_deadline() -> None:
    # A byte every 0.1 s never trips the per-read timeout (1 s): before the head deadline,
    # MAX_CONNECTIONS such clients held every slot for as long as they kept dripping, and
    # every scrape was refused.
    head_timeout_s = 1.5
    server = serve_metrics(
        "127.0.0.1", 0, _registry(), read_timeout_s=1.0, head_timeout_s=head_timeout_s
    )
    port = server.server_address[1]
    drip = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Drip: " + b"a" * 1000
    drippers = [
        socket.create_connection(("127.0.0.1", port)) for _ in range(metrics_http.MAX_CONNECTIONS)
    ]
    started = time.monotonic()
    closed_after: dict[int, float] = {}
    stop = threading.Event()

    def keep_dripping() -> None:
        k = 0
        while not stop.is_set() and k < len(drip):
            for n, s in enumerate(drippers):
                if n in closed_after:
                    continue
                try:
                    s.sendall(drip[k : k + 1])
                    gone = s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    closed_after[n] = time.monotonic() - started
            k += 1
            time.sleep(0.1)

    dripping = threading.Thread(target=keep_dripping, daemon=True)
    dripping.start()
    try:
        time.sleep(head_timeout_s + 1.0)
        assert dripping.is_alive(), "the clients are still dripping"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"probe_total 1.0" in body
        assert len(closed_after) == len(drippers), f"{len(closed_after)} dripping clients closed"
        assert all(
            head_timeout_s * 0.9 <= t < head_timeout_s + 1.0 for t in closed_after.values()
        ), closed_after
    finally:
        stop.set()
        dripping.join()
        for s in drippers:
            s.close()
        server.shutdown()
