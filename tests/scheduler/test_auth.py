"""Every link of a token cluster is authenticated: a scheduler and two sim workers sharing a
bearer token, all real subprocesses on loopback. Callers without the token get UNAUTHENTICATED
from every worker RPC and from the registry; the scheduler and the workers themselves (step
feeds, migrations between workers) send it; a worker the scheduler did not choose cannot write
into a client's stream; and no daemon serves a non-loopback address unauthenticated unless
told `--insecure`."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cascadeinfer.health_port import HEALTH_MESSAGE_LIMIT
from cascadeinfer.launcher import SCHEDULER, WORKER
from cascadeinfer.proto.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from cascadeinfer.security import TlsFiles, client_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.worker.daemons import SIM_WORKER, Daemon, free_port, start_scheduler, workers
from tests.worker.streams import generate_request, run_to_end

TOKEN = "cluster-token-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
STAGES = "0-64:1,64-8192:1"


@dataclass
class Cluster:
    scheduler: Daemon
    workers: list[Daemon]
    health_ports: list[int]
    """The workers' `--health-port`s, then the scheduler's."""

    def scheduler_stub(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        channel = client_channel(self.scheduler.address, TlsFiles(), TOKEN)
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)

    def worker_stub(self, k: int, token: str = TOKEN) -> worker_pb2_grpc.WorkerServiceStub:
        channel = client_channel(self.workers[k].address, TlsFiles(), token)
        return worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("auth")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    auth = ["--auth-token-file", str(token_file)]
    health_ports = [free_port() for _ in range(3)]
    worker_args = [[*SIM_WORKER, *auth, "--health-port", str(p)] for p in health_ports[:2]]
    with workers(worker_args, tmp) as daemons:
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(
            [
                "--workers",
                addresses,
                "--stages",
                STAGES,
                *auth,
                "--health-port",
                str(health_ports[2]),
            ],
            tmp,
        )
        try:
            yield Cluster(scheduler, daemons, health_ports)
        finally:
            scheduler.stop()


def client_request(
    prompt: list[int], max_tokens: int, rid: str
) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


WORKER_CALLS = {
    "Generate": lambda s, md: list(s.Generate(generate_request("x", [1, 2], 2), metadata=md)),
    "StartDetached": lambda s, md: list(
        s.StartDetached(iter([worker_pb2.StartBatch()]), metadata=md)
    ),
    "Attach": lambda s, md: list(s.Attach(worker_pb2.AttachRequest(request_id="x"), metadata=md)),
    "Abort": lambda s, md: s.Abort(worker_pb2.AbortRequest(request_id="x"), metadata=md),
    "GetLoad": lambda s, md: s.GetLoad(worker_pb2.GetLoadRequest(), metadata=md),
    "StreamSteps": lambda s, md: next(s.StreamSteps(worker_pb2.StreamStepsRequest(), metadata=md)),
    "GetInfo": lambda s, md: s.GetInfo(worker_pb2.GetInfoRequest(), metadata=md),
    "ExportKV": lambda s, md: list(
        s.ExportKV(worker_pb2.ExportKVRequest(request_id="x"), metadata=md)
    ),
    "ImportKV": lambda s, md: s.ImportKV(iter([worker_pb2.KVChunk()]), metadata=md),
    "MigrateOut": lambda s, md: s.MigrateOut(
        worker_pb2.MigrateOutRequest(request_id="x", target_address="127.0.0.1:1"), metadata=md
    ),
}


@pytest.mark.parametrize("rpc", sorted(WORKER_CALLS))
def test_every_worker_rpc_needs_the_token(cluster: Cluster, rpc: str) -> None:
    stub = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(cluster.workers[0].address))
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as e:
            WORKER_CALLS[rpc](stub, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc


def test_a_request_aborted_on_its_worker_by_someone_else_ends_its_clients_stream(
    cluster: Cluster,
) -> None:
    # An operator, or a second scheduler reaping what it takes for leftovers, aborts a request
    # on its worker: the scheduler that placed it must end its client's stream, not wait for
    # tokens that never come.
    rid = "aborted-elsewhere"
    stream = cluster.scheduler_stub().Generate(client_request([3] * 100, 8000, rid), timeout=60)
    first = next(stream)
    assert first.tokens.token_ids, "the request runs"
    aborted = []
    for k in range(len(cluster.workers)):
        try:
            cluster.worker_stub(k).Abort(worker_pb2.AbortRequest(request_id=rid), timeout=10)
            aborted.append(k)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
    assert len(aborted) == 1
    started = time.monotonic()
    rest = list(stream)
    assert time.monotonic() - started < 10
    assert rest and rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert sum(len(m.tokens.token_ids) for m in [first, *rest]) < 8000


def _health(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    """The status `address`'s health service gives a caller sending `metadata`."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10).status


