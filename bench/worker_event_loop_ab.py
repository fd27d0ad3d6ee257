"""Whether the event loop changes cascade-worker's Generate throughput: the daemon on vLLM's
multiprocess engine (tiny Llama, `move_kv=false`), 16 streams x 256 tokens, best of 3 per run,
with CASCADE_EVENT_LOOP=uvloop and =asyncio alternating in pairs (the order flips every pair,
so a drift of the machine's speed favours neither).

    python bench/worker_event_loop_ab.py [PAIRS]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_worker_overhead

MULTIPROCESS = ["--vllm-option", "multiprocess=true", "--vllm-option", "move_kv=false"]


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    for k in range(pairs):
        for loop in ("uvloop", "asyncio") if k % 2 == 0 else ("asyncio", "uvloop"):
            os.environ["CASCADE_EVENT_LOOP"] = loop  # the daemon inherits it
            started = time.time()
            rate = bench_worker_overhead.through_daemon(16, 64, 256, 3, MULTIPROCESS)
            print(
                f"pair {k} {loop:8s} {rate:8.0f} tokens/s ({time.time() - started:.0f} s, "
                f"load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
