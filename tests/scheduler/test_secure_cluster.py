"""A scheduler and two sim workers with every link on TLS (mTLS to and between the workers),
a bearer token on the API, a tokenizer for text prompts, and a Prometheus exporter; the
workers join by registering themselves. All real subprocesses on loopback."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from cascadeinfer.scheduler.text import load_tokenizer
from cascadeinfer.worker.tiny_model import write_byte_tokenizer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.scheduler.certs import CertFiles, make_certs
from tests.worker.daemons import Daemon, free_port, start_scheduler, start_worker

TOKEN = "s3cret-token"
BOUND = 64
MAX_TOKENS = 200
MAX_MODEL_LEN = 2048


@dataclass
class SecureCluster:
    scheduler: Daemon
    workers: list[Daemon]
    certs: CertFiles
    tokenizer_dir: Path
    metrics_port: int

    def credentials(self, *, with_client_cert: bool = False) -> grpc.ChannelCredentials:
        c = self.certs
        if with_client_cert:
            return grpc.ssl_channel_credentials(
                c.ca.read_bytes(), c.key.read_bytes(), c.cert.read_bytes()
            )
        return grpc.ssl_channel_credentials(c.ca.read_bytes())

    def stub(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        channel = grpc.secure_channel(self.scheduler.address, self.credentials())
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)


def tls_flags(c: CertFiles) -> list[str]:
    return ["--tls-cert", str(c.cert), "--tls-key", str(c.key), "--tls-ca", str(c.ca)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    tmp = tmp_path_factory.mktemp("secure")
    certs = make_certs(tmp / "certs")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    tokenizer_dir = write_byte_tokenizer(tmp / "tokenizer")
    metrics_port = free_port()
    scheduler = start_scheduler(
        [
            "--min-workers",
            "2",
            "--stages",
            f"0-{BOUND}:1,{BOUND}-{MAX_MODEL_LEN}:1",
            "--auth-token-file",
            str(token_file),
            "--tokenizer",
            str(tokenizer_dir),
            "--metrics-port",
            str(metrics_port),
            *tls_flags(certs),
        ],
        tmp,
    )
    workers: list[Daemon] = []
    try:
        for _ in range(2):
            workers.append(
                start_worker(
                    [
                        "--engine",
                        "sim",
                        "--sim-vocab-size",
                        "1024",
                        "--sim-max-model-len",
                        str(MAX_MODEL_LEN),
                        "--scheduler",
                        scheduler.address,
                        "--auth-token-file",
                        str(token_file),
                        "--tls-require-client-cert",
                        *tls_flags(certs),
                    ],
                    tmp,
                )
            )
        yield SecureCluster(scheduler, workers, certs, tokenizer_dir, metrics_port)
    finally:
        for w in workers:
            w.kill()
        scheduler.kill()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def text_request(text: str, max_tokens: int) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        text=text, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )


def ids_request(ids: list[int], max_tokens: int) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        prompt_token_ids=scheduler_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def wait_for_workers(stub: scheduler_pb2_grpc.SchedulerServiceStub) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), metadata=AUTH)
        if sum(w.is_healthy for w in state.workers) == 2 and state.stages:
            return
        time.sleep(0.2)
    raise AssertionError("workers did not register over mTLS")


def test_text_prompt_over_tls_migrates_and_streams_text(cluster: SecureCluster) -> None:
    stub = cluster.stub()
    wait_for_workers(stub)
    tokenizer = load_tokenizer(str(cluster.tokenizer_dir))
    prompt = "A prompt of some fifty bytes, enough to cross 64."
    prompt_len = len(tokenizer.encode(prompt).ids)
    assert prompt_len < BOUND
    tokens: list[int] = []
    text = []
    last = None
    # Long enough past the bound that the move lands before the end on a loaded machine (with
    # 40 tokens the request once finished on its source while the move was still under way).
    for r in stub.Generate(text_request(prompt, MAX_TOKENS), metadata=AUTH, timeout=60):
        assert r.tokens.first_index == len(tokens)
        tokens.extend(r.tokens.token_ids)
        text.append(r.text)
        last = r
    assert last is not None and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(tokens) == MAX_TOKENS
    assert last.timings.num_migrations == 1, "the request crossed the stage bound"
    assert "".join(text) == tokenizer.decode(tokens)
    assert "".join(text), "byte tokens decode to some text"


def test_missing_or_wrong_token_is_unauthenticated_and_service_keeps_serving(
    cluster: SecureCluster,
) -> None:
    stub = cluster.stub()
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(ids_request([1, 2, 3], 4), metadata=metadata, timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health takes the token too (probes without one use --health-port); the API still serves
    # a good caller.
    channel = grpc.secure_channel(cluster.scheduler.address, cluster.credentials())
    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), metadata=AUTH, timeout=30
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    out = list(stub.Generate(ids_request([1, 2, 3], 4), metadata=AUTH, timeout=60))
    assert sum(len(r.tokens.token_ids) for r in out) == 4


def test_plaintext_client_cannot_reach_the_tls_port(cluster: SecureCluster) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(cluster.scheduler.address))
    with pytest.raises(grpc.RpcError) as e:
        stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), metadata=AUTH, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_worker_refuses_callers_without_a_client_certificate(cluster: SecureCluster) -> None:
    address = cluster.workers[0].address
    without = worker_pb2_grpc.WorkerServiceStub(grpc.secure_channel(address, cluster.credentials()))
    with pytest.raises(grpc.RpcError) as e:
        without.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with_cert = worker_pb2_grpc.WorkerServiceStub(
        grpc.secure_channel(address, cluster.credentials(with_client_cert=True))
    )
    assert with_cert.GetInfo(worker_pb2.GetInfoRequest(), timeout=10).engine == "sim"


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (ids_request([1] * 100, MAX_MODEL_LEN - 50), "exceeds the model's length"),
        (text_request("", 4), "text is empty"),
        (ids_request([1, 2], 0), "max_tokens"),
    ],
    ids=["beyond-model-length", "empty-text", "zero-max-tokens"],
)
def test_bad_requests_get_invalid_argument(
    cluster: SecureCluster, request_: scheduler_pb2.ClientGenerateRequest, needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(cluster.stub().Generate(request_, metadata=AUTH, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (e.value.details() or "")


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_count_what_happened(cluster: SecureCluster) -> None:
    stub = cluster.stub()
    wait_for_workers(stub)
    before = scrape(cluster.metrics_port)
    list(stub.Generate(ids_request(list(range(1, 41)), 40), metadata=AUTH, timeout=60))
    after = scrape(cluster.metrics_port)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('cascade_scheduler_ttft_seconds_count{stage="0"}') == 1
    assert grew('cascade_scheduler_e2e_seconds_count{stage="0"}') == 1
    assert grew('cascade_scheduler_tpot_seconds_count{stage="0"}') == 1
    assert grew('cascade_scheduler_requests_total{finish="length"}') == 1
    assert grew("cascade_scheduler_tokens_relayed_total") == 40
    assert grew('cascade_scheduler_migrations_total{outcome="ok",reason="stage_bound"}') == 1
    assert grew('cascade_scheduler_core_decision_seconds_count{call="admit"}') >= 1
    assert grew('cascade_scheduler_core_decision_seconds_count{call="on_step"}') >= 1
    assert after['cascade_scheduler_workers{state="healthy"}'] == 2
    assert after["cascade_scheduler_queue_depth"] == 0
