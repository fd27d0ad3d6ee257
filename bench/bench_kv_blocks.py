"""KV block copies out of and into an engine's cache tensors, alone: the part of a KV migration
that runs on each rank (`worker/engines/kv_blocks.py`), timed on Llama-3-8B's KV geometry
(32 layers, 8 KV heads of 128, bf16, 16-token blocks: 2 MiB a block) without vLLM.

    python bench/bench_kv_blocks.py [--tokens 1024,4096,16384] [--repeats 5]

Prints MiB/s per path, median of the repeats: "indexing" gathers and scatters rows by tensor
indexing (how every cache was copied before, and still how a strided one is), "byte rows" the
default path (runs of whole blocks as byte rows), "rows as views" the same without the
per-block `bytes` objects (what the multiprocess connector hands ZeroMQ). Blocks are taken
every other one, so no two are neighbours: the worst case for runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from cascadeinfer.worker.engines import kv_blocks

LAYERS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _stacked(blobs: list[bytes]) -> np.ndarray:
    """The blobs joined into one table, as the indexing path took them."""
    return np.stack([np.frombuffer(b, dtype=np.uint8) for b in blobs])


def _timings(
    caches: list[torch.Tensor],
    num_blocks: int,
    ids: list[int],
    into: list[int],
    blobs: list[bytes],
    repeats: int,
) -> list[float]:
    """Median seconds of each path, in the table's column order."""
    paths: list[Callable[[], object]] = [
        lambda: [r.tobytes() for r in kv_blocks._gathered_table(caches, num_blocks, ids)],
        lambda: kv_blocks.read_blocks(caches, num_blocks, ids),
        lambda: kv_blocks.read_block_rows(caches, num_blocks, ids),
        lambda: kv_blocks._scatter(caches, num_blocks, into, _stacked(blobs)),
        lambda: kv_blocks.write_blocks(caches, num_blocks, into, blobs),
    ]
    return [_median_s(path, repeats) for path in paths]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    num_blocks = 2 * max(lengths) // BLOCK + 2
    caches = [
        torch.zeros(num_blocks, 2, BLOCK, KV_HEADS, HEAD, dtype=torch.bfloat16)
        for _ in range(LAYERS)
    ]
    for c in caches:
        c.view(torch.int16).random_(-30000, 30000)
    print(f"{LAYERS} layers, {kv_blocks.block_bytes_of(caches, num_blocks) >> 20} MiB a block")
    print(
        "| tokens | MiB | read: indexing | read: byte rows | read: rows as views "
        "| write: indexing | write: byte rows |"
    )
    print("|---|---|---|---|---|---|---|")
    for tokens in lengths:
        ids = list(range(0, 2 * (tokens // BLOCK), 2))
        into = [i + 1 for i in ids]
        mib = len(ids) * kv_blocks.block_bytes_of(caches, num_blocks) / 2**20
        blobs = kv_blocks.read_blocks(caches, num_blocks, ids)
        rates = [mib / s for s in _timings(caches, num_blocks, ids, into, blobs, args.repeats)]
        print(f"| {tokens} | {mib:.0f} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
