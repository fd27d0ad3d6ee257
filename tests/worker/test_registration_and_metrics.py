"""A worker started with --scheduler registers with a real WorkerRegistry server, heartbeats,
and deregisters on SIGTERM; --metrics-port serves Prometheus metrics labelled with the engine."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import registry_pb2, registry_pb2_grpc

from tests.worker.daemons import start_worker
from tests.worker.streams import generate_request, run_to_end

SIM = ["--engine", "sim", "--sim-kv-bytes-per-token", "64"]


class Registry(registry_pb2_grpc.WorkerRegistryServicer):
    """A minimal registry peer that records what workers tell it."""

    def __init__(self) -> None:
        self.registrations: list[registry_pb2.RegisterWorkerRequest] = []
        self.deregistered: list[str] = []
        self.lock = threading.Lock()

    def RegisterWorker(
        self, request: registry_pb2.RegisterWorkerRequest, context: object
    ) -> registry_pb2.RegisterWorkerResponse:
        with self.lock:
            self.registrations.append(request)
        return registry_pb2.RegisterWorkerResponse(heartbeat_interval_s=0.2)

    def DeregisterWorker(
        self, request: registry_pb2.DeregisterWorkerRequest, context: object
    ) -> registry_pb2.DeregisterWorkerResponse:
        with self.lock:
            self.deregistered.append(request.worker_id)
        return registry_pb2.DeregisterWorkerResponse()


@pytest.fixture()
def registry() -> Iterator[tuple[Registry, str]]:
    servicer = Registry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    registry_pb2_grpc.add_WorkerRegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def wait_for(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_registers_heartbeats_and_deregisters(
    registry: tuple[Registry, str], tmp_path: Path
) -> None:
    servicer, address = registry
    worker = start_worker([*SIM, "--scheduler", address, "--worker-id", "w-7"], tmp_path)
    try:
        wait_for(lambda: len(servicer.registrations) >= 3)
        first = servicer.registrations[0]
        assert (first.worker_id, first.address, first.engine) == ("w-7", worker.address, "sim")
        assert first.layout.backend == "sim" and first.kv_blocks_total > 0
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=60) == 0
        assert servicer.deregistered == ["w-7"]
    finally:
        if worker.process.poll() is None:
            worker.process.kill()


def test_a_missing_scheduler_is_retried_not_fatal(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    worker = start_worker([*SIM, "--scheduler", dead], tmp_path)
    try:
        assert len(run_to_end(worker.stub(), "r", [1, 2, 3], 5)) == 5
    finally:
        worker.stop()


def test_prometheus_metrics_carry_the_engine_name(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = start_worker([*SIM, "--metrics-port", str(port)], tmp_path)
    try:
        run_to_end(worker.stub(), "r", [1, 2, 3], 20)
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        steps = [
            line
            for line in text.splitlines()
            if line.startswith('cascade_worker_steps_total{engine="sim"}')
        ]
        assert steps and float(steps[0].split()[-1]) >= 20
        assert 'cascade_worker_kv_blocks_free{engine="sim"}' in text
    finally:
        worker.stop()


def _gauge(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f'{name}{{engine="sim"}}'))
    return float(line.split()[-1])


def test_the_load_gauges_follow_a_cancelled_request_out_of_an_idle_engine(tmp_path: Path) -> None:
    # A request cancelled while nothing else runs leaves no engine step to report it gone:
    # the gauges must not keep its last step's values.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = start_worker([*SIM, "--metrics-port", str(port)], tmp_path)
    try:
        stream = worker.stub().Generate(generate_request("c", [1] * 100, 8000), timeout=60)
        for k, _ in enumerate(stream):
            if k > 5:
                break
        assert _gauge(port, "cascade_worker_running") == 1
        stream.cancel()
        wait_for(lambda: _gauge(port, "cascade_worker_running") == 0, timeout=10)
        assert _gauge(port, "cascade_worker_kv_blocks_used") == 0
    finally:
        worker.stop()
