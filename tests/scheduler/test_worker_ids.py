"""Two workers with one worker id (a copied config, or the default host:port alike on two
hosts): the scheduler keeps the first, refuses the second with a line that says why, and the
second's goodbye does not take the first out. Before, the second replaced the first's entry: a
scheduler listing both in --workers never served, and one the second registered with added a
new instance at every heartbeat (34 in 40 s), each with a step feed nobody closed; the second's
SIGTERM then deregistered the first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
from cascadeinfer.launcher import SCHEDULER, spawn
from cascadeinfer.proto.v1 import scheduler_pb2, scheduler_pb2_grpc

from tests.scheduler.test_restart import served_tokens, wait_until_workers
from tests.worker.daemons import start_scheduler, start_worker, workers

SIM = ["--engine", "sim", "--sim-max-model-len", "4096", "--worker-id", "gpu-0"]


def _state(address: str) -> scheduler_pb2.ClusterState:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    return stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)


def _events(text: str, name: str) -> list[dict[str, object]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def test_a_worker_registering_with_an_id_in_use_is_refused_and_its_goodbye_harms_no_one(
    tmp_path: Path,
) -> None:
    with workers([SIM], tmp_path) as (first,):
        scheduler = start_scheduler(["--workers", first.address], tmp_path)
        second = None
        try:
            wait_until_workers(scheduler.address, 1)
            second = start_worker([*SIM, "--scheduler", scheduler.address], tmp_path)
            time.sleep(5)  # two heartbeats at least
            state = _state(scheduler.address)
            assert [(w.worker_id, w.address) for w in state.workers] == [("gpu-0", first.address)]
            assert sum(len(s.worker_ids) for s in state.stages) == 1, state.stages
            refused = _events(second.log(), "scheduler_refused_worker_id")
            assert len(refused) == 1 and first.address in str(refused[0]["error"])
            assert len(_events(scheduler.log(), "worker_id_in_use")) == 1
            refusals = _events(scheduler.log(), "worker_registration_refused")
            assert not [e for e in refusals if e["reason"] == "id_in_use"], "said once, not twice"
            assert second.stop() == 0
            time.sleep(1)
            state = _state(scheduler.address)
            assert [w.is_healthy for w in state.workers] == [True]
            assert served_tokens(scheduler.address) == 60
        finally:
            if second is not None:
                second.kill()
            scheduler.stop()


def test_a_scheduler_whose_workers_share_an_id_says_so(tmp_path: Path) -> None:
    with workers([SIM, SIM], tmp_path) as (first, second):
        process, log_path = spawn(
            SCHEDULER, ["--workers", f"{first.address},{second.address}"], tmp_path
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _events(
                log_path.read_text(), "worker_id_in_use"
            ):
                time.sleep(0.2)
            said = _events(log_path.read_text(), "worker_id_in_use")
            assert len(said) == 1, log_path.read_text()[-2000:]
            assert said[0]["address"] == second.address
            assert "give each worker its own --worker-id" in str(said[0]["error"])
            time.sleep(3)  # tried again every half second, said once
            assert len(_events(log_path.read_text(), "worker_id_in_use")) == 1
        finally:
            process.kill()
            process.wait()
