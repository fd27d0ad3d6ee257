"""cascade-worker daemons (sim engine, real subprocesses) against callers that misbehave: a KV
import still in flight when the worker is told to stop, and migrations aimed at bogus targets."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc

from tests.worker.daemons import Daemon, start_worker, workers
from tests.worker.streams import generate_request, run_to_end

SIM = ["--engine", "sim", "--sim-kv-bytes-per-token", "256", "--sim-max-model-len", "8192"]
PROMPT = list(range(1, 41))


def test_an_import_that_completes_after_sigterm_is_refused_not_lost(tmp_path: Path) -> None:
    """The worker's drain sees no request (the import is not in yet) and ends at once; an
    import whose commit arrives in the server's grace after that must not be taken in (the
    process is about to exit with it): UNAVAILABLE, so its source resumes it instead."""
    source = start_worker(SIM, tmp_path)
    target = start_worker([*SIM, "--drain-timeout-s", "3"], tmp_path)
    try:
        stream = iter(source.stub().Generate(generate_request("moved", PROMPT, 3000), timeout=60))
        for _ in range(5):
            next(stream)
        chunks = list(
            source.stub().ExportKV(worker_pb2.ExportKVRequest(request_id="moved"), timeout=30)
        )
        assert chunks[-1].WhichOneof("part") == "commit"
        commit_now = threading.Event()

        def paced() -> Iterator[worker_pb2.KVChunk]:
            yield from chunks[:-1]
            assert commit_now.wait(20)
            yield chunks[-1]

        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["ok"] = target.stub().ImportKV(paced(), timeout=30)
            except grpc.RpcError as e:
                outcome["error"] = e

        importer = threading.Thread(target=run)
        importer.start()
        time.sleep(1)  # header and blocks are in; the commit is held back
        target.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while '"draining"' not in target.log():
            assert time.monotonic() < deadline, "no drain"
            time.sleep(0.05)
        time.sleep(0.3)
        commit_now.set()
        importer.join(30)
        assert not importer.is_alive()
        assert target.process.wait(30) == 0
        assert "ok" not in outcome, "the worker took the request in and exited with it"
        error = outcome["error"]
        assert isinstance(error, grpc.RpcError)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    finally:
        source.kill()
        target.kill()


@pytest.fixture(scope="module")
def sim_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with workers([SIM], tmp_path_factory.mktemp("logs")) as daemons:
        yield daemons[0]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    "mode", [worker_pb2.MIGRATION_MODE_KV, worker_pb2.MIGRATION_MODE_RECOMPUTE]
)
def test_a_migration_to_a_target_no_worker_can_have_is_invalid_argument(
    sim_worker: Daemon, mode: int
) -> None:
    """An empty target was UNKNOWN (recompute) or UNAVAILABLE (KV); a 100,000-character one
    was echoed into the status until gRPC dropped it as oversized metadata."""
    stub = sim_worker.stub()
    rid = f"bogus-target-{mode}"
    call = stub.Generate(generate_request(rid, PROMPT, 4000), timeout=60)
    stream = iter(call)
    next(stream)
    try:
        for target in ("", "h" * 100_000):
            with pytest.raises(grpc.RpcError) as info:
                stub.MigrateOut(
                    worker_pb2.MigrateOutRequest(request_id=rid, target_address=target, mode=mode),
                    timeout=30,
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "hhhhhhhh" not in (info.value.details() or "")
        assert next(stream).tokens.token_ids, "the request runs on here"
    finally:
        call.cancel()
    assert run_to_end(stub, f"after-{rid}", PROMPT, 3), "still serving"


def test_migrations_to_many_unreachable_targets_do_not_grow_the_worker(
    sim_worker: Daemon,
) -> None:
    """Each target got a channel kept for good: 2,000 closed ports took 77 MiB."""
    stub = sim_worker.stub()
    call = stub.Generate(generate_request("many-targets", PROMPT, 8000), timeout=120)
    stream = iter(call)
    next(stream)
    try:
        for port in range(1, 101):  # the worker's memory settles after its first channels
            migrate_to(stub, "many-targets", f"127.0.0.1:{port}")
        before = rss_mib(sim_worker.process.pid)
        for port in range(101, 1101):
            migrate_to(stub, "many-targets", f"127.0.0.1:{port}")
        growth = rss_mib(sim_worker.process.pid) - before
        assert next(stream).tokens.token_ids, "the request runs on here"
    finally:
        call.cancel()
    print(f"RSS growth over 1,000 unreachable targets: {growth:.1f} MiB")
    assert growth < 15, f"1,000 unreachable targets grew the worker by {growth:.0f} MiB"
    assert run_to_end(stub, "after-many-targets", PROMPT, 3), "still serving"


def migrate_to(stub: worker_pb2_grpc.WorkerServiceStub, rid: str, target: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.MigrateOut(
            worker_pb2.MigrateOutRequest(
                request_id=rid, target_address=target, mode=worker_pb2.MIGRATION_MODE_RECOMPUTE
            ),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
