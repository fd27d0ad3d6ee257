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


def summaries(rng: random.Random) -> Lengths:
    """Long inputs, short answers (summaries, extraction): prefill-heavy."""
    return _ln(rng, 4000, 0.9, 256, 32_000), _ln(rng, 150, 0.7, 1, 1024)


def code(rng: random.Random) -> Lengths:
    """Code assistants: a file or two of context, a short completion or a longer edit."""
    return _ln(rng, 1500, 1.0, 32, 16_000), _ln(rng, 120, 1.2, 1, 4096)


def shifting(rng: random.Random, progress: float) -> Lengths:
    """Chat for the first half of the trace, then production traffic (reasoning, documents)."""
    return chat(rng) if progress < 0.5 else production(rng)


def long_context(rng: random.Random) -> Lengths:
    u = rng.random()
    if u < 0.6:
        return chat(rng)
    if u < 0.9:
        prompt = _ln(rng, 6000, 0.8, 4, 131_000)
    else:
        prompt = int(math.exp(math.log(32_768) + rng.random() * math.log(120_000 / 32_768)))
    return prompt, _ln(rng, 200, 0.8, 1, 4096)


def _steady(
    lengths: Callable[[random.Random], Lengths],
) -> Callable[[random.Random, float], Lengths]:
    return lambda rng, _progress: lengths(rng)


TRACES: dict[str, tuple[Callable[[random.Random, float], Lengths], float, int]] = {
    # name: (lengths at a share of the trace done, inter-arrival CV, seed). The first seven
    # are those the policy work was checked on; the rest (added 2026-12-02) are kinds it was
    # never tuned on, to check that it generalizes.
    "reasoning": (_steady(reasoning), 2.0, 11),
    "prod": (_steady(production), 2.0, 11),
    "lc": (_steady(long_context), 2.0, 11),
    "r2": (_steady(reasoning), 3.0, 23),
    "p2": (_steady(production), 2.5, 29),
    "l2": (_steady(long_context), 1.5, 31),
    "c2": (_steady(chat), 2.0, 37),
    "sum": (_steady(summaries), 1.5, 41),
    "code": (_steady(code), 2.0, 43),
    "prod1": (_steady(production), 1.0, 47),
    "shift": (shifting, 2.0, 53),
}


def write(
    path: Path,
    lengths: Callable[[random.Random, float], Lengths],
    cv: float,
    seed: int,
    count: int = 3000,
) -> None:
    rng, now, shape, rate = random.Random(seed), 0.0, 1.0 / cv**2, 5.0
    with path.open("w") as f:
        for i in range(count):
            now += rng.gammavariate(shape, 1.0 / (rate * shape))
            prompt, output = lengths(rng, i / count)
            row = {"arrival_s": round(now, 4), "prompt_len": prompt, "output_len": output}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bursty-traces")
    out.mkdir(parents=True, exist_ok=True)
    for name, (lengths, cv, seed) in TRACES.items():
        write(out / f"{name}.jsonl", lengths, cv, seed)


if __name__ == "__main__":
    main()
