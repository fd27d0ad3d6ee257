"""Traces of odd shape, each through every policy as `cascade bench sim --workload TRACE
--instances 16 --seed 1 --json` runs it: mean and p99 end-to-end latency, requests completed,
and the wall time of the command (planning included).

    python bench/odd_traces.py [NAME ...]

The traces (a fixed seed; written to a temporary folder):
- huge: chat-like at 8 req/s, one prompt in a hundred of 120,000 tokens;
- prefill_only: answers of one token, 20 req/s;
- constant: every request 512 prompt and 256 answer tokens, 10 req/s;
- gap: two bursts of 750 requests at 10 req/s, two hours apart;
- uniform: prompts uniform over 1-30,000 and answers over 1-4,000 tokens, 6 req/s (past
  capacity);
- instants: 50 requests at each of 30 instants 10 s apart;
- day: 5,000 chat-like requests over a day, 0.02-0.1 req/s on a sine (what a sparse trace
  costs in wall time);
- rate_shift: 2,000 chat requests at 25 req/s, then 2,000 documents of 4-30K tokens at 4 req/s;
- cyclic: six phases of 500 requests, chat at 20 req/s and documents (~15K tokens) at 3 req/s
  in turn;
- front: 300 reasoning requests (answers ~4,000 tokens) at 10 req/s, then chat at 12 req/s;
- agent_bursts: 30 bursts of 100 requests at once, a minute apart, prompts ~30K tokens and
  answers ~80.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cascadeinfer.config import POLICY_NAMES

Row = tuple[float, int, int]
"""(arrival s, prompt tokens, answer tokens)."""


def _poisson(rng: random.Random, n: int, rate: float, start: float = 0.0) -> list[float]:
    out, t = [], start
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _ln(rng: random.Random, mu: float, sigma: float) -> int:
    return int(rng.lognormvariate(mu, sigma)) + 1


def traces() -> dict[str, list[Row]]:
    rng = random.Random(7)
    out: dict[str, list[Row]] = {}
    out["huge"] = [
        (t, 120_000 if rng.random() < 0.01 else _ln(rng, 6, 1), _ln(rng, 5, 1))
        for t in _poisson(rng, 1500, 8)
    ]
    out["prefill_only"] = [(t, _ln(rng, 7, 1), 1) for t in _poisson(rng, 1500, 20)]
    out["constant"] = [(t, 512, 256) for t in _poisson(rng, 1500, 10)]
    first = _poisson(rng, 750, 10)
    second = _poisson(rng, 750, 10, first[-1] + 7200)
    out["gap"] = [(t, _ln(rng, 7, 1.5), _ln(rng, 5.5, 1.2)) for t in first + second]
    out["uniform"] = [
        (t, rng.randint(1, 30_000), rng.randint(1, 4000)) for t in _poisson(rng, 1500, 6)
    ]
    out["instants"] = [
        (i * 10.0, _ln(rng, 7, 1), _ln(rng, 5.5, 1)) for i in range(30) for _ in range(50)
    ]
    day_rng, t, day = random.Random(3), 0.0, []
    for _ in range(5000):
        t += day_rng.expovariate(0.06 + 0.04 * math.sin(2 * math.pi * t / 86_400))
        day.append((t, _ln(day_rng, 7, 1.2), _ln(day_rng, 5.5, 1.2)))
    out["day"] = day
    # Added in the twenty-fourth session: the rate moving with the kind of traffic.
    chat = _poisson(rng, 2000, 25)
    docs = _poisson(rng, 2000, 4, chat[-1])
    out["rate_shift"] = [(t, rng.randint(50, 600), rng.randint(50, 500)) for t in chat] + [
        (t, rng.randint(4000, 30_000), rng.randint(100, 1000)) for t in docs
    ]
    cyclic: list[Row] = []
    for phase in range(6):
        start = cyclic[-1][0] if cyclic else 0.0
        if phase % 2 == 0:
            cyclic += [
                (t, _ln(rng, 5, 1), _ln(rng, 5.3, 0.9)) for t in _poisson(rng, 500, 20, start)
            ]
        else:
            cyclic += [
                (t, min(120_000, _ln(rng, 9.6, 0.8)), _ln(rng, 5.7, 0.8))
                for t in _poisson(rng, 500, 3, start)
            ]
    out["cyclic"] = cyclic
    reasoning = _poisson(rng, 300, 10)
    out["front"] = [(t, _ln(rng, 5.7, 0.8), min(30_000, _ln(rng, 8.3, 0.8))) for t in reasoning] + [
        (t, _ln(rng, 5, 1), _ln(rng, 5.3, 0.9)) for t in _poisson(rng, 2700, 12, reasoning[-1])
    ]
    out["agent_bursts"] = [
        (b * 60.0 + k * 0.01, min(100_000, _ln(rng, 10.3, 0.4)), _ln(rng, 4.4, 0.8))
        for b in range(30)
        for k in range(100)
    ]
    return out


def main() -> None:
    all_traces = traces()
    names = sys.argv[1:] or list(all_traces)
    folder = Path(tempfile.mkdtemp(prefix="odd-traces-"))
    for name in names:
        path = folder / f"{name}.jsonl"
        with path.open("w") as f:
            for arrival, prompt, output in all_traces[name]:
                row = {"arrival_s": arrival, "prompt_len": prompt, "output_len": output}
                f.write(json.dumps(row) + "\n")
        print(f"{name}:")
        for policy in POLICY_NAMES:
            started = time.monotonic()
            run = subprocess.run(
                [sys.executable, "-m", "cascadeinfer.cli.main", "bench", "sim", "--policy",
                 policy, "--workload", str(path), "--instances", "16", "--seed", "1", "--json"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            wall = time.monotonic() - started
            if run.returncode != 0:
                print(f"  {policy:<13} error: {run.stderr.strip()[-200:]}")
                continue
            s = json.loads(run.stdout)
            print(
                f"  {policy:<13} mean {s['mean_e2e_s']:.3f} s  p99 {s['p99_e2e_s']:.2f} s  "
                f"completed {s['completed']}/{s['requests']}  run {s['sim_wall_s']:.1f} s  "
                f"wall {wall:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
