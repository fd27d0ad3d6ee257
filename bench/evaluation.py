"""The headline comparison (`make evaluation`): every policy on 16 simulated instances of the
GPU-class profile, on every workload family (long documents, agent sessions, reasoning,
production mix, real ShareGPT conversations, two length modes) with bursty arrivals (Gamma,
CV 2), on 3 seeds, at rates from light load to past saturation, plus the highest rate each
policy sustains within one SLO (on every seed); then long-context and agentic on the CPU profile
calibrated here (Poisson, seed 0), and refinement on a steady and a shifting workload.

Writes docs/evaluation/<workload>-<arrival>-s<seed>-<profile>/{compare.md,*.png} and
docs/evaluation/results.md: the no-regret table (cascade over the best baseline, per figure,
worst and best over seeds at every rate), the sustainable rates, and the refinement record.
docs/evaluation.md discusses them; it is written by hand from these files.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer import _core
from cascadeinfer.evaluation.compare import BASELINES, Comparison, run_comparison
from cascadeinfer.evaluation.simbench import (
    MAX_RATE_FACTOR,
    SimSetup,
    Slo,
    default_rate,
    make_trace,
)
from cascadeinfer.planning import load_profile
from cascadeinfer.policies import build_policy

OUT = Path(__file__).resolve().parents[1] / "docs" / "evaluation"
GPU = "gpu-h100-llama3-8b"
CPU_PROFILE = str(
    Path(__file__).resolve().parent / "profiles" / "cpu-vllm-tiny-llama-calibrated-32k.json"
)
"""The profile calibrated here on vLLM for CPU, with its context limit raised from 2K to 32K
(extrapolated; see the file's description)."""
GPU_WORKLOADS = (
    "long-context-mixed",
    "agentic",
    "reasoning",
    "production-mix",
    "sharegpt-multiturn",
    "bimodal",
)
CPU_WORKLOADS = ("long-context-mixed", "agentic")
SEEDS = (0, 1, 2)
BURSTY_CV = 2.0
SLOS = {
    GPU: Slo(p99_ttft_s=30.0, p99_tpot_s=0.1),
    "cpu-vllm-tiny-llama-calibrated-32k": Slo(p99_ttft_s=15.0, p99_tpot_s=0.1),
}
"""Per profile: long prompts (128K tokens on the GPU profile, 32K on the CPU one) take seconds
to prefill alone, so TTFT gets a bound each profile can meet at low load; TPOT is what a
reader of the stream feels."""
REQUESTS = 3000
"""Requests a run (the SLO search runs dozens of runs per policy)."""
RATE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
"""Multiples of the rate `cascade plan` plans for by default (60% of estimated capacity, an
upper bound that ignores queueing: 1.25x and 1.5x are at or past saturation)."""
REFINE_PLANNED_FOR = "long-context-mixed"
REFINE_WORKLOADS = ("long-context-mixed", "shift:long-context-mixed,short-chat")
"""Refinement is shown on a plan made for long-context-mixed, serving that traffic throughout
(nothing should change) and then traffic that turns into short chat halfway (it should adapt,
then settle)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=REQUESTS)
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--workloads", default=",".join(GPU_WORKLOADS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--skip-cpu", action="store_true", help="GPU profile only")
    args = p.parse_args()
    started = time.perf_counter()
    gpu = load_profile(GPU)
    rows: list[str] = []
    sustainable: list[str] = []
    for workload in args.workloads.split(","):
        comparisons: list[Comparison] = []
        for seed in map(int, args.seeds.split(",")):
            base = SimSetup(
                "cascade", gpu, workload, args.instances, args.requests, "gamma", BURSTY_CV, seed
            )
            planned = default_rate(replace(base, seed=0))
            rates = [f * planned for f in RATE_FACTORS]
            out = OUT / f"{workload}-gamma{BURSTY_CV:g}-s{seed}-{GPU}"
            comparisons.append(run_comparison(base, rates, SLOS[GPU], str(out)))
            print(f"{workload} seed {seed}: {out}", flush=True)
        rows += _no_regret_rows(f"{workload} (Gamma CV {BURSTY_CV:g})", comparisons)
        sustainable.append(_sustainable_row(workload, comparisons))
    if not args.skip_cpu:
        cpu = load_profile(CPU_PROFILE)
        for workload in CPU_WORKLOADS:
            base = SimSetup("cascade", cpu, workload, args.instances, args.requests)
            rates = [f * default_rate(base) for f in RATE_FACTORS]
            out = OUT / f"{workload}-poisson-s0-{cpu.name}"
            c = run_comparison(base, rates, SLOS[cpu.name], str(out))
            rows += _no_regret_rows(f"{workload} (Poisson, CPU profile)", [c])
            sustainable.append(_sustainable_row(f"{workload} (CPU profile, seed 0)", [c]))
    refinement = _refinement(gpu, args.instances, args.requests)
    _write(rows, sustainable, refinement, time.perf_counter() - started)


def _no_regret_rows(title: str, comparisons: list[Comparison]) -> list[str]:
    """One row per rate factor: cascade / best baseline for mean and p99 e2e, worst and best
    over the seeds, and the stage counts chosen."""
    rows = []
    for k, factor in enumerate(RATE_FACTORS):
        means, p99s = zip(*(c.ratios(k) for c in comparisons), strict=True)
        rows.append(
            f"| {title} | {factor:g}x | {max(means):.2f}x ({min(means):.2f}-{max(means):.2f}) "
            f"| {max(p99s):.2f}x ({min(p99s):.2f}-{max(p99s):.2f}) |"
        )
    return rows


UNBOUNDED = (
    "not bounded: the SLO held at the search's cap, "
    f"{MAX_RATE_FACTOR:g}x the planned rate; past some rate a run's finite trace arrives as "
    "one burst, and session turns are paced by think time, so the offered load stops growing"
)


def _sustainable_row(title: str, comparisons: list[Comparison]) -> str:
    """Cascade's highest rate within the SLO against the best baseline's, seed by seed (the
    searches sit on a knife's edge: p99 TPOT stays within a few percent of its bound over a
    wide range of rates, so one seed's figure can move far with a small change), and the
    median of the per-seed ratios with their range where every seed has a finite one."""
    cells = [_sustainable_cell(c) for c in comparisons]
    ratios = [ratio for _, _, ratio, _ in cells if ratio is not None]
    if len(ratios) == len(cells):
        summary = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    else:
        summary = " / ".join(text for _, _, _, text in cells)
    if any("not bounded" in f"{a} {b}" for a, b, _, _ in cells):
        summary += f" ({UNBOUNDED})"
    cascade = " / ".join(a for a, _, _, _ in cells)
    best = " / ".join(b for _, b, _, _ in cells)
    return f"| {title} | {cascade} | {best} | {summary} |"


def _sustainable_cell(c: Comparison) -> tuple[str, str, float | None, str]:
    """One seed's cascade rate, best baseline and its rate, cascade / best (None where a rate
    has no bound: the SLO still held at the search's cap, `MAX_RATE_FACTOR` times the planned
    rate), and that ratio as text (a lower bound where only cascade's rate has none)."""

    def rate(p: str) -> str:
        r = c.max_rates[p]
        return f"{r:.3g}" if math.isfinite(r) else "not bounded"

    best = max(BASELINES, key=lambda p: c.max_rates[p])
    mine, theirs = c.max_rates["cascade"], c.max_rates[best]
    if math.isfinite(mine) and math.isfinite(theirs):
        ratio = mine / theirs if theirs > 0 else float("nan")
        return rate("cascade"), f"{best} {rate(best)}", ratio, f"{ratio:.2f}x"
    if math.isfinite(theirs) and theirs > 0:
        cap = MAX_RATE_FACTOR * c.rates[len(c.rates) // 2]
        return rate("cascade"), f"{best} {rate(best)}", None, f">= {cap / theirs:.2f}x"
    return rate("cascade"), f"{best} {rate(best)}", None, "-"


def _refinement(profile: _core.CostProfile, instances: int, requests: int) -> list[str]:
    """Layout changes of cascade with refinement, planned for REFINE_PLANNED_FOR, on a steady
    and on a shifting workload; each change's time, and the stage count."""
    ids = list(range(instances))
    setup = SimSetup("cascade", profile, REFINE_PLANNED_FOR, instances, requests * 2)
    rate = default_rate(setup)
    rows = []
    for workload in REFINE_WORKLOADS:
        trace = make_trace(
            workload, num_requests=requests * 2, rate=rate, max_len=profile.max_model_len
        )
        policy = build_policy(
            "cascade", profile, ids, max_len=profile.max_model_len, workload=REFINE_PLANNED_FOR,
            rate=rate, clamp_prompts=True,
        )  # fmt: skip
        stages = len(policy.stages())
        report = _core.simulate(policy, profile, trace, ids)
        s = report.summary()
        rows.append(
            f"| {workload} | {rate:.3g} | {stages} | {trace[-1][0]:.0f} s "
            f"| {report.num_layout_changes - report.num_capacity_moves} "
            f"| {report.num_capacity_moves} | {s['mean_e2e_s']:.3g} | {s['p99_e2e_s']:.3g} |"
        )
    return rows


def _write(rows: list[str], sustainable: list[str], refinement: list[str], wall_s: float) -> None:
    lines = [
        "# Headline comparison: gathered results",
        "",
        f"Written by `make evaluation` (`bench/evaluation.py`) in {wall_s:.0f} s of wall time. "
        "Every figure is simulated; per-run tables and plots are in the folders beside this file.",
        "",
        "## No regret: cascade over the best baseline",
        "",
        "Cascade's mean and p99 end-to-end latency over the best baseline's for that figure (the "
        "lowest mean and the lowest p99 among round-robin, least-load, power-of-two, llumnix and "
        "cache-aware, "
        "possibly two different baselines). The worst seed first, then the range over seeds. "
        "Rates are multiples of the rate `cascade plan` plans for by default.",
        "",
        "| workload | rate | mean e2e: worst (range) | p99 e2e: worst (range) |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Highest rate within the SLO",
        "",
        f"GPU profile: p99 TTFT <= {SLOS[GPU].p99_ttft_s} s, p99 TPOT <= "
        f"{SLOS[GPU].p99_tpot_s} s and every request completed; CPU profile: p99 TTFT <= "
        "15 s. Bisection to 3%, on each seed's trace (GPU profile: seeds 0 / 1 / 2). The last "
        "column is the median of the per-seed ratios and their range.",
        "",
        "| workload | cascade (req/s), per seed | best baseline (req/s), per seed "
        "| cascade / best: median (range) |",
        "|---|---|---|---|",
        *sustainable,
        "",
        "## Refinement: layout changes on a steady and a shifting workload",
        "",
        f"Cascade with refinement on, planned for {REFINE_PLANNED_FOR} at its planned rate; "
        f"{REQUESTS * 2} requests, Poisson, seed 0. The shifting trace turns into short chat "
        "halfway. Refinement changes are boundary nudges and re-plans; capacity moves are the "
        "capacity guard's (one instance to another stage, `capacity.rs`).",
        "",
        "| traffic | rate (req/s) | stages | trace length | refinement changes | capacity moves "
        "| mean e2e (s) | p99 e2e (s) |",
        "|---|---|---|---|---|---|---|---|",
        *refinement,
        "",
    ]
    (OUT / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
