"""Faults under load, longer than the CI test (`.venv/bin/python bench/bench_faults.py`): real
scheduler and sim worker daemons on loopback, `--concurrency` clients, and `--rounds` rounds of
every fault of tests/scheduler/test_faults_under_load.py (a worker frozen 2 s, killed, drained;
a migration target killed with a KV stream into it in flight; the scheduler restarted). Every
request is judged by the invariant checker (tests/scheduler/load.py); prints the counts.

`--engine vllm`: the workers are multiprocess vLLM on CPU (the built-in tiny model) instead.
Their KV moves rank to rank on a side channel, which the mid-transfer kill cannot watch, so that
fault is left out; and each request is held to every token index once and in order, not to
token values (the sim engine's are known without running it)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.worker.tiny_model import TINY_LLAMA_CONFIG

from tests.scheduler.faults import (
    FAULT_SCHEDULER,
    FAULT_WORKER,
    Cluster,
    inject_all,
    no_requests_left,
)
from tests.scheduler.load import Load, check

VLLM_FAULT_WORKER = ["--engine", "vllm", "--drain-timeout-s", "20"]
"""A multiprocess vLLM worker on CPU with the built-in tiny model."""
TINY_VOCAB = int(str(TINY_LLAMA_CONFIG["vocab_size"]))
"""The built-in tiny model's vocabulary: prompt token ids stay below it."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--engine", choices=["sim", "vllm"], default="sim")
    p.add_argument("--log-dir", type=Path, help="keep the daemons' logs here (default: dropped)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.log_dir is not None:
            a.log_dir.mkdir(parents=True, exist_ok=True)
        is_sim = a.engine == "sim"
        worker = FAULT_WORKER if is_sim else VLLM_FAULT_WORKER
        cluster = Cluster(a.log_dir or Path(tmp), FAULT_SCHEDULER, worker, num_workers=3)
        with cluster:
            started = time.monotonic()
            vocab = {} if is_sim else {"vocab_size": TINY_VOCAB}
            load = Load(cluster.address, a.concurrency, seed=a.seed, **vocab).start()
            try:
                # A vLLM worker takes minutes to replace on 2 shared cores.
                run = inject_all(
                    cluster,
                    load,
                    rounds=a.rounds,
                    kill_mid_transfer=is_sim,
                    progress_timeout_s=60 if is_sim else 240,
                )
            finally:
                outcomes = load.stop()
            seconds = time.monotonic() - started
            v = check(outcomes, run.windows, exact_tokens=is_sim)
            idle = no_requests_left(cluster)
    print(f"{a.rounds} rounds, {a.concurrency} clients, {seconds:.0f} s under load")
    print("faults injected:", ", ".join(f"{k} x{n}" for k, n in run.num_injected.items()))
    print(
        f"requests {v.num_requests}: completed {v.num_completed} "
        f"({'exact tokens' if is_sim else 'every token index once, in order'}), "
        f"failed with UNAVAILABLE at a scheduler crash {v.num_failed_clearly} "
        f"({v.num_failed_with_tokens} of them running, the rest sent while it was down), "
        f"lost {len(v.lost)}"
    )
    print(f"tokens {v.num_tokens}, migrations {v.num_migrations}, workers idle after: {idle}")
    for line in v.lost[:20]:
        print("  lost:", line)


if __name__ == "__main__":
    main()
