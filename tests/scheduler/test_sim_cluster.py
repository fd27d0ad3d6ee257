"""cascade-scheduler in front of 6 sim workers in 3 stages, all real subprocesses on loopback:
requests cross stage bounds and migrate forward; every client gets every token exactly once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cascadeinfer import CostProfile
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2

from tests.worker.daemons import SIM_WORKER as SIM
from tests.worker.daemons import Daemon, sim_cluster, start_scheduler, workers
from tests.worker.streams import run_to_end

STAGES = "0-256:2,256-512:2,512-8192:2"


@dataclass
class Cluster:
    scheduler: Daemon
    workers: list[Daemon]

    def stub(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(
            grpc.insecure_channel(self.scheduler.address)
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("logs")
    with sim_cluster(6, ["--stages", STAGES], logs) as (scheduler, daemons):
        yield Cluster(scheduler, daemons)


def client_request(
    prompt: list[int], max_tokens: int, rid: str = ""
) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def collect(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, request: scheduler_pb2.ClientGenerateRequest
) -> tuple[list[int], scheduler_pb2.ClientGenerateResponse]:
    """Tokens in arrival order, checking each index arrives exactly once and in order."""
    tokens: list[int] = []
    last = None
    for r in stub.Generate(request, timeout=120):
        assert r.tokens.first_index == len(tokens), "gap or duplicate in the client stream"
        tokens.extend(r.tokens.token_ids)
        last = r
    assert last is not None
    return tokens, last


def test_requests_migrate_along_the_stages_and_every_token_arrives_once(cluster: Cluster) -> None:
    prompts = [[(31 * i + k) % 997 + 1 for k in range(100 + 10 * i)] for i in range(12)]
    references = [
        run_to_end(cluster.workers[0].stub(), f"ref-{i}", p, 500) for i, p in enumerate(prompts)
    ]
    before = cluster.stub().GetClusterState(scheduler_pb2.GetClusterStateRequest()).num_migrations
    results: dict[int, tuple[list[int], scheduler_pb2.ClientGenerateResponse]] = {}

    def one(i: int) -> None:
        results[i] = collect(cluster.stub(), client_request(prompts[i], 500, f"c-{i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 12
    for i in range(12):
        tokens, last = results[i]
        assert tokens == references[i]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.timings.num_migrations == 2, "crossed 256 and 512"
        assert 0 < last.timings.ttft_s <= last.timings.total_s
    state = cluster.stub().GetClusterState(scheduler_pb2.GetClusterStateRequest())
    assert [(s.min_len, s.max_len, len(s.worker_ids)) for s in state.stages] == [
        (0, 256, 2),
        (256, 512, 2),
        (512, 8192, 2),
    ]
    assert state.num_migrations - before == 24
    assert len(state.workers) == 6 and all(
        w.is_healthy and w.engine == "sim" for w in state.workers
    )
    assert {w.stage for w in state.workers} == {0, 1, 2}
    # Every request has ended: the workers are idle, and the status says so (an idle worker
    # sends no step feed, so its last feed's counts would still show requests running).
    assert all((w.num_running, w.num_waiting) == (0, 0) for w in state.workers), state.workers
    assert all(w.kv_blocks_free > 0 for w in state.workers)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (
            scheduler_pb2.ClientGenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=5)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            scheduler_pb2.ClientGenerateRequest(
                text="hi", sampling=common_pb2.SamplingParams(max_tokens=5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (client_request([], 5), grpc.StatusCode.INVALID_ARGUMENT),
        (client_request([1, 2, 3], 0), grpc.StatusCode.INVALID_ARGUMENT),
        (client_request([7] * 9000, 5), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_get_precise_statuses(
    cluster: Cluster, request_: scheduler_pb2.ClientGenerateRequest, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(cluster.stub().Generate(request_, timeout=30))
    assert info.value.code() == code, info.value.details()
    tokens, _ = collect(cluster.stub(), client_request([1, 2, 3], 4))
    assert len(tokens) == 4, "still serving"


def test_unknown_abort_id_is_not_found(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub().Abort(scheduler_pb2.ClientAbortRequest(request_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_that_disconnects_has_its_request_aborted_on_the_worker(cluster: Cluster) -> None:
    call = cluster.stub().Generate(client_request([5] * 50, 5000, "leaver"))
    for i, _ in enumerate(call):
        if i == 5:
            break
    call.cancel()
    for _ in range(100):
        loads = [w.stub().GetLoad(worker_pb2.GetLoadRequest()) for w in cluster.workers]
        if sum(load.num_running + load.num_waiting for load in loads) == 0:
            break
        threading.Event().wait(0.1)
    assert sum(load.num_running for load in loads) == 0
    assert "client_disconnected" in cluster.scheduler.log()


def test_killing_a_worker_mid_stream_loses_no_request(tmp_path: Path) -> None:
    with workers([SIM] * 2, tmp_path) as daemons:
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(["--workers", addresses, "--policy", "least-load"], tmp_path)
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
            prompts = [[(17 * i + k) % 997 + 1 for k in range(60)] for i in range(6)]
            references = [
                run_to_end(daemons[1].stub(), f"ref-{i}", p, 400) for i, p in enumerate(prompts)
            ]
            results: dict[int, list[int]] = {}

            def one(i: int) -> None:
                results[i] = collect(stub, client_request(prompts[i], 400, f"k-{i}"))[0]

            threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            threading.Event().wait(0.8)
            daemons[0].process.kill()
            for t in threads:
                t.join(120)
            assert [results[i] for i in range(6)] == references
            assert "worker_failed" in scheduler.log()
        finally:
            scheduler.stop()


def test_a_request_an_operator_moves_by_hand_still_reaches_its_client(tmp_path: Path) -> None:
    """MigrateOut called on a worker directly (the worker's README lists it as a tool) for a
    request the scheduler placed: its client stopped mid-stream and waited for good, while
    the request ran to its end unread on the other worker."""
    with workers([SIM, SIM], tmp_path) as daemons:
        prompt = [(31 * k) % 997 + 1 for k in range(40)]
        reference = run_to_end(daemons[0].stub(), "ref", prompt, 400)
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(["--workers", addresses, "--policy", "least-load"], tmp_path)
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
            result: list[list[int]] = []
            reader = threading.Thread(
                target=lambda: result.append(collect(stub, client_request(prompt, 400, "hand"))[0])
            )
            reader.start()
            threading.Event().wait(0.5)  # it is decoding on one of the two
            for here, there in (daemons, daemons[::-1]):  # the one that has it moves it
                request = worker_pb2.MigrateOutRequest(
                    request_id="hand", target_address=there.address
                )
                try:
                    here.stub().MigrateOut(request, timeout=30)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
            else:
                raise AssertionError("neither worker had the request")
            reader.join(60)
            assert result == [reference]
            assert "moved_without_the_scheduler" in scheduler.log()
        finally:
            scheduler.stop()


def _cross_one_bound(
    tmp_path: Path, worker_args: list[list[str]], prompt: list[int], max_tokens: int, stages: str
) -> str:
    """One request through a scheduler over two workers in two stages (`stages`), crossing
    the bound between them: the client's tokens must equal the first worker serving it alone,
    after exactly one move. Returns the scheduler's log."""
    with workers(worker_args, tmp_path) as daemons:
        reference = run_to_end(daemons[0].stub(), "ref", prompt, max_tokens)
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(["--workers", addresses, "--stages", stages], tmp_path)
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
            tokens, last = collect(stub, client_request(prompt, max_tokens, "crossing"))
            assert tokens == reference
            assert last.timings.num_migrations == 1
            return scheduler.log()
        finally:
            scheduler.stop()


def test_workers_whose_kv_layouts_differ_move_requests_by_recompute(tmp_path: Path) -> None:
    """Same model, other KV geometry (as another tensor-parallel degree or dtype gives): the
    target recomputes the request's KV. Asked to take blocks it cannot use, the target refused
    every move, and the scheduler asked again at every step: 287 failures a second for one
    request, which never left its stage."""
    other = [*SIM, "--sim-kv-bytes-per-token", "256"]
    prompt = [(29 * k) % 997 + 1 for k in range(200)]
    log = _cross_one_bound(tmp_path, [SIM, other], prompt, 150, "0-256:1,256-8192:1")
    assert "migration_failed" not in log


def test_two_vllm_workers_migrate_across_the_bound_with_exact_greedy_tokens(tmp_path: Path) -> None:
    """Real vLLM engines on CPU: the request crosses the 128-token bound between the two
    workers' stages, and the client's tokens equal one engine serving it alone."""
    vllm = ["--engine", "vllm"]
    prompt = [(37 * k) % 1000 + 1 for k in range(60)]
    _cross_one_bound(tmp_path, [vllm, vllm], prompt, 300, "0-128:1,128-2048:1")


def test_a_full_admission_queue_is_resource_exhausted(tmp_path: Path) -> None:
    """With room for one request in the core's view and no queue, the second is refused
    visibly; the first still completes."""
    profile = json.loads(CostProfile.builtin("gpu-h100-llama3-8b").to_json())
    profile["kv_capacity_tokens"] = 300
    path = tmp_path / "small.json"
    path.write_text(json.dumps(profile))
    with workers([SIM], tmp_path) as daemons:
        args = [
            "--workers",
            daemons[0].address,
            "--policy",
            "least-load",
            "--profile",
            str(path),
            "--max-queue",
            "0",
        ]
        scheduler = start_scheduler(args, tmp_path)
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
            first = stub.Generate(client_request([3] * 200, 2000, "first"))
            next(first)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(client_request([4] * 200, 10, "second"), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.Abort(scheduler_pb2.ClientAbortRequest(request_id="first"))
            assert list(first)[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        finally:
            scheduler.stop()
