"""The no-regret check on random length mixtures whose mix changes halfway through the trace,
under Markov-modulated arrivals (Poisson at a high or a low rate, in phases of exponential
length): bursts that last seconds to minutes, and traffic that shifts while they come. The
other held-out sets draw Gamma gaps (`bench/random_mixtures.py`) or one named kind
(`bench/no_regret.py`); this family was added after the last policy change, to look for the
shapes those miss.

    python bench/shifting_mixtures.py [--seeds 14000-14029] [--instances 16] [--out FILE.jsonl]

A seed fixes its trace and load: each half draws one to three length classes as
`random_mixtures.py` does (prompt medians log-uniform on [30, 40,000] tokens, answers on
[5, 8,000], spreads uniform on [0.3, 1.5]); the trace holds 1,000, 2,000 or 4,000 requests; the
high phase runs at 1.3-2.5 times the mean rate and the low one at 0.05-0.6, phases averaging
10, 30 or 90 s; replayed at 0.3-1.5 times its capacity on the fleet. Every cell runs all six
policies as `cascade bench sim --workload TRACE --rate R --seed 1` does (default profile).
About 5 minutes for 30 cells on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import no_regret
import random_mixtures

RATE = 5.0
"""Mean arrival rate of a written trace (req/s); the cell's rate rescales it."""


def _classes(rng: random.Random) -> list[random_mixtures.LengthClass]:
    return [
        (
            rng.random(),
            math.exp(rng.uniform(math.log(30), math.log(40_000))),
            rng.uniform(0.3, 1.5),
            math.exp(rng.uniform(math.log(5), math.log(8_000))),
            rng.uniform(0.3, 1.5),
        )
        for _ in range(rng.choice([1, 2, 3]))
    ]


def write_trace(seed: int, path: Path) -> tuple[str, float]:
    """Writes seed's trace to `path`; returns its shape in words and its load factor."""
    rng = random.Random(seed)
    halves = (_classes(rng), _classes(rng))
    num_requests = rng.choice([1000, 2000, 4000])
    high, low = rng.uniform(1.3, 2.5), rng.uniform(0.05, 0.6)
    mean_phase_s = rng.choice([10.0, 30.0, 90.0])
    t, is_high, phase_left_s = 0.0, True, mean_phase_s
    with path.open("w") as f:
        for k in range(num_requests):
            mix = halves[k >= num_requests // 2]
            c = random_mixtures._pick(mix, rng.random() * sum(x[0] for x in mix))
            prompt = max(1, min(120_000, int(rng.lognormvariate(math.log(c[1]), c[2]))))
            output = max(1, min(32_000, int(rng.lognormvariate(math.log(c[3]), c[4]))))
            waited = 0.0
            while True:  # memoryless: a gap past the phase's end starts over at the next rate
                gap = rng.expovariate(RATE * (high if is_high else low))
                if gap < phase_left_s:
                    phase_left_s -= gap
                    waited += gap
                    break
                waited += phase_left_s
                is_high = not is_high
                phase_left_s = rng.expovariate(1.0 / mean_phase_s)
            t += waited
            f.write(json.dumps({"arrival_s": t, "prompt_len": prompt, "output_len": output}) + "\n")
    shape = f"{num_requests} req, on/off {high:.1f}/{low:.2f} x{mean_phase_s:g}s"
    return shape, rng.uniform(0.3, 1.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="14000-14029", help="trace seeds, FIRST-LAST")
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write every cell's figures as JSONL")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shifting-mixtures-"))
    jobs: list[no_regret.Job] = []
    shapes: list[str] = []
    for seed in no_regret._seeds(args.seeds):
        path = tmp / f"shift-{seed}.jsonl"
        shape, factor = write_trace(seed, path)
        rate = round(factor * no_regret._capacity(path, args.instances), 3)
        num_requests = sum(1 for _ in path.open())
        jobs.append((str(path), rate, args.instances, num_requests, {}, "mean"))
        shapes.append(f"{shape}, {factor:.2f}x")
    cells = random_mixtures.run_cells(jobs, shapes, args.out)
    print(f"\n{random_mixtures.summary(cells)}")
    print(random_mixtures.goodput_summary(cells))


if __name__ == "__main__":
    main()
