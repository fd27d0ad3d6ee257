"""Fuzzing of every scheduler and worker RPC with mutated valid messages, against real daemons
(a scheduler and two fast sim workers on loopback): no daemon crashes or hangs, every answer is
OK or a precise status (never UNKNOWN or INTERNAL), and both keep serving. Seeded, a few
hundred cases per RPC, well under a minute ($CASCADE_FUZZ_CASES sets how many)."""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import (
    common_pb2,
    registry_pb2,
    scheduler_pb2,
    worker_pb2,
)
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tests.worker.daemons import SIM_WORKER, Daemon, start_scheduler, workers
from tests.worker.streams import run_to_end

CASES_PER_RPC = int(os.environ.get("CASCADE_FUZZ_CASES", "300"))
"""300 in CI; the benchmark runs thousands (CASCADE_FUZZ_CASES=3000, see docs/reliability.md)."""
SEED = 14
PRECISE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True)
class Rpc:
    path: str
    kind: str  # "unary", "stream" (server streaming), "client_stream"
    valid: Callable[[int], list[Message]]
    """Valid request message(s) for case k (one, or a client stream's messages)."""


def sampling(max_tokens: int = 4) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=3)


def kv_stream(k: int, layout: common_pb2.KVLayout) -> list[Message]:
    return [
        worker_pb2.KVChunk(header=worker_pb2.KVHeader(request_id=f"imp-{k}", layout=layout)),
        worker_pb2.KVChunk(
            blocks=worker_pb2.KVBlocks(first_block=0, blocks=[b"\0" * layout.block_bytes])
        ),
        worker_pb2.KVChunk(
            commit=worker_pb2.KVCommit(
                prompt_token_ids=list(range(1, 10)),
                output_token_ids=[5],
                sampling=sampling(),
                num_cached_tokens=9,
                num_blocks=1,
            )
        ),
    ]


def rpcs(layout: common_pb2.KVLayout, peer: str) -> list[Rpc]:
    w = "/cascadeinfer.v1.WorkerService/"
    s = "/cascadeinfer.v1.SchedulerService/"
    return [
        Rpc(
            s + "Generate",
            "stream",
            lambda k: [
                scheduler_pb2.ClientGenerateRequest(
                    request_id=f"s-{k}",
                    prompt_token_ids=scheduler_pb2.TokenIds(ids=[1, 2, 3, 4]),
                    sampling=sampling(),
                    priority=1,
                )
            ],
        ),
        Rpc(
            s + "Generate",
            "stream",
            lambda k: [
                scheduler_pb2.ClientGenerateRequest(text="Hello there", sampling=sampling())
            ],
        ),
        Rpc(s + "Abort", "unary", lambda k: [scheduler_pb2.ClientAbortRequest(request_id="nope")]),
        Rpc(s + "GetClusterState", "unary", lambda k: [scheduler_pb2.GetClusterStateRequest()]),
        Rpc(
            w + "Generate",
            "stream",
            lambda k: [
                worker_pb2.GenerateRequest(
                    request_id=f"w-{k}",
                    prompt_token_ids=[1, 2, 3, 4],
                    sampling=sampling(),
                    output_token_ids=[7],
                )
            ],
        ),
        Rpc(w + "Attach", "stream", lambda k: [worker_pb2.AttachRequest(request_id="nope")]),
        Rpc(w + "Abort", "unary", lambda k: [worker_pb2.AbortRequest(request_id="nope")]),
        Rpc(w + "GetLoad", "unary", lambda k: [worker_pb2.GetLoadRequest()]),
        Rpc(w + "GetInfo", "unary", lambda k: [worker_pb2.GetInfoRequest()]),
        Rpc(w + "ExportKV", "stream", lambda k: [worker_pb2.ExportKVRequest(request_id="nope")]),
        Rpc(w + "ImportKV", "client_stream", lambda k: kv_stream(k, layout)),
        Rpc(
            w + "MigrateOut",
            "unary",
            lambda k: [worker_pb2.MigrateOutRequest(request_id="nope", target_address=peer)],
        ),
    ]


def registry_rpcs() -> list[Rpc]:
    r = "/cascadeinfer.v1.WorkerRegistry/"
    return [
        # A worker id that is not in the cluster: deregistering it must not touch the others.
        Rpc(
            r + "DeregisterWorker",
            "unary",
            lambda k: [registry_pb2.DeregisterWorkerRequest(worker_id="ghost")],
        ),
    ]


INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), -1, 0, 1, 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 1, 255, 4096, 2**31, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), -1, 0, 1, 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 1, 2**63, 2**64 - 1),
}
FLOATS = (float("nan"), float("inf"), -1.0, 0.0, 1e30)
STRINGS = ("", "x" * 2000, "\u0000", "é😀", "../../etc/passwd")


