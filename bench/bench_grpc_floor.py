"""The floor under the scheduler's gRPC front: a servicer that does no work at all, serving the
same `SchedulerService.Generate` calls ghz sends in `make bench-scheduler` (a few response
messages per call, as a short output gives), on the same event loop the daemons use. Its CPU
per call is what the gRPC layer alone costs one Python process, whatever the scheduler does.

    python bench/bench_grpc_floor.py --calls 3000 --messages 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cascadeinfer.daemon import new_event_loop
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from bench.bench_scheduler import cpu_seconds, ghz_generate


class Idle(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, messages: int) -> None:
        self.messages = messages

    async def Generate(
        self, request: scheduler_pb2.ClientGenerateRequest, context: object
    ) -> AsyncIterator[scheduler_pb2.ClientGenerateResponse]:
        n = self.messages
        for k in range(n):
            yield scheduler_pb2.ClientGenerateResponse(
                request_id="r",
                tokens=common_pb2.TokenChunk(token_ids=[7] * (8 // n), first_index=k),
                finish_reason=common_pb2.FINISH_REASON_LENGTH if k == n - 1 else 0,
            )


async def serve(port_file: Path, messages: int) -> None:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(Idle(messages), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def ghz(address: str, total: int, concurrency: int) -> dict[str, float]:
    data = {"prompt_token_ids": {"ids": list(range(1, 17))}, "sampling": {"max_tokens": 8}}
    report = ghz_generate(address, total, concurrency, data, [], timeout_s=600)
    return {"ok": report["statusCodeDistribution"].get("OK", 0), "seconds": report["total"] / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--messages", type=int, default=2, help="response messages per call")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve(Path(args.serve), args.messages))
        return
    port_file = Path(f"/tmp/grpc-floor-{os.getpid()}")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port_file), "--messages", str(args.messages)]
    )
    try:
        while not port_file.exists() or not port_file.read_text():
            if server.poll() is not None:
                raise RuntimeError("the idle server did not start")
            asyncio.run(asyncio.sleep(0.05))
        address = f"127.0.0.1:{port_file.read_text()}"
        ghz(address, 500, args.concurrency)  # warm-up
        before = cpu_seconds(server.pid)
        run = ghz(address, args.calls, args.concurrency)
        cpu = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        port_file.unlink(missing_ok=True)
    print(
        json.dumps(
            {
                **run,
                "messages_per_call": args.messages,
                "event_loop": os.environ.get("CASCADE_EVENT_LOOP", "uvloop"),
                "calls_per_s": run["ok"] / run["seconds"],
                "server_cpu_s": cpu,
                "server_cpu_us_per_call": cpu / run["ok"] * 1e6,
                "calls_per_server_cpu_s": run["ok"] / cpu,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
