"""The worker daemon's overhead: Generate tokens/s through cascade-worker against the same vLLM
engine driven directly (`make bench-worker`).

Same engine configuration both ways (vLLM on CPU, the built-in tiny Llama with seeded dummy
weights unless --model names a model directory), same batch: N concurrent requests with
distinct prompts, greedy, ignore EOS. Reports the best of R runs for each path.

--layout inprocess: VllmEngine stepped directly against a worker with the in-process engine
(needs VLLM_ENABLE_V1_MULTIPROCESSING=0). --layout mp: AsyncLLM driven directly (its engine core
in its own process, N `generate` streams on one asyncio loop) against a worker started with
`--vllm-option multiprocess=true --vllm-option move_kv=false` (the same process layout and vLLM
settings behind gRPC: neither loads the KV connector)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cascadeinfer.proto.v1 import worker_pb2_grpc
from cascadeinfer.worker.engine import EngineRequest, SamplingSpec
from cascadeinfer.worker.engines.vllm_engine import SEEDED_DUMMY_LOAD_FORMAT

from tests.worker.daemons import workers
from tests.worker.streams import generate_request


def prompt(i: int, length: int) -> list[int]:
    return [(i * 131 + k * 7) % 1000 + 1 for k in range(length)]


BIGGER = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
}
"""--bigger: a Llama geometry whose CPU decode step takes tens of milliseconds, like a real model
on a GPU (weights are the seeded dummy ones)."""


def bigger_model(directory: Path) -> str:
    from cascadeinfer.worker.tiny_model import write_tiny_llama

    path = write_tiny_llama(directory)
    config_file = path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **BIGGER}))
    return str(path)


def direct_async_llm(
    n: int, length: int, max_tokens: int, run: int, model: str, options: dict[str, Any]
) -> float:
    """AsyncLLM as vLLM's own API server drives it: one asyncio loop, one stream per request."""
    from cascadeinfer.worker.engines.vllm_engine import resolve_config
    from cascadeinfer.worker.engines.vllm_mp_engine import engine_args
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    config = resolve_config(model, {**options, "multiprocess": True})
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )

    async def measure() -> float:
        llm = AsyncLLM.from_engine_args(engine_args(config))

        async def one(rid: str, p: list[int]) -> int:
            count = 0
            async for out in llm.generate({"prompt_token_ids": p}, params, rid):
                count += len(out.outputs[0].token_ids)
            return count

        best = 0.0
        for r in range(run):
            started = time.perf_counter()
            counts = await asyncio.gather(
                *(one(f"d{r}-{i}", prompt(i + 1000 * r, length)) for i in range(n))
            )
            best = max(best, sum(counts) / (time.perf_counter() - started))
        llm.shutdown()
        return best

    return asyncio.run(measure())


def direct(
    n: int, length: int, max_tokens: int, run: int, model: str, options: dict[str, Any]
) -> float:
    from cascadeinfer.worker.engines.vllm_engine import build_vllm_engine

    engine = build_vllm_engine(model, options)
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


def through_daemon(n: int, length: int, max_tokens: int, run: int, args: list[str]) -> float:
    """N concurrent Generate streams from one asyncio client (cheaper than N threads)."""
    best = 0.0
    with (
        tempfile.TemporaryDirectory() as tmp,
        workers([["--engine", "vllm", *args]], Path(tmp)) as (worker,),
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
    parser.add_argument("--layout", choices=["inprocess", "mp"], default="inprocess")
    parser.add_argument("--bigger", action="store_true", help="8 layers, hidden 1024 (BIGGER)")
    a = parser.parse_args()
    shape = (a.requests, a.prompt_len, a.max_tokens, a.runs)
    with tempfile.TemporaryDirectory() as tmp:
        model = bigger_model(Path(tmp)) if a.bigger else ""
        options: dict[str, Any] = (
            {"load_format": SEEDED_DUMMY_LOAD_FORMAT, "served_model_name": "bigger"}
            if a.bigger
            else {}
        )
        args = ["--model", model] if model else []
        if a.layout == "inprocess":
            options["multiprocess"] = False
        args += [arg for k, v in options.items() for arg in ("--vllm-option", f"{k}={v}")]
        if a.layout == "mp":
            d = direct_async_llm(*shape, model, options)
            # move_kv=false: no KV connector, as in the AsyncLLM driven directly.
            mp = ["--vllm-option", "multiprocess=true", "--vllm-option", "move_kv=false"]
            w = through_daemon(*shape, [*args, *mp])
            what = "AsyncLLM driven directly (engine core in its own process)"
        else:
            d = direct(*shape, model, options)
            w = through_daemon(*shape, args)
            what = "VllmEngine stepped directly in-process"
    print(f"{a.requests} requests x {a.max_tokens} tokens, prompt {a.prompt_len}, best of {a.runs}")
    print(f"{what}: {d:.0f} tokens/s")
    print(f"through cascade-worker (gRPC, loopback): {w:.0f} tokens/s ({w / d:.1%} of direct)")


if __name__ == "__main__":
    main()
