"""A scheduler that dies and comes back on the same address: the workers register again by
themselves and the cluster serves new requests, with no operator action."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from tests.scheduler.test_secure_cluster import ids_request
from tests.worker.daemons import Daemon, free_port, start_scheduler, start_worker

SIM = ["--engine", "sim", "--sim-max-model-len", "4096"]


def healthy_workers(address: str) -> int:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
    return sum(w.is_healthy for w in state.workers) if state.stages else 0


def wait_until_workers(address: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy_workers(address) == count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} workers did not register with {address}")


def assert_served_by_one_worker(address: str, prompt_len: int) -> None:
    """Four requests of `prompt_len` tokens all served whole (round-robin would put every
    other one on a second worker), and one healthy worker."""
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    for _ in range(4):
        out = stub.Generate(ids_request([1] * prompt_len, 10), timeout=30)
        assert sum(len(r.tokens.token_ids) for r in out) == 10
    assert healthy_workers(address) == 1


def served_tokens(address: str) -> int:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    out = stub.Generate(ids_request(list(range(1, 80)), 60), timeout=60)
    return sum(len(r.tokens.token_ids) for r in out)


def test_workers_register_again_after_a_scheduler_restart(tmp_path: Path) -> None:
    port = free_port()
    args = ["--port", str(port), "--min-workers", "2", "--stages", "0-64:1,64-4096:1"]
    scheduler = start_scheduler(args, tmp_path)
    workers: list[Daemon] = []
    try:
        for _ in range(2):
            workers.append(start_worker([*SIM, "--scheduler", scheduler.address], tmp_path))
        wait_until_workers(scheduler.address, 2)
        assert served_tokens(scheduler.address) == 60
        scheduler.kill()  # a crash: no goodbye to the workers

        scheduler = start_scheduler(args, tmp_path)
        wait_until_workers(scheduler.address, 2)
        assert served_tokens(scheduler.address) == 60
        assert all(w.process.poll() is None for w in workers), "workers kept running"
    finally:
        for w in workers:
            w.kill()
        scheduler.kill()


@contextmanager
def first_of_two_static_workers_down(
    scheduler_args: list[str], log_dir: Path
) -> Iterator[tuple[Daemon, list[Daemon], int]]:
    """Two sim workers on ports of their own and a scheduler over them (`--workers`), the
    first killed once both had joined: yields the scheduler, the workers (the caller may put
    a new one in the first place) and the first one's port. Everything is killed at the end."""
    ports = [free_port(), free_port()]
    workers = [start_worker([*SIM, "--port", str(p)], log_dir) for p in ports]
    addresses = ",".join(w.address for w in workers)
    scheduler = start_scheduler(["--workers", addresses, *scheduler_args], log_dir)
    try:
        wait_until_workers(scheduler.address, 2)
        workers[0].kill()
        wait_until_workers(scheduler.address, 1, timeout=10)
        yield scheduler, workers, ports[0]
    finally:
        for w in workers:
            w.kill()
        scheduler.kill()


def test_a_static_worker_that_restarts_is_taken_back(tmp_path: Path) -> None:
    """A worker of the `--workers` list sends no heartbeat: once its feed ended (killed), the
    scheduler never placed a request on it again, even after it was back on its address."""
    stages = ["--stages", "0-64:1,64-4096:1"]
    with first_of_two_static_workers_down(stages, tmp_path) as (scheduler, workers, port):
        workers[0] = start_worker([*SIM, "--port", str(port)], tmp_path)
        wait_until_workers(scheduler.address, 2, timeout=15)
        assert served_tokens(scheduler.address) == 60, "both stages serve again"


def test_a_worker_back_with_a_shorter_length_is_not_placed_on(tmp_path: Path) -> None:
    """A worker restarted with a smaller max_model_len than the scheduler admits by: it was
    taken back and placed on, and every request it got that the scheduler had accepted (a
    prompt past its new length) failed INVALID_ARGUMENT, every other one under round-robin.
    Now it is kept out, with one `worker_too_short` line naming both lengths."""
    round_robin = ["--policy", "round-robin"]
    with first_of_two_static_workers_down(round_robin, tmp_path) as (scheduler, workers, port):
        short = [*SIM, "--sim-max-model-len", "1024", "--port", str(port)]
        workers[0] = start_worker(short, tmp_path)
        time.sleep(3 * 1.0)  # the scheduler tries a static worker that left every second
        assert_served_by_one_worker(scheduler.address, prompt_len=2000)
        # One that registers is refused so, and says that it was, not that it cannot reach.
        workers.append(start_worker([*short[:-2], "--scheduler", scheduler.address], tmp_path))
        deadline = time.monotonic() + 15
        while '"event": "scheduler_refused_worker"' not in workers[-1].log():
            assert time.monotonic() < deadline, workers[-1].log()[-2000:]
            time.sleep(0.2)
        assert "less than the model length 4096" in workers[-1].log()
        assert "scheduler_unreachable" not in workers[-1].log()
        assert healthy_workers(scheduler.address) == 1
    log = scheduler.log()
    assert log.count('"event": "worker_too_short"') == 2, log[-3000:]  # once per address
    assert "at most 1024 tokens, less than the model length 4096" in log


