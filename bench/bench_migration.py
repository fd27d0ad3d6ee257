"""Live migration between two cascade-worker daemons on loopback (`make bench-migration`).

For several sequence lengths: a request decodes on worker A, then A.MigrateOut moves it to B.
Reports the pause (time the request did not decode), the total time, the KV bytes moved and the
transfer rate (bytes / total time). Engine: `sim` with 32 KiB of KV per token (a Llama-3.2-1B
sized cache: 16 layers x 8 KV heads x 64 x K,V x 2 bytes) unless --engine vllm is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.proto.v1 import worker_pb2

from tests.worker.daemons import workers
from tests.worker.streams import GenerateReader, Spliced, generate_request

SIM = [
    "--engine",
    "sim",
    "--sim-kv-bytes-per-token",
    "32768",
    "--sim-max-model-len",
    "32768",
    "--sim-num-blocks",
    "8192",
]


# vLLM on CPU with the built-in tiny Llama: 16 KiB of KV per 32-token block.
VLLM = ["--engine", "vllm", "--vllm-option", "max_model_len=4096"]
# The same with the engine core in its own process (AsyncLLM): it migrates by recompute only.
ENGINES = {"sim": SIM, "vllm": VLLM, "vllm-mp": [*VLLM, "--vllm-option", "multiprocess=true"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["kv", "recompute"], default="kv")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="sim")
    args = parser.parse_args()
    mode = (
        worker_pb2.MIGRATION_MODE_KV if args.mode == "kv" else worker_pb2.MIGRATION_MODE_RECOMPUTE
    )
    rows = []
    engine_args = ENGINES[args.engine]
    with (
        tempfile.TemporaryDirectory() as tmp,
        workers([engine_args, engine_args], Path(tmp)) as (a, b),
    ):
        for length in [int(x) for x in args.lengths.split(",")]:
            samples = []
            for rep in range(args.repeats):
                rid = f"m{length}-{rep}"
                out = Spliced()
                src, dst = (a, b) if rep % 2 == 0 else (b, a)
                prompt = [(k * 7 + rep) % 1000 + 1 for k in range(length - 8)]
                max_tokens = 4000 if args.engine == "sim" else 4096 - len(prompt)
                reader = GenerateReader(src.stub(), generate_request(rid, prompt, max_tokens), out)
                reader.wait_tokens(8, timeout=300)
                started = time.perf_counter()
                r = src.stub().MigrateOut(
                    worker_pb2.MigrateOutRequest(
                        request_id=rid, target_address=dst.address, mode=mode
                    ),
                    timeout=300,
                )
                wall = time.perf_counter() - started
                dst.stub().Abort(worker_pb2.AbortRequest(request_id=rid))
                reader.join()
                samples.append((r.context_len, r.pause_s, r.total_s, r.num_bytes, wall))
            ctx = samples[0][0]
            pause = statistics.median(s[1] for s in samples)
            total = statistics.median(s[2] for s in samples)
            nbytes = samples[0][3]
            rows.append((ctx, pause, total, nbytes, nbytes / total if total else 0.0))
    print(f"| context tokens | pause ms (median of {args.repeats}) | total ms | KV MiB | MiB/s |")
    print("|---|---|---|---|---|")
    for ctx, pause, total, nbytes, rate in rows:
        print(
            f"| {ctx} | {pause * 1e3:.1f} | {total * 1e3:.1f} | {nbytes / 2**20:.1f} | {rate / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
