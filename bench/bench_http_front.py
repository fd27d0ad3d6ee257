"""What the OpenAI HTTP front adds to a request's TTFT over the gRPC front of the same scheduler.

One sim worker (steps sleep their predicted `gpu-h100-llama3-8b` time), a scheduler serving
both APIs, requests one at a time (nothing queues): the same 32-token prompts as token ids,
4 output tokens, through gRPC `Generate` (time to the first message with tokens) and through
`POST /v1/completions` with `stream: true` (time to the first `data:` event), interleaved in
blocks of 50 after 20 warm-up requests each. The worker draws tokens below id 98, which the
tiny tokenizer decodes to printable ASCII (ids 0-3 are special tokens), so the first token
almost always carries text and the HTTP figure is not a wait for a later token. Prints JSON.

    .venv/bin/python bench/bench_http_front.py --requests 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import httpx
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.worker.tiny_model import write_tiny_tokenizer

from tests.worker.daemons import start_scheduler, workers

SIM = ["--engine", "sim", "--sim-vocab-size", "98", "--sim-max-model-len", "8192"]
BLOCK = 50


def grpc_ttft(stub: scheduler_pb2_grpc.SchedulerServiceStub, prompt: list[int]) -> float:
    request = scheduler_pb2.ClientGenerateRequest(
        prompt_token_ids=scheduler_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
    )
    started = time.perf_counter()
    stream = stub.Generate(request, timeout=30)
    next(iter(stream))
    elapsed = time.perf_counter() - started
    for _ in stream:
        pass
    return elapsed


def http_ttft(client: httpx.Client, url: str, prompt: list[int]) -> float:
    body = {"model": "sim", "prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    elapsed = 0.0
    with client.stream("POST", url, json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and not elapsed:
                elapsed = time.perf_counter() - started
    return elapsed


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    n = args.requests
    prompts = [[(i * 31 + k) % 94 + 4 for k in range(32)] for i in range(n + 20)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = write_tiny_tokenizer(tmp / "tokenizer")
        with workers([SIM], tmp) as (worker,):
            scheduler = start_scheduler(
                ["--workers", worker.address, "--tokenizer", str(tokenizer), "--http-port", "0"],
                tmp,
            )
            try:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(
                    grpc.insecure_channel(scheduler.address)
                )
                client = httpx.Client()
                url = f"{scheduler.openai_url}/completions"
                for prompt in prompts[:20]:
                    grpc_ttft(stub, prompt)
                    http_ttft(client, url, prompt)
                over_grpc: list[float] = []
                over_http: list[float] = []
                for start in range(20, n + 20, BLOCK):
                    block = prompts[start : start + BLOCK]
                    over_grpc += [grpc_ttft(stub, q) for q in block]
                    over_http += [http_ttft(client, url, q) for q in block]
            finally:
                scheduler.stop()
    g, h = summary(over_grpc), summary(over_http)
    added = {k: h[k] - g[k] for k in g}
    print(json.dumps({"requests": n, "grpc": g, "http": h, "added_by_http": added}, indent=2))


if __name__ == "__main__":
    main()