def second_worker_kept_out(worker_args: list[str], tmp_path: Path) -> str:
    """A sim worker serving under round-robin, then a second one started with `worker_args`
    registering: the cluster serves on the first alone. Returns the scheduler's log."""
    first = start_worker(SIM, tmp_path)
    scheduler = start_scheduler(["--workers", first.address, "--policy", "round-robin"], tmp_path)
    workers = [first]
    try:
        wait_until_workers(scheduler.address, 1)
        workers.append(start_worker([*worker_args, "--scheduler", scheduler.address], tmp_path))
        time.sleep(3 * 1.0)  # its registration, and a retry or two
        assert_served_by_one_worker(scheduler.address, prompt_len=100)
    finally:
        for w in workers:
            w.kill()
        scheduler.kill()
    return scheduler.log()


def test_a_worker_of_another_model_is_not_placed_on(tmp_path: Path) -> None:
    """A worker serving another model joining a scheduler whose workers serve one: it was
    placed on (requests for the one model got the other's output, every other one under
    round-robin) and `/v1/models` listed both. Now it is kept out, with one
    `worker_serves_another_model` line naming both models."""
    config = tmp_path / "other-model.toml"
    config.write_text('engine = "sim"\n[sim]\nmodel = "other-model"\nmax_model_len = 4096\n')
    log = second_worker_kept_out(["--config", str(config)], tmp_path)
    assert log.count('"event": "worker_serves_another_model"') == 1, log[-3000:]
    assert "serves model 'other-model', not 'sim'" in log


def test_a_worker_of_another_vocabulary_is_not_placed_on(tmp_path: Path) -> None:
    """A worker restarted with another vocabulary under the same model name (another
    tokenizer): it was taken in, and every text prompt's ids its stage got were refused
    there (the sixteenth probe's F6). Now it is kept out like a worker of another model, with
    one line naming both vocabularies."""
    log = second_worker_kept_out([*SIM, "--sim-vocab-size", "100"], tmp_path)
    assert log.count('"event": "worker_serves_another_model"') == 1, log[-3000:]
    assert "with a vocabulary of 100 tokens, not 32000" in log


def test_accepted_requests_end_clearly_when_no_worker_is_left(tmp_path: Path) -> None:
    """The only worker killed under load: the streams it served end with ABORT once no worker
    has come back within the link timeout (they waited with no end, retried on the dead worker
    every tick, while new requests were refused at once), and the scheduler serves again when
    the worker is back."""
    port = free_port()
    worker = start_worker([*SIM, "--port", str(port)], tmp_path)
    args = ["--workers", worker.address, "--worker-link-timeout-s", "2"]
    scheduler = start_scheduler(args, tmp_path)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
    ends: list[tuple[str, float]] = []

    def stream() -> None:
        try:
            replies = list(stub.Generate(ids_request([1, 2, 3], 4000), timeout=30))
            finish = common_pb2.FinishReason.Name(replies[-1].finish_reason)
        except grpc.RpcError as e:
            finish = e.code().name
        ends.append((finish, time.monotonic()))

    try:
        wait_until_workers(scheduler.address, 1)
        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        worker.kill()
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=40)
        assert [finish for finish, _ in ends] == ["FINISH_REASON_ABORT"] * 3
        assert max(at for _, at in ends) - killed_at < 10
        with pytest.raises(grpc.RpcError) as refused:
            served_tokens(scheduler.address)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        worker = start_worker([*SIM, "--port", str(port)], tmp_path)
        wait_until_workers(scheduler.address, 1, timeout=15)
        assert served_tokens(scheduler.address) == 60
    finally:
        worker.kill()
        scheduler.kill()


def test_requests_waiting_for_the_last_worker_go_on_when_it_is_back(tmp_path: Path) -> None:
    """The only worker killed and restarted on its address: the requests it ran complete once
    it is back. The core keeps the last instance in its plan (it cannot remove it), and the
    scheduler kept placing the waiting requests on that dead link; the restarted worker took
    them there before it rejoined, and their copies then made the real placements fail with
    "request id in use", ending the requests with ABORT."""
    port = free_port()
    worker = start_worker([*SIM, "--port", str(port)], tmp_path)
    args = ["--workers", worker.address, "--worker-link-timeout-s", "30"]
    scheduler = start_scheduler(args, tmp_path)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
    ends: list[tuple[str, int]] = []

    def stream() -> None:
        num_tokens = 0
        try:
            last = None
            for last in stub.Generate(ids_request([1, 2, 3], 600), timeout=60):
                num_tokens += len(last.tokens.token_ids)
            finish = common_pb2.FinishReason.Name(last.finish_reason) if last else "none"
        except grpc.RpcError as e:
            finish = e.code().name
        ends.append((finish, num_tokens))

    try:
        wait_until_workers(scheduler.address, 1)
        threads = [threading.Thread(target=stream) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        worker.kill()
        worker = start_worker([*SIM, "--port", str(port)], tmp_path)
        for t in threads:
            t.join(timeout=70)
        assert ends == [("FINISH_REASON_LENGTH", 600)] * 6
        assert served_tokens(scheduler.address) == 60
    finally:
        worker.kill()
        scheduler.kill()
