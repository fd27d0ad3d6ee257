"""Client tokens apart from the cluster's: a scheduler with a cluster token (its workers') and
two client tokens, all real subprocesses on loopback. A client's token opens Generate, Abort
and the OpenAI HTTP API, and nothing a worker or the operator uses: it cannot register a worker
(which would receive every prompt routed to it), read the cluster's state, or call a worker.
A request can be aborted only with the token it was started with."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cascadeinfer.proto.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from cascadeinfer.scheduler.config import parse_args
from cascadeinfer.security import TlsFiles, client_channel
from cascadeinfer.worker.tiny_model import write_tiny_llama
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.worker.daemons import SIM_WORKER, Daemon, start_scheduler, workers

CLUSTER = "cluster-secret-for-tests"
ALICE, BOB = "alice-key-for-tests", "bob-key-for-tests"


@dataclass
class Cluster:
    scheduler: Daemon
    workers: list[Daemon]

    def scheduler_stub(self, token: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
        channel = client_channel(self.scheduler.address, TlsFiles(), token)
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("client-tokens")
    (tmp / "cluster").write_text(CLUSTER + "\n")
    (tmp / "clients").write_text(f"# one per team\n{ALICE}\n\n{BOB}\n")
    auth = ["--auth-token-file", str(tmp / "cluster")]
    with workers([[*SIM_WORKER, *auth]] * 2, tmp) as daemons:
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(
            [
                *auth,
                "--client-tokens-file",
                str(tmp / "clients"),
                "--workers",
                addresses,
                "--tokenizer",
                str(write_tiny_llama(tmp / "model")),
                "--http-port",
                "0",
            ],
            tmp,
        )
        try:
            yield Cluster(scheduler, daemons)
        finally:
            scheduler.stop()


def request(rid: str, max_tokens: int) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=list(range(1, 33))),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def test_each_client_token_opens_generation_and_the_cluster_token_still_does(
    cluster: Cluster,
) -> None:
    for token in (ALICE, BOB, CLUSTER):
        last = list(cluster.scheduler_stub(token).Generate(request("", 4), timeout=60))[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    for token in ("", "wrong"):
        with pytest.raises(grpc.RpcError) as e:
            list(cluster.scheduler_stub(token).Generate(request("", 4), timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_take_a_client_token_as_well_as_the_cluster_token(
    cluster: Cluster,
) -> None:
    for token in (ALICE, BOB, CLUSTER):
        channel = client_channel(cluster.scheduler.address, TlsFiles(), token)
        # Health follows the scheduler within HEALTH_INTERVAL_S, so a first answer may lag.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert any(r.status == health_pb2.HealthCheckResponse.SERVING for r in watch)
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = reflection_pb2.ServerReflectionRequest(list_services="")
        metadata = (("authorization", f"Bearer {token}"),)  # the channel's adds to unary calls
        listed = next(reflection.ServerReflectionInfo(iter([asked]), metadata=metadata, timeout=10))
        assert "grpc.health.v1.Health" in {s.name for s in listed.list_services_response.service}
    for token in ("", "wrong"):
        channel = client_channel(cluster.scheduler.address, TlsFiles(), token)
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_token_cannot_register_a_worker_read_the_cluster_or_call_a_worker(
    cluster: Cluster,
) -> None:
    channel = client_channel(cluster.scheduler.address, TlsFiles(), ALICE)
    rogue = registry_pb2.RegisterWorkerRequest(worker_id="rogue", address="127.0.0.1:1")
    with pytest.raises(grpc.RpcError) as e:
        registry_pb2_grpc.WorkerRegistryStub(channel).RegisterWorker(rogue, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        cluster.scheduler_stub(ALICE).GetClusterState(scheduler_pb2.GetClusterStateRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    worker = client_channel(cluster.workers[0].address, TlsFiles(), ALICE)
    with pytest.raises(grpc.RpcError) as e:
        worker_pb2_grpc.WorkerServiceStub(worker).GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    state = cluster.scheduler_stub(CLUSTER).GetClusterState(scheduler_pb2.GetClusterStateRequest())
    assert sorted(w.worker_id for w in state.workers) == sorted(d.address for d in cluster.workers)


def test_only_the_token_that_started_a_request_can_abort_it(cluster: Cluster) -> None:
    started = threading.Event()
    responses: list[scheduler_pb2.ClientGenerateResponse] = []

    def run() -> None:
        for r in cluster.scheduler_stub(ALICE).Generate(request("alices", 8000), timeout=120):
            responses.append(r)
            started.set()

    reader = threading.Thread(target=run)
    reader.start()
    assert started.wait(60)
    for token in (BOB, CLUSTER):
        with pytest.raises(grpc.RpcError) as e:
            cluster.scheduler_stub(token).Abort(
                scheduler_pb2.ClientAbortRequest(request_id="alices"), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert reader.is_alive(), "another token's Abort ended it"
    cluster.scheduler_stub(ALICE).Abort(
        scheduler_pb2.ClientAbortRequest(request_id="alices"), timeout=10
    )
    reader.join(60)
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_ABORT


def test_two_clients_may_choose_the_same_id_and_neither_can_tell(cluster: Cluster) -> None:
    # Ids are the clients' to choose: Bob picking the id Alice's running request has must
    # neither be refused (that would tell him it is in use) nor touch hers.
    started = threading.Event()
    alices: list[scheduler_pb2.ClientGenerateResponse] = []

    def run() -> None:
        for r in cluster.scheduler_stub(ALICE).Generate(request("same-id", 8000), timeout=120):
            alices.append(r)
            started.set()

    reader = threading.Thread(target=run)
    reader.start()
    assert started.wait(60)
    bobs = list(cluster.scheduler_stub(BOB).Generate(request("same-id", 6), timeout=60))
    assert bobs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert {r.request_id for r in bobs} == {"same-id"}
    assert sum(len(r.tokens.token_ids) for r in bobs) == 6
    with pytest.raises(grpc.RpcError) as e:  # Bob's is over; Alice's is not his
        cluster.scheduler_stub(BOB).Abort(
            scheduler_pb2.ClientAbortRequest(request_id="same-id"), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # Alice's own id twice: hers to know
        list(cluster.scheduler_stub(ALICE).Generate(request("same-id", 4), timeout=60))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reader.is_alive(), "Bob's request touched Alice's"
    cluster.scheduler_stub(ALICE).Abort(
        scheduler_pb2.ClientAbortRequest(request_id="same-id"), timeout=10
    )
    reader.join(60)
    assert alices[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert {r.request_id for r in alices} == {"same-id"}


def test_a_client_aborting_its_own_request_leaves_another_owners_of_the_same_id_alone(
    cluster: Cluster,
) -> None:
    # Bob's request runs on its worker under an id of the scheduler's own (Alice's holds the
    # id they share there); his Abort once went to the worker under the shared id and ended
    # Alice's request, while his ran on, unread, to its max_tokens.
    streams: dict[str, list[scheduler_pb2.ClientGenerateResponse]] = {ALICE: [], BOB: []}
    started = {ALICE: threading.Event(), BOB: threading.Event()}

    def run(token: str) -> None:
        for r in cluster.scheduler_stub(token).Generate(request("shared", 8000), timeout=120):
            streams[token].append(r)
            started[token].set()

    readers = {t: threading.Thread(target=run, args=(t,)) for t in (ALICE, BOB)}
    for token in (ALICE, BOB):
        readers[token].start()
        assert started[token].wait(60)
    cluster.scheduler_stub(BOB).Abort(
        scheduler_pb2.ClientAbortRequest(request_id="shared"), timeout=10
    )
    readers[BOB].join(60)
    assert streams[BOB][-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    state = cluster.scheduler_stub(CLUSTER).GetClusterState
    deadline = time.monotonic() + 20
    while sum(w.num_running for w in state(scheduler_pb2.GetClusterStateRequest()).workers) > 1:
        assert time.monotonic() < deadline, "Bob's request ran on after his Abort"
        time.sleep(0.2)
    received = len(streams[ALICE])
    time.sleep(0.5)
    assert readers[ALICE].is_alive(), "Bob's Abort ended Alice's request"
    assert len(streams[ALICE]) > received, "Alice's request stopped making tokens"
    cluster.scheduler_stub(ALICE).Abort(
        scheduler_pb2.ClientAbortRequest(request_id="shared"), timeout=10
    )
    readers[ALICE].join(60)
    assert streams[ALICE][-1].finish_reason == common_pb2.FINISH_REASON_ABORT


def test_the_http_api_takes_the_client_tokens(cluster: Cluster) -> None:
    url = cluster.scheduler.openai_url + "/completions"
    body = {"model": cluster.scheduler.openai_models[0], "prompt": "Hi", "max_tokens": 3}
    for token, status in ((BOB, 200), (CLUSTER, 200), ("wrong", 401), (None, 401)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        reply = httpx.post(url, json=body, headers=headers, timeout=60)
        assert reply.status_code == status, reply.text


def test_a_client_token_equal_to_the_cluster_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cluster").write_text("same")
    (tmp_path / "clients").write_text("other\nsame\n")
    args = ["--auth-token-file", str(tmp_path / "cluster")]
    with pytest.raises(ValueError, match="cluster's token"):
        parse_args([*args, "--client-tokens-file", str(tmp_path / "clients")])
    (tmp_path / "clients").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        parse_args([*args, "--client-tokens-file", str(tmp_path / "clients")])
