"""What abusive clients cost the daemons (`.venv/bin/python bench/bench_abuse.py`): real
scheduler and sim worker daemons on loopback; memory is the daemons' RSS from /proc.

1. A 40 MB text prompt to a scheduler with a tokenizer, while another client streams: the
   time to the refusal, the longest pause of the other stream, the scheduler's peak RSS.
2. A 2 GiB ImportKV stream of 1 MiB blocks: the worker's peak RSS and when it refused.
3. 500 clients that open a stream of 1,500 (then 6,000) tokens and read nothing for 20 s: the
   scheduler's RSS, and how their streams end (past max_stream_lag_tokens, 4096 by default,
   RESOURCE_EXHAUSTED).
4. Callers without the token, all at once: 12 calls of a 60 MiB message to a worker started
   with `--auth-token-file`, 40 of 15 MiB to a scheduler likewise: each daemon's RSS before,
   at its peak and after (every call is refused UNAUTHENTICATED). The same to gRPC health on
   each daemon's API port (refused UNAUTHENTICATED: health takes the token there) and on its
   `--health-port` (open, refused RESOURCE_EXHAUSTED for the message's size).
5. Partial messages to the scheduler's `--health-port`: 500 connections, each opening 8 Check
   calls whose 4 KiB message never completes, held 3 s, three rounds: the scheduler's RSS
   after each, and whether a fresh Check is answered while they are held.

    .venv/bin/python bench/bench_abuse.py [--only strangers]
"""

from __future__ import annotations

import argparse
import contextlib
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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import h2_raw
from tests.worker.daemons import SIM_WORKER, Daemon, free_port, start_scheduler, workers

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


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


def strangers(
    daemon: Daemon, method: str, num_calls: int, size_mib: int, port: int | None = None
) -> None:
    """`num_calls` unary calls of `method` at once, each a junk message of `size_mib` MiB and
    no token, to the daemon's API port or `port`; the daemon's RSS before, at its peak
    (sampled every 50 ms) and 3 s after."""
    # Field 2, length-delimited, `size_mib` MiB of junk: refused before it is decoded anyway.
    size = size_mib << 20
    length = bytearray()
    while True:
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    message = b"\x12" + bytes(length) + b"\x01" * (size_mib << 20)
    codes: list[str] = []

    def call() -> None:
        address = daemon.address if port is None else f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        send = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        try:
            send(message, timeout=60)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
        finally:
            channel.close()

    before = rss_mib(daemon)
    threads = [threading.Thread(target=call) for _ in range(num_calls)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mib(daemon))
        time.sleep(0.05)
    time.sleep(3)
    where = "the API port" if port is None else "the health port"
    print(
        f"{num_calls} x {size_mib} MiB to {method} on {where} without a token: "
        f"{sorted(set(codes))}; RSS "
        f"{before:.0f} MiB before, {peak:.0f} at the peak, {rss_mib(daemon):.0f} after"
    )


def partial_health(scheduler: Daemon, port: int, num_connections: int, rounds: int) -> None:
    """`rounds` times: `num_connections` connections to the health `port`, each opening 8
    Check calls with a 4,096-byte message of which 4,090 bytes come, held 3 s; the
    scheduler's RSS then and after they close, and a fresh Check's answer meanwhile."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    before = rss_mib(scheduler)
    for k in range(rounds):
        held = []
        for _ in range(num_connections):
            try:
                s = h2_raw.connect(port)
            except OSError:
                continue
            for stream in range(1, 17, 2):
                headers = h2_raw.grpc_call_headers("/grpc.health.v1.Health/Check")
                partial = b"\x00" + (4096).to_bytes(4, "big") + b"\x00" * 4090
                with contextlib.suppress(OSError):
                    s.sendall(
                        h2_raw.frame(h2_raw.HEADERS, h2_raw.END_HEADERS, stream, headers)
                        + h2_raw.frame(h2_raw.DATA, 0, stream, partial)
                    )
            held.append(s)
        time.sleep(3)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            fresh = health_pb2.HealthCheckResponse.ServingStatus.Name(answer)
        except grpc.RpcError as e:
            fresh = e.code().name
        during = rss_mib(scheduler)
        for s in held:
            s.close()
        time.sleep(1)
        print(
            f"round {k + 1}: {num_connections} connections x 8 partial Check messages to the "
            f"health port: RSS {before:.0f} MiB before, {during:.0f} held, "
            f"{rss_mib(scheduler):.0f} after; a fresh Check meanwhile: {fresh}"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text-mb", type=int, default=40)
    p.add_argument("--import-mib", type=int, default=2048)
    p.add_argument("--idle-readers", type=int, default=500)
    p.add_argument("--only", choices=["strangers"], help="run that scenario alone")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        token = tmp / "token"
        token.write_text("bench-abuse-token")
        auth = ["--auth-token-file", str(token)]
        worker_health, scheduler_health = free_port(), free_port()
        worker_args = [*SIM_WORKER, *auth, "--health-port", str(worker_health)]
        with workers([worker_args], tmp) as (guarded,):
            strangers(guarded, "/cascadeinfer.v1.WorkerService/Generate", 12, 60)
            strangers(guarded, HEALTH_CHECK, 12, 60)
            strangers(guarded, HEALTH_CHECK, 12, 60, worker_health)
            scheduler = start_scheduler(
                ["--workers", guarded.address, *auth, "--health-port", str(scheduler_health)], tmp
            )
            try:
                strangers(scheduler, "/cascadeinfer.v1.SchedulerService/Generate", 40, 15)
                strangers(scheduler, HEALTH_CHECK, 40, 15)
                strangers(scheduler, HEALTH_CHECK, 40, 15, scheduler_health)
                partial_health(scheduler, scheduler_health, 500, 3)
            finally:
                scheduler.stop()
        if args.only:
            return
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