def perturb(msg: Message, rng: random.Random) -> None:
    """Sets some fields, nested ones included, to edge values: ranges, NaN, empty, huge."""
    for fd in msg.DESCRIPTOR.fields:
        if rng.random() > 0.35:
            continue
        repeated = fd.is_repeated
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                continue
            perturb(getattr(msg, fd.name), rng)
        elif fd.type in INTS:
            values = [rng.choice(INTS[fd.type]) for _ in range(rng.choice((0, 1, 3, 5000)))]
            if repeated:
                getattr(msg, fd.name)[:] = values
            else:
                setattr(msg, fd.name, rng.choice(INTS[fd.type]))
        elif fd.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE) and not repeated:
            setattr(msg, fd.name, rng.choice(FLOATS))
        elif fd.type == FieldDescriptor.TYPE_STRING and not repeated:
            setattr(msg, fd.name, rng.choice(STRINGS))
        elif fd.type == FieldDescriptor.TYPE_BOOL and not repeated:
            setattr(msg, fd.name, not getattr(msg, fd.name))
        elif fd.type == FieldDescriptor.TYPE_ENUM and not repeated:
            setattr(msg, fd.name, rng.choice((0, 1, 2, 99)))
        elif fd.type == FieldDescriptor.TYPE_BYTES and repeated:
            getattr(msg, fd.name)[:] = [rng.choice((b"", b"\0" * 7, b"\1" * 70000))]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flip bytes, truncate, insert random bytes, or duplicate a slice."""
    b = bytearray(data)
    op = rng.randrange(4)
    if op == 0 and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1 and b:
        del b[rng.randrange(len(b)) :]
    elif op == 2:
        pos = rng.randint(0, len(b))
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif b:
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 16)]
    return bytes(b)


def call(channel: grpc.Channel, rpc: Rpc, payloads: list[bytes]) -> grpc.StatusCode:
    """One call with raw bytes; its status (DEADLINE_EXCEEDED counts as a hang)."""
    ident = {"request_serializer": None, "response_deserializer": None}
    try:
        if rpc.kind == "unary":
            channel.unary_unary(rpc.path, **ident)(payloads[0], timeout=10)
        elif rpc.kind == "stream":
            for _ in channel.unary_stream(rpc.path, **ident)(payloads[0], timeout=10):
                pass
        else:
            channel.stream_unary(rpc.path, **ident)(iter(payloads), timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@dataclass
class Target:
    scheduler: Daemon
    workers: list[Daemon]
    layout: common_pb2.KVLayout


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    from cascadeinfer.worker.tiny_model import write_byte_tokenizer

    tmp: Path = tmp_path_factory.mktemp("fuzz")
    tokenizer = write_byte_tokenizer(tmp / "tokenizer")
    fast = [*SIM_WORKER, "--sim-time-scale", "0", "--sim-vocab-size", "256"]
    with workers([fast, fast], tmp) as daemons:
        addresses = ",".join(d.address for d in daemons)
        scheduler = start_scheduler(["--workers", addresses, "--tokenizer", str(tokenizer)], tmp)
        try:
            layout = daemons[0].stub().GetInfo(worker_pb2.GetInfoRequest()).layout
            yield Target(scheduler, daemons, layout)
        finally:
            scheduler.stop()


def test_mutated_messages_get_precise_statuses_and_nothing_breaks(target: Target) -> None:
    rng = random.Random(SEED)
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    channels = {
        "SchedulerService": grpc.insecure_channel(target.scheduler.address),
        "WorkerRegistry": grpc.insecure_channel(target.scheduler.address),
        "WorkerService": grpc.insecure_channel(target.workers[0].address),
    }
    imprecise = []
    for rpc in [*rpcs(target.layout, target.workers[1].address), *registry_rpcs()]:
        channel = channels[rpc.path.split("/")[1].rsplit(".", 1)[1]]
        for k in range(CASES_PER_RPC):
            messages = rpc.valid(k)
            i = rng.randrange(len(messages))
            if k % 2:  # fields with edge values; else bytes that may not parse
                perturb(messages[i], rng)
            payloads = [m.SerializeToString() for m in messages]
            if not k % 2:
                payloads[i] = mutate(payloads[i], rng)
            code = call(channel, rpc, payloads)
            outcomes[rpc.path][code.name] += 1
            if code not in PRECISE:
                imprecise.append((rpc.path, code.name, payloads))
    for path, counts in outcomes.items():
        print(path, dict(counts))
    assert not imprecise, imprecise[:5]
    for d in (target.scheduler, *target.workers):
        assert d.process.poll() is None, f"{d.log_path.name} died"
    assert run_to_end(target.workers[0].stub(), "after-fuzz", [1, 2, 3], 5)
    state = scheduler_pb2.GetClusterStateRequest()
    channel = grpc.insecure_channel(target.scheduler.address)
    answer = channel.unary_unary(
        "/cascadeinfer.v1.SchedulerService/GetClusterState",
        request_serializer=scheduler_pb2.GetClusterStateRequest.SerializeToString,
        response_deserializer=scheduler_pb2.ClusterState.FromString,
    )(state, timeout=10)
    assert sum(w.is_healthy for w in answer.workers) == 2