def test_health_takes_the_token_on_the_api_port_and_none_on_the_health_port(
    cluster: Cluster,
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    daemons = [*cluster.workers, cluster.scheduler]
    for daemon, health_port in zip(daemons, cluster.health_ports, strict=True):
        # An open service's messages are read whole before any handler runs: strangers'
        # partial messages held hundreds of MB (docs/reliability.md, F2 of the seventeenth
        # probe). With the token it answers.
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                _health(daemon.address, metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _health(daemon.address, AUTH) == serving
        # The health port answers probes without a token; it has no Watch, a stream a
        # stranger could hold for as long as he liked.
        probe = f"127.0.0.1:{health_port}"
        assert _health(probe) == serving
        channel = grpc.insecure_channel(probe)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.RpcError) as e:
            next(watch)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # It serves health alone, and reads no message larger than a health request needs.
        with pytest.raises(grpc.RpcError) as e:
            worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(
                worker_pb2.GetInfoRequest(), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="x" * (HEALTH_MESSAGE_LIMIT + 1)), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cluster.worker_stub(0).GetInfo(worker_pb2.GetInfoRequest(), timeout=10).engine == "sim"


def test_a_rogue_worker_cannot_register_nor_deregister_a_real_one(cluster: Cluster) -> None:
    registry = registry_pb2_grpc.WorkerRegistryStub(
        grpc.insecure_channel(cluster.scheduler.address)
    )
    rogue = registry_pb2.RegisterWorkerRequest(worker_id="rogue", address="127.0.0.1:1")
    real_id = cluster.workers[0].address
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as e:
            registry.RegisterWorker(rogue, metadata=metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            registry.DeregisterWorker(
                registry_pb2.DeregisterWorkerRequest(worker_id=real_id), metadata=metadata
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    state = cluster.scheduler_stub().GetClusterState(scheduler_pb2.GetClusterStateRequest())
    assert sorted(w.worker_id for w in state.workers if w.is_healthy) == sorted(
        d.address for d in cluster.workers
    )


def test_a_registration_with_an_oversized_id_or_address_is_refused_without_echoing_it(
    cluster: Cluster,
) -> None:
    """With the token: a 10 KB address used to be copied into the error details, which then
    overflowed gRPC's metadata limit (RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT)."""
    registry = registry_pb2_grpc.WorkerRegistryStub(
        grpc.insecure_channel(cluster.scheduler.address)
    )
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    for request in (
        registry_pb2.RegisterWorkerRequest(worker_id="w" * 100_000, address="127.0.0.1:1"),
        registry_pb2.RegisterWorkerRequest(worker_id="w", address="h" * 10_000 + ":1"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            registry.RegisterWorker(request, metadata=metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "longer than 256 characters" in (e.value.details() or "")


def stream(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
    request: scheduler_pb2.ClientGenerateRequest,
    first: threading.Event | None = None,
) -> tuple[list[int], scheduler_pb2.ClientGenerateResponse]:
    tokens: list[int] = []
    last = scheduler_pb2.ClientGenerateResponse()
    for r in stub.Generate(request, timeout=120):
        assert r.tokens.first_index == len(tokens), "gap or duplicate in the client stream"
        tokens.extend(r.tokens.token_ids)
        last = r
        if first is not None:
            first.set()
    return tokens, last


def test_requests_migrate_between_workers_that_demand_the_token(cluster: Cluster) -> None:
    """The scheduler's feeds and Generate calls and the source's ImportKV all carry it."""
    prompt = list(range(1, 41))
    reference = run_to_end(cluster.worker_stub(0), "ref-migrating", prompt, 120)
    tokens, last = stream(cluster.scheduler_stub(), client_request(prompt, 120, "migrating"))
    assert tokens == reference
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.timings.num_migrations == 1, "crossed the first stage's bound"


def test_a_feed_from_a_worker_the_scheduler_did_not_choose_cannot_overwrite_tokens(
    cluster: Cluster,
) -> None:
    """The same request id started on the other worker (by someone holding the token) runs
    there, but its tokens and its early finish never reach the victim's client."""
    prompt = [7] * 100  # stage 2 from the start: no migration
    max_tokens = 600
    reference = run_to_end(cluster.worker_stub(0), "ref-victim", prompt, max_tokens)
    first = threading.Event()
    result: dict[str, tuple[list[int], scheduler_pb2.ClientGenerateResponse]] = {}

    def victim() -> None:
        result["victim"] = stream(
            cluster.scheduler_stub(), client_request(prompt, max_tokens, "victim"), first
        )

    thread = threading.Thread(target=victim)
    thread.start()
    assert first.wait(60)
    hostile = worker_pb2.GenerateRequest(
        request_id="victim",
        prompt_token_ids=[3] * 90,
        sampling=common_pb2.SamplingParams(max_tokens=20, ignore_eos=True),
        detach=True,
    )
    accepted = 0
    for k in range(2):
        try:
            list(cluster.worker_stub(k).Generate(hostile, timeout=10))
            accepted += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS  # the worker that holds it
    assert accepted == 1
    thread.join(120)
    tokens, last = result["victim"]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(tokens) == max_tokens
    assert tokens == reference


@pytest.mark.parametrize("binary", [WORKER, SCHEDULER], ids=["worker", "scheduler"])
def test_no_daemon_serves_other_hosts_unauthenticated_unless_told_insecure(
    binary: str, tmp_path: Path
) -> None:
    args = [binary, "--host", "0.0.0.0", "--port", "0"]
    if binary == WORKER:
        args += ["--engine", "sim"]
    env = {"PATH": "/usr/bin:/bin"}  # no $CASCADE_AUTH_TOKEN
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 2
    assert "--insecure" in out.stderr and "0.0.0.0" in out.stderr
    log = tmp_path / "insecure.log"
    with open(log, "w") as f:
        process = subprocess.Popen(
            [*args, "--insecure"], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = 60.0
        start = time.monotonic()
        while "serving on 0.0.0.0:" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() - start < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()


def test_the_worker_a_request_left_cannot_write_into_it_afterwards(cluster: Cluster) -> None:
    """Once the request has moved on (and a grace for the source's lagging feed has passed),
    a copy started under its id on the worker it left is ignored too."""
    prompt = list(range(1, 41))  # stage 1 on worker 0, crosses 64 tokens: moves to worker 1
    max_tokens = 800
    reference = run_to_end(cluster.worker_stub(0), "ref-left", prompt, max_tokens)
    moved = threading.Event()
    result: dict[str, tuple[list[int], scheduler_pb2.ClientGenerateResponse]] = {}

    def victim() -> None:
        tokens: list[int] = []
        last = scheduler_pb2.ClientGenerateResponse()
        request = client_request(prompt, max_tokens, "left")
        for r in cluster.scheduler_stub().Generate(request, timeout=120):
            assert r.tokens.first_index == len(tokens)
            tokens.extend(r.tokens.token_ids)
            last = r
            if len(tokens) > 40:
                moved.set()
        result["left"] = (tokens, last)

    thread = threading.Thread(target=victim)
    thread.start()
    assert moved.wait(60)
    time.sleep(2.5)  # past the grace for the source's feed
    hostile = worker_pb2.GenerateRequest(
        request_id="left",
        prompt_token_ids=[3] * 90,
        sampling=common_pb2.SamplingParams(max_tokens=20, ignore_eos=True),
        detach=True,
    )
    list(cluster.worker_stub(0).Generate(hostile, timeout=10))  # the worker it left takes it
    thread.join(120)
    tokens, last = result["left"]
    assert last.timings.num_migrations == 1
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert tokens == reference


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ("cluster-token\nsecond line\n", "its character 14 is a line break"),
        ("clüster-token", "its character 3 is not ASCII"),
        ("cluster\x07token", "its character 8 is a control character"),
    ],
    ids=["two-lines", "non-ascii", "control"],
)
@pytest.mark.parametrize("binary", [WORKER, SCHEDULER], ids=["worker", "scheduler"])
def test_a_token_no_caller_could_send_is_refused_at_start(
    binary: str, content: str, what: str, tmp_path: Path
) -> None:
    """A token that cannot travel in a header: a worker given one served, but its
    registration died inside grpc ("Illegal header value") with nothing in its log and no
    retry, and a scheduler given one served a port no caller could open."""
    token_file = tmp_path / "token"
    token_file.write_text(content, encoding="utf-8")
    args = [binary, "--port", "0", "--auth-token-file", str(token_file)]
    if binary == WORKER:
        args += ["--engine", "sim", "--scheduler", "127.0.0.1:9"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"auth token file '{token_file}': a token must be one line of printable ASCII" in (
        out.stderr
    )
    assert what in out.stderr
    assert "Traceback" not in out.stderr and "cluster" not in out.stderr.replace(
        str(token_file), ""
    ), "the token is not echoed"
