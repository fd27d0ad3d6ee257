"""The OpenAI HTTP front's data plane under `vllm bench serve`: new streams per second (short
outputs) and tokens relayed per second (long outputs), with the scheduler's CPU per stream and
per token, against sim workers whose steps take no wall time (so the scheduler is measured).

Starts the sim workers and one scheduler (`--http-port`, the tiny tokenizer), then runs
`bench/vllm_bench_serve.py` (`vllm bench serve`, openai backend, random dataset, ignore_eos)
once per row after a warm-up. Prints JSON. With --profile-dir, py-spy samples the scheduler
during each row (summarize with bench/profile_summary.py).

    .venv/bin/python bench/bench_http_load.py --workers 6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.worker.tiny_model import write_tiny_tokenizer

from bench.bench_scheduler import cpu_seconds, py_spy, require_py_spy
from tests.worker.daemons import start_scheduler, workers

HERE = Path(__file__).resolve().parent
SIM = [
    "--engine", "sim", "--sim-max-model-len", "8192", "--sim-kv-bytes-per-token", "64",
    "--sim-time-scale", "0",
]  # fmt: skip
ROWS = {
    "streams": {"input": 16, "output": 8},
    "relay": {"input": 16, "output": 1000},
}


def bench_serve(
    base_url: str, tokenizer: Path, row: str, prompts: int, concurrency: int, result: Path
) -> dict[str, Any]:
    shape = ROWS[row]
    command = [
        sys.executable, str(HERE / "vllm_bench_serve.py"),
        "--backend", "openai", "--base-url", base_url, "--model", "sim",
        "--tokenizer", str(tokenizer), "--dataset-name", "random",
        "--random-input-len", str(shape["input"]), "--random-output-len", str(shape["output"]),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result", "--save-detailed",
        "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--stream-prompts", type=int, default=3000)
    p.add_argument("--stream-concurrency", type=int, default=100)
    p.add_argument("--relay-prompts", type=int, default=200)
    p.add_argument("--relay-concurrency", type=int, default=100)
    p.add_argument("--profile-dir", help="py-spy the scheduler during each row into DIR/ROW.txt")
    args = p.parse_args()
    profiles = Path(args.profile_dir) if args.profile_dir else None
    if profiles is not None:
        require_py_spy()
        profiles.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = write_tiny_tokenizer(tmp / "tokenizer")
        with workers([SIM] * args.workers, tmp) as daemons:
            third = args.workers // 3
            stages = f"0-256:{third},256-512:{third},512-8192:{args.workers - 2 * third}"
            args_ = [
                "--workers", ",".join(d.address for d in daemons), "--stages", stages,
                "--tokenizer", str(tokenizer), "--http-port", "0", "--max-queue", "100000",
            ]  # fmt: skip
            scheduler = start_scheduler(args_, tmp)
            try:
                base = scheduler.openai_url.removesuffix("/v1")
                pid = scheduler.process.pid
                bench_serve(base, tokenizer, "streams", 300, args.stream_concurrency, tmp / "w")
                plan = {
                    "streams": (args.stream_prompts, args.stream_concurrency),
                    "relay": (args.relay_prompts, args.relay_concurrency),
                }
                for row, (prompts, concurrency) in plan.items():
                    before = cpu_seconds(pid)
                    with py_spy(pid, profiles / f"{row}.txt" if profiles else None):
                        r = bench_serve(base, tokenizer, row, prompts, concurrency, tmp / row)
                    cpu = cpu_seconds(pid) - before
                    n, tokens = r["completed"], r["total_output_tokens"]
                    results[row] = {
                        "prompts": prompts,
                        "concurrency": concurrency,
                        "completed": n,
                        "failed": r.get("failed", 0),
                        "errors": sorted({e[:200] for e in r.get("errors", []) if e}),
                        "duration_s": r["duration"],
                        "streams_per_s": r["request_throughput"],
                        "output_tokens_per_s": r["output_throughput"],
                        "ttft_p50_ms": r["median_ttft_ms"],
                        "ttft_p99_ms": r["p99_ttft_ms"],
                        "tpot_p50_ms": r["median_tpot_ms"],
                        "scheduler_cpu_s": cpu,
                        "scheduler_cpu_share": cpu / r["duration"],
                        "streams_per_scheduler_cpu_s": n / cpu,
                        "tokens_per_scheduler_cpu_s": tokens / cpu,
                    }
            finally:
                scheduler.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
