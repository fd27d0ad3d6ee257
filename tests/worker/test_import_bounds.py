"""ImportKV refuses a stream as soon as it carries more KV than any request holds, without
buffering the rest: a 512 MiB stream of blocks leaves the worker's peak memory where it was.
Its memory then goes back to the OS. A real sim worker whose blocks are 1 MiB and whose longest
request holds 64 of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc
from cascadeinfer.worker import kv_stream
from cascadeinfer.worker.engine import EngineError, ErrorCode

from tests.worker.daemons import Daemon, start_worker
from tests.worker.streams import run_to_end

BIG_BLOCKS = [
    "--engine",
    "sim",
    "--sim-kv-bytes-per-token",
    str(1 << 16),
    "--sim-max-model-len",
    "1024",
]
NUM_SENT_MAX = 512


def rss_mib(d: Daemon, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{d.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def peak_rss_mib(d: Daemon) -> float:
    return rss_mib(d, "VmHWM")


class StalledImports:
    """Imports of `num_blocks` blocks that end without a commit; one started with `wait`
    holds its blocks until `release` is set."""

    def __init__(self, d: Daemon, layout: Any, num_blocks: int) -> None:
        self.d, self.layout, self.num_blocks = d, layout, num_blocks
        self.block = b"\1" * layout.block_bytes
        self.release = threading.Event()

    def chunks(self, request_id: str, wait: bool) -> Iterator[worker_pb2.KVChunk]:
        yield worker_pb2.KVChunk(
            header=worker_pb2.KVHeader(request_id=request_id, layout=self.layout)
        )
        for i in range(self.num_blocks):
            yield worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(first_block=i, blocks=[self.block]))
        if wait:
            self.release.wait(30)
        # Ends without a commit: the worker refuses it as truncated.

    def refusal(self, request_id: str, wait: bool = False) -> grpc.RpcError:
        try:
            self.d.stub().ImportKV(self.chunks(request_id, wait), timeout=30)
        except grpc.RpcError as e:
            return e
        raise AssertionError("accepted")

    def second_while_first_holds(self) -> tuple[grpc.RpcError, grpc.RpcError]:
        """Import "a" stalls holding its blocks while "b" is tried, then "a" is let go:
        how each ended."""
        errors: dict[str, grpc.RpcError] = {}
        first = threading.Thread(target=lambda: errors.setdefault("a", self.refusal("a", True)))
        first.start()
        time.sleep(2)  # its blocks are in
        second = self.refusal("b")
        self.release.set()
        first.join(30)
        return errors["a"], second


def test_an_oversized_kv_stream_is_refused_early_and_not_buffered(tmp_path: Path) -> None:
    d = start_worker(BIG_BLOCKS, tmp_path)
    try:
        layout = d.stub().GetInfo(worker_pb2.GetInfoRequest(), timeout=10).layout
        block = b"\1" * layout.block_bytes
        assert layout.block_bytes == 1 << 20
        sent = 0

        def chunks() -> Iterator[worker_pb2.KVChunk]:
            nonlocal sent
            yield worker_pb2.KVChunk(header=worker_pb2.KVHeader(request_id="big", layout=layout))
            for i in range(NUM_SENT_MAX):
                sent += 1
                yield worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(first_block=i, blocks=[block]))

        before = peak_rss_mib(d)
        channel = grpc.insecure_channel(d.address)
        started = time.monotonic()
        try:
            worker_pb2_grpc.WorkerServiceStub(channel).ImportKV(chunks(), timeout=60)
            raise AssertionError("accepted")
        except grpc.RpcError as e:
            assert e.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ), e.details()
            assert "blocks" in (e.details() or "")
        elapsed = time.monotonic() - started
        growth = peak_rss_mib(d) - before
        print(f"peak RSS {before:.0f} -> {before + growth:.0f} MiB; refused after {elapsed:.2f} s")
        assert growth < 200, f"the worker buffered {growth:.0f} MiB of a refused stream"
        deadline = time.monotonic() + 10
        while rss_mib(d) - before > 30:  # the refused blocks' memory goes back to the OS
            assert time.monotonic() < deadline, f"RSS stays at {rss_mib(d):.0f} MiB"
            time.sleep(0.2)
        assert sent < NUM_SENT_MAX, "the stream was read to its end before the refusal"
        assert run_to_end(d.stub(), "after", [1, 2, 3], 3), "still serving"
    finally:
        d.kill()


def test_kv_imports_in_flight_are_bounded_together_by_the_free_kv(tmp_path: Path) -> None:
    """Two imports that stall before their commit (header and blocks sent, then nothing): each
    fits in the free KV alone, not both together. The second is refused RESOURCE_EXHAUSTED
    while the first holds its blocks (before, each stream was bounded alone: eight stalled ones
    held eight times the free KV), and once the first ends its blocks count no more."""
    d = start_worker([*BIG_BLOCKS, "--sim-num-blocks", "96"], tmp_path)
    try:
        layout = d.stub().GetInfo(worker_pb2.GetInfoRequest(), timeout=10).layout
        imports = StalledImports(d, layout, 60)  # of 96 free; a request holds at most 64
        first, second = imports.second_while_first_holds()
        assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, second.details()
        assert first.code() == grpc.StatusCode.INVALID_ARGUMENT, first.details()
        third = imports.refusal("c")
        assert third.code() == grpc.StatusCode.INVALID_ARGUMENT, third.details()
        assert "truncated" in (third.details() or ""), "all 60 blocks were taken"
        assert run_to_end(d.stub(), "after", [1, 2, 3], 3), "still serving"
    finally:
        d.kill()


def test_kv_imports_in_flight_are_bounded_by_host_memory_too(tmp_path: Path) -> None:
    """The free KV is no bound on the host's memory: a sim worker's default KV is 50 GiB, and
    50 stalled imports of 8 MiB each took its RSS from 60 to 930 MiB with room for 6,000 more.
    With --max-import-mib 40, a second 30-block import is refused while the first holds its
    blocks, though the free KV would take hundreds of them."""
    d = start_worker([*BIG_BLOCKS, "--max-import-mib", "40"], tmp_path)
    try:
        info = d.stub().GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
        assert info.kv_blocks_total > 200, "the free KV alone would take both imports"
        imports = StalledImports(d, info.layout, 30)
        first, second = imports.second_while_first_holds()
        assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, second.details()
        assert "memory" in (second.details() or "")
        assert "truncated" in (first.details() or ""), "the first took all its blocks"
        assert run_to_end(d.stub(), "after", [1, 2, 3], 3), "still serving"
    finally:
        d.kill()


def test_by_default_imports_in_flight_get_a_share_of_the_available_memory() -> None:
    available = kv_stream.available_memory_bytes()
    assert available is not None, "no /proc/meminfo"
    block_bytes = 1 << 20
    share = available // kv_stream.IMPORT_MEMORY_SHARE // block_bytes
    budget = kv_stream.ImportBudget()
    with budget.stream(free_blocks=share * 10, block_bytes=block_bytes) as reserve:
        reserve(share // 2)  # counted, not allocated
        with pytest.raises(EngineError) as e:
            reserve(share)
    assert e.value.code is ErrorCode.RESOURCE_EXHAUSTED and "memory" in e.value.message
    assert budget.held == 0
