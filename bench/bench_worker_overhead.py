"""The worker daemon's overhead: Generate tokens/s through cascade-worker against the same vLLM
engine called directly in-process (`make bench-worker`).

Same engine configuration both ways (vLLM on CPU, the built-in tiny Llama with seeded dummy
weights), same batch: N concurrent requests with distinct prompts, greedy, ignore EOS. Reports
the best of R runs for each path."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cascadeinfer.proto.v1 import worker_pb2_grpc
from cascadeinfer.worker.engine import EngineRequest, SamplingSpec

from tests.worker.daemons import workers
from tests.worker.streams import generate_request


def prompt(i: int, length: int) -> list[int]:
    return [(i * 131 + k * 7) % 1000 + 1 for k in range(length)]


def direct(n: int, length: int, max_tokens: int, run: int) -> float:
    from cascadeinfer.worker.engines.vllm_engine import build_vllm_engine

    engine = build_vllm_engine("", {})
    best = 0.0
    for r in range(run):
        for i in range(n):
            sampling = SamplingSpec(max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(
                EngineRequest(f"d{r}-{i}", tuple(prompt(i + 1000 * r, length)), sampling)
            )
        started = time.perf_counter()
        tokens = 0
        while engine.has_unfinished():
            tokens += sum(len(p.new_token_ids) for p in engine.step().progress)
        best = max(best, tokens / (time.perf_counter() - started))
    engine.shutdown()
    return best


def through_daemon(n: int, length: int, max_tokens: int, run: int) -> float:
    """N concurrent Generate streams from one asyncio client (cheaper than N threads)."""
    best = 0.0
    with (
        tempfile.TemporaryDirectory() as tmp,
        workers([["--engine", "vllm"]], Path(tmp)) as (worker,),
    ):

        async def one(stub: worker_pb2_grpc.WorkerServiceStub, rid: str, p: list[int]) -> int:
            count = 0
            async for r in stub.Generate(generate_request(rid, p, max_tokens)):
                count += len(r.tokens.token_ids)
            return count

        async def batch(r: int) -> float:
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                started = time.perf_counter()
                counts = await asyncio.gather(
                    *(one(stub, f"w{r}-{i}", prompt(i + 1000 * r, length)) for i in range(n))
                )
                return sum(counts) / (time.perf_counter() - started)

        for r in range(run):
            best = max(best, asyncio.run(batch(r)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    a = parser.parse_args()
    d = direct(a.requests, a.prompt_len, a.max_tokens, a.runs)
    w = through_daemon(a.requests, a.prompt_len, a.max_tokens, a.runs)
    print(f"{a.requests} requests x {a.max_tokens} tokens, prompt {a.prompt_len}, best of {a.runs}")
    print(f"vLLM engine called directly: {d:.0f} tokens/s")
    print(f"through cascade-worker (gRPC, loopback): {w:.0f} tokens/s ({w / d:.1%} of direct)")


if __name__ == "__main__":
    main()
