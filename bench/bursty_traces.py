"""Writes the bursty JSONL traces the policy work of 2026-12-01 was checked on (docs/benchmarks.md,
"Policy changes of 2026-12-01"): reasoning-style, production-like, long-context and chat traffic
with Gamma inter-arrival gaps, independent of the presets `cascade bench sim` knows.

    python bench/bursty_traces.py OUT_DIR

Lengths are log-normal (median, sigma) and clamped; arrivals are Gamma with the given
coefficient of variation at 5 req/s (`cascade bench sim --rate R` rescales them, keeping the
burstiness).
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

Lengths = tuple[int, int]


def _ln(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, median * math.exp(rng.gauss(0, sigma)))))


def chat(rng: random.Random) -> Lengths:
    return _ln(rng, 100, 1.0, 4, 4096), _ln(rng, 220, 0.9, 1, 2048)


def reasoning(rng: random.Random) -> Lengths:
    return _ln(rng, 300, 0.8, 16, 4000), _ln(rng, 3000, 0.9, 64, 32_000)


def documents(rng: random.Random) -> Lengths:
    return _ln(rng, 12_000, 1.0, 2048, 120_000), _ln(rng, 250, 0.8, 1, 4096)


def production(rng: random.Random) -> Lengths:
    u = rng.random()
    return chat(rng) if u < 0.55 else reasoning(rng) if u < 0.8 else documents(rng)


def long_context(rng: random.Random) -> Lengths:
    u = rng.random()
    if u < 0.6:
        return chat(rng)
    if u < 0.9:
        prompt = _ln(rng, 6000, 0.8, 4, 131_000)
    else:
        prompt = int(math.exp(math.log(32_768) + rng.random() * math.log(120_000 / 32_768)))
    return prompt, _ln(rng, 200, 0.8, 1, 4096)


TRACES: dict[str, tuple[Callable[[random.Random], Lengths], float, int]] = {
    # name: (lengths, inter-arrival CV, seed)
    "reasoning": (reasoning, 2.0, 11),
    "prod": (production, 2.0, 11),
    "lc": (long_context, 2.0, 11),
    "r2": (reasoning, 3.0, 23),
    "p2": (production, 2.5, 29),
    "l2": (long_context, 1.5, 31),
    "c2": (chat, 2.0, 37),
}


def write(path: Path, lengths: Callable[[random.Random], Lengths], cv: float, seed: int) -> None:
    rng, now, shape, rate = random.Random(seed), 0.0, 1.0 / cv**2, 5.0
    with path.open("w") as f:
        for _ in range(3000):
            now += rng.gammavariate(shape, 1.0 / (rate * shape))
            prompt, output = lengths(rng)
            row = {"arrival_s": round(now, 4), "prompt_len": prompt, "output_len": output}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bursty-traces")
    out.mkdir(parents=True, exist_ok=True)
    for name, (lengths, cv, seed) in TRACES.items():
        write(out / f"{name}.jsonl", lengths, cv, seed)


if __name__ == "__main__":
    main()
