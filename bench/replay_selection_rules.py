"""Replays variants of the selection's last rule (`stage_count._least_regret`) on cells that
`bench/selection_on_trace.py --out` wrote, without simulating anything again: each cell holds
what the selection saw of every candidate (per selection draw, mean and p99) and what every
candidate did on the trace itself. The variant "mean" is the rule as it stands; replaying it
gives back selection_on_trace's own figures.

    python bench/replay_selection_rules.py CELLS.jsonl [CELLS.jsonl ...]

Variants score a split's tail (never a baseline form's) on: the mean of its per-draw p99
ratios to the lower of the baseline forms' p99 (as now), that mean plus a margin, or the
median or worst draw's ratio.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

REGRET = 1.02

Draws = list[list[float]]
"""(mean, p99) of one candidate on each selection draw."""


def ratios(c: Draws, forms: list[Draws]) -> tuple[list[float], list[float]]:
    draws = range(len(c))
    by_mean = [c[t][0] / min(f[t][0] for f in forms) for t in draws]
    by_p99 = [c[t][1] / min(f[t][1] for f in forms) for t in draws]
    return by_mean, by_p99


def scorer(tail: Callable[[list[float]], float]) -> Callable[[Draws, list[Draws]], float]:
    def score(c: Draws, forms: list[Draws]) -> float:
        if any(math.isnan(x[0]) for x in c):
            return math.inf
        by_mean, by_p99 = ratios(c, forms)
        return max(statistics.mean(by_mean), tail(by_p99))

    return score


VARIANTS = {
    "mean": scorer(statistics.mean),
    "mean+0.02": scorer(lambda r: statistics.mean(r) + 0.02),
    "median": scorer(statistics.median),
    "worst": scorer(max),
}
AS_NOW = VARIANTS["mean"]


def pick(cell: dict, score_split: Callable[[Draws, list[Draws]], float]) -> int:
    """The candidate the rule takes, as `_least_regret` does with `score_split` for splits."""
    sel, is_form, is_pruned = cell["selection"], cell["is_form"], cell["is_pruned"]
    chosen = cell["picks"]["rules"]
    forms = [sel[i] for i, f in enumerate(is_form) if f]
    if is_pruned[chosen] or not forms or any(math.isnan(f[0][0]) for f in forms):
        return chosen

    def score(i: int) -> float:
        return (AS_NOW if is_form[i] else score_split)(sel[i], forms)

    behind = score(chosen)
    if behind <= 1.0:
        return chosen
    best = min((i for i in range(len(sel)) if not is_pruned[i]), key=score)
    return best if score(best) < behind else chosen


def main() -> None:
    cells = [
        json.loads(line) for path in sys.argv[1:] for line in Path(path).read_text().splitlines()
    ]
    print("| variant | cells over | geometric mean: mean / p99 | worst: mean / p99 |")
    print("|---|---|---|---|")
    for name, score_split in VARIANTS.items():
        r = []
        for cell in cells:
            mean, p99 = cell["candidates"][pick(cell, score_split)]
            best = cell["baselines"].values()
            r.append((mean / min(b[0] for b in best), p99 / min(b[1] for b in best)))
        over = sum(max(m, p) > REGRET for m, p in r)
        geo = [math.exp(statistics.mean(math.log(x[k]) for x in r)) for k in (0, 1)]
        worst = [max(x[k] for x in r) for k in (0, 1)]
        print(
            f"| {name} | {over} of {len(r)} | {geo[0]:.3f} / {geo[1]:.3f} | "
            f"{worst[0]:.3f} / {worst[1]:.3f} |"
        )


if __name__ == "__main__":
    main()
