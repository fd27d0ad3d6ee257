"""What the cost model's padding term is worth on each preset: least-load run once with the
profile as shipped and once with its heterogeneity term and longest-request floor set to 0 (no
batch pays for padding),
beside cascade, on the evaluation's presets and rates.

    python bench/padding_bound.py [--workloads long-context-mixed,reasoning,production-mix,bimodal]
                                  [--factors 0.75,1,1.25,1.5] [--seeds 0,1,2] [--requests 3000]

Stages cut the padding terms of the step time (`docs/design/cost-model.md`:
`c * max(S + h * (n * Lmax - S), min(n, f) * Lmax)` against `c * S`), and a split also keeps long prefills off the instances where short
requests decode, and packs KV differently. Least-load with `h = f = 0` keeps every other cost and
drops the padding (its load estimates use the same profile, so its placements change a little
too): `padding-free / least-load` is what removing all padding would give a least-load fleet.
Where cascade does better than that, its gain is not the padding alone; where the traffic has
no long prompts (reasoning), the padding is all a split can save, so the figure is about the
most any split could gain there. Geometric means over the seeds; rates are multiples of the
rate `cascade plan` plans for by default, Gamma arrivals of CV 2 (as `make evaluation`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from cascadeinfer import _core
from cascadeinfer.evaluation.simbench import SimSetup, default_rate, run_at_rate
from cascadeinfer.planning import builtin_profile_path, profile_from_json

PROFILE = "gpu-h100-llama3-8b"
CV = 2.0


def _profile(heterogeneity: float | None) -> _core.CostProfile:
    doc = json.loads(builtin_profile_path(PROFILE).read_text())
    if heterogeneity is not None:
        doc["heterogeneity"] = heterogeneity
        doc["longest_request_floor"] = 0.0
        doc["name"] = f"{PROFILE}-h{heterogeneity:g}-no-floor"
    return profile_from_json(json.dumps(doc))


def _cell(job: tuple[str, int, float, int]) -> tuple[str, int, float, dict[str, float]]:
    workload, seed, factor, requests = job
    shipped = _profile(None)
    base = SimSetup("least-load", shipped, workload, 16, requests, "gamma", CV, seed)
    rate = factor * default_rate(replace(base, seed=0))
    means: dict[str, float] = {}
    for name, setup in (
        ("least-load", base),
        ("padding-free", replace(base, profile=_profile(0.0))),
        ("cascade", replace(base, policy="cascade")),
    ):
        summary, _ = run_at_rate(setup, rate)
        means[name] = float(summary["mean_e2e_s"])
        means[name + " p99"] = float(summary["p99_e2e_s"])
    return workload, seed, factor, means


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="long-context-mixed,reasoning,production-mix,bimodal")
    p.add_argument("--factors", default="0.75,1,1.25,1.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--requests", type=int, default=3000)
    args = p.parse_args()
    jobs = [
        (w, int(s), float(f), args.requests)
        for w in args.workloads.split(",")
        for f in args.factors.split(",")
        for s in args.seeds.split(",")
    ]
    cells: dict[tuple[str, float], list[dict[str, float]]] = {}
    with ProcessPoolExecutor(2) as pool:
        for workload, _, factor, means in pool.map(_cell, jobs):
            cells.setdefault((workload, factor), []).append(means)
    print(
        "| workload | rate | padding-free / least-load, mean (p99) "
        "| cascade / least-load, mean (p99) |"
    )
    print("|---|---|---|---|")
    for (workload, factor), runs in cells.items():
        ratio = {
            key: math.exp(statistics.mean(math.log(r[key] / r[base]) for r in runs))
            for key, base in (
                ("padding-free", "least-load"),
                ("padding-free p99", "least-load p99"),
                ("cascade", "least-load"),
                ("cascade p99", "least-load p99"),
            )
        }
        print(
            f"| {workload} | {factor:g}x | {ratio['padding-free']:.2f}x "
            f"({ratio['padding-free p99']:.2f}x) | {ratio['cascade']:.2f}x "
            f"({ratio['cascade p99']:.2f}x) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
