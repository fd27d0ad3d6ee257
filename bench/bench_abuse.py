"""What abusive clients cost the daemons (`.venv/bin/python bench/bench_abuse.py`): real
scheduler and sim worker daemons on loopback; memory is the daemons' RSS from /proc.

1. A 40 MB text prompt to a scheduler with a tokenizer, while another client streams: the
   time to the refusal, the longest pause of the other stream, the scheduler's peak RSS.
2. A 2 GiB ImportKV stream of 1 MiB blocks: the worker's peak RSS and when it refused.
3. 500 clients that open a stream of 1,500 (then 6,000) tokens and read nothing for 20 s: the
   scheduler's RSS, and how their streams end (past max_stream_lag_tokens, 4096 by default,
   RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from cascadeinfer.worker.tiny_model import write_byte_tokenizer

from tests.worker.daemons import SIM_WORKER, Daemon, start_scheduler, workers


def rss_mib(d: Daemon, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{d.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(max_tokens: int, text: str = "") -> scheduler_pb2.ClientGenerateRequest:
    r = scheduler_pb2.ClientGenerateRequest(
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )
    if text:
        r.text = text
    else:
        r.prompt_token_ids.ids.extend(range(1, 9))
    return r


def huge_text(scheduler: Daemon, size_mb: int) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(
        grpc.insecure_channel(scheduler.address, options=[("grpc.max_send_message_length", -1)])
    )
    gaps: list[float] = []

    def steady() -> None:
        last = time.monotonic()
        for _ in stub.Generate(request(1500), timeout=120):
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    before = rss_mib(scheduler)
    thread = threading.Thread(target=steady)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    try:
        list(stub.Generate(request(4, "x" * (size_mb << 20)), timeout=120))
        outcome = "OK"
    except grpc.RpcError as e:
        outcome = e.code().name
    refused_s = time.monotonic() - started
    thread.join()
    print(
        f"text {size_mb} MB: {outcome} after {refused_s:.2f} s; other stream's longest pause "
        f"{max(gaps):.3f} s; scheduler RSS {before:.0f} -> {rss_mib(scheduler):.0f} MiB "
        f"(peak {rss_mib(scheduler, 'VmHWM'):.0f})"
    )


def huge_import(worker: Daemon, total_mib: int) -> None:
    layout = worker.stub().GetInfo(worker_pb2.GetInfoRequest(), timeout=10).layout
    block = b"\1" * layout.block_bytes
    sent = 0

    def chunks() -> Iterator[worker_pb2.KVChunk]:
        nonlocal sent
        yield worker_pb2.KVChunk(header=worker_pb2.KVHeader(request_id="big", layout=layout))
        for i in range(total_mib * (1 << 20) // len(block)):
            sent += len(block)
            yield worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(first_block=i, blocks=[block]))

    before = rss_mib(worker)
    started = time.monotonic()
    try:
        worker.stub().ImportKV(chunks(), timeout=300)
        outcome = "OK"
    except grpc.RpcError as e:
        outcome = e.code().name
    refused_s = time.monotonic() - started
    after = rss_mib(worker)
    time.sleep(5)
    print(
        f"ImportKV {total_mib} MiB of {len(block) >> 20} MiB blocks: {outcome} after "
        f"{refused_s:.2f} s and {sent >> 20} MiB sent; worker RSS {before:.0f} -> {after:.0f} "
        f"MiB (peak {rss_mib(worker, 'VmHWM'):.0f}, {rss_mib(worker):.0f} 5 s later)"
    )


def idle_readers(scheduler: Daemon, num: int, max_tokens: int) -> None:
    """Against a scheduler over a sim worker with no step sleep: all output is produced while
    nobody reads."""
    channel = grpc.insecure_channel(scheduler.address, options=[("grpc.http2.bdp_probe", 0)])
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    before = rss_mib(scheduler)
    calls = [stub.Generate(request(max_tokens), timeout=300) for _ in range(num)]
    time.sleep(20)  # the engine produces everything meanwhile
    during = rss_mib(scheduler)
    codes: dict[str, int] = {}
    for c in calls:
        try:
            for _ in c:
                pass
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        codes[code] = codes.get(code, 0) + 1
    print(
        f"{num} streams of {max_tokens} tokens left unread 20 s: scheduler RSS {before:.0f} -> "
        f"{during:.0f} MiB; then read: {codes}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text-mb", type=int, default=40)
    p.add_argument("--import-mib", type=int, default=2048)
    p.add_argument("--idle-readers", type=int, default=500)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = write_byte_tokenizer(tmp / "tokenizer")
        big_blocks = ["--engine", "sim", "--sim-kv-bytes-per-token", str(1 << 16)]
        big_blocks += ["--sim-max-model-len", "8192"]
        fast = [*SIM_WORKER, "--sim-time-scale", "0"]
        with workers([SIM_WORKER, big_blocks, fast, fast], tmp) as (worker, importer, *fast_ws):
            scheduler = start_scheduler(
                ["--workers", worker.address, "--tokenizer", str(tokenizer)], tmp
            )
            try:
                huge_text(scheduler, args.text_mb)
                huge_import(importer, args.import_mib)
            finally:
                scheduler.stop()
            for fw, max_tokens in zip(fast_ws, (1500, 6000), strict=True):
                scheduler = start_scheduler(["--workers", fw.address], tmp)
                try:
                    idle_readers(scheduler, args.idle_readers, max_tokens)
                finally:
                    scheduler.stop()


if __name__ == "__main__":
    main()
