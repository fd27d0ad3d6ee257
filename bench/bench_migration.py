"""Live migration between two cascade-worker daemons on loopback (`make bench-migration`).

For several sequence lengths: a request decodes on worker A, then A.MigrateOut moves it to B.
Reports the pause (time the request did not decode, as MigrateOut measures it: from the stop to
the target's answer), the gap a client sees (from the stop to the target's first new token on its
step feed: for recompute mode this includes the target's prefill, which the pause does not), the
total time, the KV bytes moved and the transfer rate (bytes / total time). Engine: `sim` with 32 KiB of KV per token (a Llama-3.2-1B
sized cache: 16 layers x 8 KV heads x 64 x K,V x 2 bytes) unless --engine vllm is given.
Between multiprocess vLLM workers the blocks go rank to rank unless `--kv-road daemons`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.proto.v1 import common_pb2, worker_pb2

from tests.worker.daemons import workers
from tests.worker.streams import FeedReader, GenerateReader, Spliced, generate_request

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


# vLLM on CPU with the built-in tiny Llama (16 KiB of KV per 32-token block): "vllm-mp" with the
# engine core in its own process (AsyncLLM, KV through mp_kv_connector: the worker's default),
# "vllm" the in-process engine.
VLLM_MP = ["--engine", "vllm", "--vllm-option", "max_model_len=4096"]
ENGINES = {
    "sim": SIM,
    "vllm": [*VLLM_MP, "--vllm-option", "multiprocess=false"],
    "vllm-mp": VLLM_MP,
}
LLAMA_8B_KV = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 32,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
"""--kv-geometry 8b: Llama-3-8B's KV cache (32 layers x 8 KV heads x 128, bf16: 128 KiB per
token) on a model whose other weights are small, so CPU prefill stays affordable."""


def llama_8b_kv_args(directory: Path, max_model_len: int) -> list[str]:
    from cascadeinfer.worker.tiny_model import write_tiny_llama

    path = write_tiny_llama(directory, max_position_embeddings=max_model_len)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **LLAMA_8B_KV}))
    options = {
        "load_format": "cascade-dummy",
        "served_model_name": "llama-8b-kv",
        "max_model_len": max_model_len,
        # One request of max_model_len tokens at 128 KiB each, plus 2,048 tokens: each moved
        # request is aborted before the next starts. Room for two (9 GiB a worker at 32K
        # tokens) ran this 24 GiB host out of memory.
        "cpu_kv_cache_gib": -(-(max_model_len + 2048) * 128 // 2**20),
        # A 32K-token prompt prefilled in one step took one worker to 14 GiB and the OOM
        # killer took it: chunks of 4,096 tokens.
        "max_num_batched_tokens": 4096,
    }
    args = ["--model", str(path)]
    for k, v in options.items():
        args += ["--vllm-option", f"{k}={v}"]
    return args


class FirstArrival(Spliced):
    """Records when the first tokens arrive (on the target's step feed)."""

    arrived_at: float = 0.0

    def add(self, chunk: common_pb2.TokenChunk, finish: int) -> None:
        if not self.arrived_at:
            self.arrived_at = time.perf_counter()
        super().add(chunk, finish)


@dataclass
class StepClock(Spliced):
    """Records when each chunk of the source's stream arrives: one per engine step."""

    arrivals: list[float] = field(default_factory=list)

    def add(self, chunk: common_pb2.TokenChunk, finish: int) -> None:
        self.arrivals.append(time.perf_counter())
        super().add(chunk, finish)

    def step_s(self) -> float:
        """The median gap between chunks after the first (decode steps before the stop)."""
        gaps = [b - a for a, b in zip(self.arrivals[1:], self.arrivals[2:], strict=False)]
        return statistics.median(gaps) if gaps else math.nan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["kv", "recompute"], default="kv")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="sim")
    parser.add_argument(
        "--kv-geometry",
        choices=["tiny", "8b"],
        default="tiny",
        help="vllm engines: see LLAMA_8B_KV",
    )
    parser.add_argument(
        "--kv-road",
        choices=["rank-to-rank", "rank-to-rank-unencrypted", "daemons"],
        default="rank-to-rank",
        help="vllm-mp: blocks straight from rank to rank (the default; unencrypted: "
        "kv_peer_encrypt=false), or through both daemons and their ImportKV stream "
        "(kv_peer_host empty)",
    )
    args = parser.parse_args()
    mode = (
        worker_pb2.MIGRATION_MODE_KV if args.mode == "kv" else worker_pb2.MIGRATION_MODE_RECOMPUTE
    )
    rows = []
    engine_args = ENGINES[args.engine]
    lengths = [int(x) for x in args.lengths.split(",")]
    max_model_len = 4096
    tmp = tempfile.mkdtemp(prefix="bench-migration-")
    if args.kv_geometry == "8b":
        # Room for the longest prompt and its decode, no more: each worker's KV pool is sized
        # from it, and two pools for 32K tokens (8 GiB each) ran this 24 GiB host out of memory.
        max_model_len = max(4096, -(-(max(lengths) + 1024) // 1024) * 1024)
        engine_args = [*engine_args, *llama_8b_kv_args(Path(tmp) / "model", max_model_len)]
    road_options = {"daemons": "kv_peer_host=", "rank-to-rank-unencrypted": "kv_peer_encrypt=false"}
    if args.engine == "vllm-mp" and args.kv_road in road_options:
        engine_args = [*engine_args, "--vllm-option", road_options[args.kv_road]]
    with workers([engine_args, engine_args], Path(tmp)) as (a, b):
        for length in lengths:
            samples = []
            for rep in range(args.repeats):
                rid = f"m{length}-{rep}"
                out = StepClock()
                src, dst = (a, b) if rep % 2 == 0 else (b, a)
                prompt = [(k * 7 + rep) % 1000 + 1 for k in range(length - 8)]
                max_tokens = 4000 if args.engine == "sim" else max_model_len - len(prompt)
                # A 16K-token prompt's CPU prefill takes minutes here.
                slack_s = 300 + length * 0.06
                reader = GenerateReader(
                    src.stub(), generate_request(rid, prompt, max_tokens), out, 2 * slack_s
                )
                reader.wait_tokens(8, timeout=slack_s)
                step = out.step_s()
                first = FirstArrival()
                feed = FeedReader(dst.stub(), {rid: first})
                r = src.stub().MigrateOut(
                    worker_pb2.MigrateOutRequest(
                        request_id=rid, target_address=dst.address, mode=mode
                    ),
                    timeout=slack_s,
                )
                answered = time.perf_counter()
                while not first.arrived_at and time.perf_counter() - answered < 60:
                    time.sleep(0.001)
                # The stop came pause_s before the answer.
                gap = first.arrived_at - (answered - r.pause_s)
                feed.close()
                dst.stub().Abort(worker_pb2.AbortRequest(request_id=rid))
                reader.join(slack_s)
                samples.append((r.context_len, r.pause_s, r.total_s, r.num_bytes, gap, step))
            ctx = samples[0][0]
            pause = statistics.median(s[1] for s in samples)
            total = statistics.median(s[2] for s in samples)
            nbytes = samples[0][3]
            gap = statistics.median(s[4] for s in samples)
            step = statistics.median(s[5] for s in samples)
            rows.append((ctx, pause, gap, total, nbytes, nbytes / total if total else 0.0, step))
    print(
        f"| context tokens | pause ms (median of {args.repeats}) | gap to first token ms "
        "| total ms | KV MiB | MiB/s | decode step ms before |"
    )
    print("|---|---|---|---|---|---|---|")
    for ctx, pause, gap, total, nbytes, rate, step in rows:
        print(
            f"| {ctx} | {pause * 1e3:.1f} | {gap * 1e3:.1f} | {total * 1e3:.1f} "
            f"| {nbytes / 2**20:.1f} | {rate / 2**20:.0f} | {step * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
