"""Replays cascade's layout selection offline, to compare selection rules on many cells at once.

    python bench/selection_rules.py collect OUT.jsonl CELLS.jsonl...
    python bench/selection_rules.py evaluate OUT.jsonl CELLS.jsonl...

`collect` takes the cells of `bench/no_regret.py` or `bench/random_mixtures.py` runs (their
`--out` files: trace name and rate), redraws each trace as those scripts draw it (3,000
requests for the kinds of `bench/bursty_traces.py`, `NREQ` in the environment to change it; a
random mixture's own length), plans for it exactly as `cascade bench sim --workload TRACE
--rate R --seed 1` does, and writes every layout candidate's figures on the selection traces and
on the cell's own trace. The rule that picks among candidates never changes what they are, so
`evaluate` can then apply any rule to the written figures and score the candidate each picks
against the best baseline of the cell (from the same `--out` files): cells over 1.02x,
geometric means, worst cells. Rules: `shipped` (`stage_count.pick`) and `before` (the rule of
the twenty-third session: a split had to beat the one-stage form kept by MIN_GAIN on the mean
and on the average of mean and p99, with no bound of its own on the p99). About 8 minutes per
80 cells of 3,000 requests on 2 cores for `collect`; `evaluate` takes a second.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bursty_traces
import random_mixtures
from cascadeinfer import stage_count
from cascadeinfer.evaluation.simbench import SimSetup, policy_options, setup_trace
from cascadeinfer.planning import load_profile
from cascadeinfer.policies import plan_cascade
from cascadeinfer.stage_count import Candidate, simulated_e2e

PROFILE = "gpu-h100-llama3-8b"
INSTANCES = 16
REGRET = 1.02


def _trace_file(name: str, directory: Path) -> Path:
    kind, seed = name.rsplit("-", 1)
    path = directory / f"{name}.jsonl"
    if not path.exists():
        if kind == "mix":
            random_mixtures.write_trace(int(seed), path)
        else:
            lengths, arrivals, _ = bursty_traces.TRACES[kind]
            requests = int(os.environ.get("NREQ", "3000"))
            bursty_traces.write(path, lengths, arrivals, int(seed), requests)
    return path


def _collect_cell(args: tuple[str, float, str]) -> dict[str, object]:
    name, rate, directory = args
    path = _trace_file(name, Path(directory))
    num_requests = sum(1 for line in path.open() if line.strip())
    setup = SimSetup(
        policy="cascade",
        profile=load_profile(PROFILE),
        workload=str(path),
        num_instances=INSTANCES,
        num_requests=num_requests,
        seed=1,
    )
    trace = setup_trace(setup, rate)
    # The plan `run_at_rate` runs cascade with, and every candidate it chose among.
    result = plan_cascade(setup.profile, INSTANCES, **policy_options(setup, rate, len(trace)))
    candidates = [
        {
            "num_stages": c.num_stages,
            "selection": c.per_trace,
            "on_trace": simulated_e2e(
                c.plan, result.workload, setup.profile, INSTANCES, trace, c.config
            ),
        }
        for c in result.candidates
    ]
    return {"trace": name, "rate": rate, "candidates": candidates}


def _cells(files: list[str]) -> list[tuple[str, float]]:
    return [
        (cell["trace"], float(cell["rate"]))
        for f in files
        for cell in map(json.loads, Path(f).read_text().splitlines())
    ]


def collect(out: str, files: list[str]) -> None:
    directory = Path(out).with_suffix(".traces")
    directory.mkdir(exist_ok=True)
    jobs = [(name, rate, str(directory)) for name, rate in _cells(files)]
    for name, _, _ in jobs:
        _trace_file(name, directory)  # here, not in two workers racing on one file
    with ProcessPoolExecutor(2) as pool, open(out, "w") as f:
        for cell in pool.map(_collect_cell, jobs):
            f.write(json.dumps(cell) + "\n")
            f.flush()


def _before(candidates: list[Candidate], num_traces: int) -> Candidate:
    """`stage_count.pick` as the twenty-third session left it."""
    plain = candidates[0]
    single = stage_count.one_stage_form([c for c in candidates if c.num_stages == 1])
    gain = stage_count.MIN_GAIN
    splits = [
        c
        for c in candidates
        if c.num_stages > 1
        and not c.is_pruned(num_traces)
        and stage_count.split_beats(c, plain)
        and stage_count._beats(c, single, "mean", gain, -gain, 1.0)
    ]
    if not splits:
        return single
    ratios = stage_count.paired_ratios
    return min(splits, key=lambda c: (sum(ratios(c, single, "mean")) / 2, c.num_stages))


RULES: dict[str, Callable[[list[Candidate], int], Candidate]] = {
    "shipped": stage_count.pick,
    "before": _before,
}


def evaluate(collected: str, files: list[str]) -> None:
    best: dict[tuple[str, float], tuple[float, float]] = {}
    for f in files:
        for cell in map(json.loads, Path(f).read_text().splitlines()):
            figures = [v for k, v in cell["figures"].items() if k != "cascade"]
            key = (cell["trace"], float(cell["rate"]))
            best[key] = (min(v[0] for v in figures), min(v[1] for v in figures))
    cells = [json.loads(line) for line in Path(collected).read_text().splitlines()]
    for name, rule in RULES.items():
        ratios, over = [], []
        for cell in cells:
            raw = cell["candidates"]
            candidates = [
                Candidate(c["num_stages"], None, None, tuple(map(tuple, c["selection"])))  # type: ignore[arg-type]
                for c in raw
            ]
            chosen = rule(candidates, max(len(c.per_trace) for c in candidates))
            mean, p99 = raw[candidates.index(chosen)]["on_trace"]
            best_mean, best_p99 = best[(cell["trace"], float(cell["rate"]))]
            ratio = (mean / best_mean, p99 / best_p99)
            ratios.append(ratio)
            if max(ratio) > REGRET:
                over.append(f"{cell['trace']}@{cell['rate']:g} {ratio[0]:.3f}/{ratio[1]:.3f}")
        geo = [math.exp(sum(math.log(r[k]) for r in ratios) / len(ratios)) for k in (0, 1)]
        print(
            f"{name}: {len(cells)} cells, mean over {REGRET}x in "
            f"{sum(r[0] > REGRET for r in ratios)}, p99 in {sum(r[1] > REGRET for r in ratios)}; "
            f"geometric means {geo[0]:.3f} / {geo[1]:.3f}; worst "
            f"{max(r[0] for r in ratios):.3f} / {max(r[1] for r in ratios):.3f}"
        )
        for line in over:
            print(f"    over: {line}")


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] not in ("collect", "evaluate"):
        sys.exit(__doc__)
    (collect if sys.argv[1] == "collect" else evaluate)(sys.argv[2], sys.argv[3:])


if __name__ == "__main__":
    main()
