"""Checks the no-regret property on traffic drawn at random: every trace is a mixture of one to
four length classes with random medians and spreads, Gamma arrivals of a random coefficient of
variation, a random length and a random load. Nothing here was chosen by looking at the policy;
the point is to find the shapes of traffic `bench/no_regret.py`'s named kinds do not cover.

    python bench/random_mixtures.py [--seeds 1-40] [--instances 16] [--out FILE.jsonl]
                                    [--baselines-from EARLIER.jsonl]

A seed fixes its trace and its load: a class's weight is uniform on [0, 1), its prompt median
log-uniform on [30, 40,000] tokens and its answer median on [5, 8,000] (log-normal spreads
uniform on [0.3, 1.5], prompts clamped to 120,000 and answers to 32,000 tokens); the trace holds
500, 1,000, 2,000 or 4,000 requests at an arrival CV of 1, 1.5, 2, 3 or 4, replayed at 0.2-1.6
times its capacity on the fleet (the planner's bound, as `bench/no_regret.py --capacity-factors`
uses). Every cell runs all six policies as `cascade bench sim --workload TRACE --rate R --seed 1`
does (default profile). Cascade's figures equal to a baseline's on both mean and p99 mean it ran
that baseline decision for decision (one stage run least-load's or Llumnix's way); the summary
counts those cells apart. About 12 minutes for 40 cells on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import no_regret

RATE = 5.0
"""Mean arrival rate of a written trace (req/s); the cell's rate rescales it."""


LengthClass = tuple[float, float, float, float, float]
"""(weight, prompt median, prompt sigma, answer median, answer sigma)."""


def _pick(classes: list[LengthClass], u: float) -> LengthClass:
    """The class `u` (uniform on [0, total weight)) falls in; the last if rounding runs past."""
    for c in classes:
        u -= c[0]
        if u <= 0:
            break
    return c


def write_trace(seed: int, path: Path) -> tuple[int, float, int, float]:
    """Writes seed's trace to `path`; returns (requests, arrival CV, classes, load factor)."""
    rng = random.Random(seed)
    num_classes = rng.choice([1, 2, 2, 3, 3, 4])
    classes: list[LengthClass] = []
    for _ in range(num_classes):
        prompt_median = math.exp(rng.uniform(math.log(30), math.log(40_000)))
        output_median = math.exp(rng.uniform(math.log(5), math.log(8_000)))
        classes.append(
            (
                rng.random(),
                prompt_median,
                rng.uniform(0.3, 1.5),
                output_median,
                rng.uniform(0.3, 1.5),
            )
        )
    total_weight = sum(c[0] for c in classes)
    num_requests = rng.choice([500, 1000, 2000, 4000])
    cv = rng.choice([1.0, 1.5, 2.0, 3.0, 4.0])
    shape = 1 / cv**2
    t = 0.0
    with path.open("w") as f:
        for _ in range(num_requests):
            _, prompt_median, prompt_sigma, output_median, output_sigma = _pick(
                classes, rng.random() * total_weight
            )
            prompt = max(
                1, min(120_000, int(rng.lognormvariate(math.log(prompt_median), prompt_sigma)))
            )
            output = max(
                1, min(32_000, int(rng.lognormvariate(math.log(output_median), output_sigma)))
            )
            t += rng.gammavariate(shape, 1 / (RATE * shape))
            f.write(json.dumps({"arrival_s": t, "prompt_len": prompt, "output_len": output}) + "\n")
    return num_requests, cv, num_classes, rng.uniform(0.2, 1.6)


def _ran_as(cell: dict[str, object]) -> str | None:
    """The baseline cascade ran decision for decision, if its figures equal one's."""
    figures: dict[str, list[float]] = cell["figures"]  # type: ignore[assignment]
    ours = figures["cascade"][:2]
    return next((p for p, f in figures.items() if p != "cascade" and f[:2] == ours), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-40", help="trace seeds, FIRST-LAST")
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write every cell's figures as JSONL")
    no_regret.add_objective_argument(p)
    p.add_argument(
        "--baselines-from",
        type=Path,
        help="an earlier --out file: its baselines' figures are reused and only cascade runs "
        "(valid while the baselines' code and the simulator's results are unchanged)",
    )
    args = p.parse_args()
    known = no_regret.load_baselines(args.baselines_from)
    tmp = Path(tempfile.mkdtemp(prefix="random-mixtures-"))
    jobs: list[no_regret.Job] = []
    shapes: list[str] = []
    for seed in no_regret._seeds(args.seeds):
        path = tmp / f"mix-{seed}.jsonl"
        num_requests, cv, num_classes, factor = write_trace(seed, path)
        rate = round(factor * no_regret._capacity(path, args.instances), 3)
        jobs.append(
            (
                str(path),
                rate,
                args.instances,
                num_requests,
                known.get((path.stem, rate), {}),
                args.objective,
            )
        )
        shapes.append(f"{num_requests} req, {num_classes} classes, CV {cv:g}, {factor:.2f}x")
    cells = run_cells(jobs, shapes, args.out)
    print(f"\n{summary(cells)}; at or under 0.5x on the mean in {sum(c[0] <= 0.5 for c in cells)}")
    print(goodput_summary(cells))


Cell = tuple[float, float, str | None, float, float]
"""Cascade's mean and p99 over the best baseline's, the baseline it ran exactly (if any), and
cascade's goodput less the best baseline's (the highest), and its p99 TTFT over the best."""


def run_cells(
    jobs: list[no_regret.Job],
    shapes: list[str] | None,
    out: Path | None,
) -> list[Cell]:
    """Runs `jobs` (`no_regret._cell`'s arguments) two at a time, printing a markdown row per
    cell as it ends (with its `shapes` entry, when given) and appending its figures to `out`."""
    shape_col = " shape |" if shapes else ""
    print(
        f"| trace |{shape_col} rate | cascade mean / best | best (mean) | cascade p99 / best "
        "| best (p99) |"
    )
    print("|---" * (7 if shapes else 6) + "|")
    cells: list[Cell] = []
    with ProcessPoolExecutor(2) as pool:
        for k, cell in enumerate(pool.map(no_regret._cell, jobs)):
            mean, p99, by_mean, by_p99 = no_regret._ratios(cell)
            ran_as = _ran_as(cell)
            first_token = no_regret._first_token(cell)
            assert first_token is not None  # every cell run here records TTFT and goodput
            p99_ttft, goodput, best_goodput = first_token[1], first_token[2], first_token[3]
            cells.append((mean, p99, ran_as, goodput - best_goodput, p99_ttft))
            flag = " **over**" if max(mean, p99) > no_regret.REGRET else ""
            note = f" (ran as {ran_as})" if ran_as else ""
            shape = f" {shapes[k]} |" if shapes else ""
            print(
                f"| {cell['trace']} |{shape} {cell['rate']:g} | {mean:.3f}x | {by_mean} "
                f"| {p99:.3f}x | {by_p99} |{flag}{note}",
                flush=True,
            )
            if out:
                with out.open("a") as f:
                    f.write(json.dumps(cell | ({"shape": shapes[k]} if shapes else {})) + "\n")
    return cells


def goodput_summary(cells: list[Cell]) -> str:
    """Goodput against the best baseline's, and p99 TTFT, in one sentence."""
    behind = [c[3] for c in cells if c[3] < -GOODPUT_POINT]
    ttft = math.exp(statistics.mean(math.log(c[4]) for c in cells))
    worst = min(c[3] for c in cells)
    return (
        f"goodput more than a point below the best baseline's in {len(behind)} cells "
        f"(worst {worst:+.3f}, mean difference {statistics.mean(c[3] for c in cells):+.4f}); "
        f"p99 TTFT over the best baseline's: geometric mean {ttft:.3f}"
    )


GOODPUT_POINT = 0.01
"""A point of goodput (a share of requests): smaller differences are not counted as behind."""


def summary(cells: list[Cell]) -> str:
    """Cells over the bound, geometric means and the worst ratios, in one sentence."""
    regret = no_regret.REGRET
    geo = [math.exp(statistics.mean(math.log(c[k]) for c in cells)) for k in (0, 1)]
    over = [c for c in cells if max(c[0], c[1]) > regret]
    return (
        f"{len(cells)} cells: mean over {regret}x in {sum(c[0] > regret for c in cells)}, "
        f"p99 over in {sum(c[1] > regret for c in cells)} ({sum(c[2] is not None for c in over)} "
        f"of the cells over ran a baseline decision for decision); geometric means "
        f"{geo[0]:.3f} (mean), {geo[1]:.3f} (p99); worst {max(c[0] for c in cells):.3f}x "
        f"(mean), {max(c[1] for c in cells):.3f}x (p99)"
    )


if __name__ == "__main__":
    main()
