"""`cascade bench compare`: every policy on one workload at several rates in the simulator; a
markdown table with cascade's ratios against the strongest baseline at each rate, and PNG plots
(latency CDFs, latency against rate, per-stage load over time)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from cascadeinfer import _core, workloads
from cascadeinfer.config import POLICY_NAMES
from cascadeinfer.evaluation.simbench import SimSetup, Slo, find_max_rate, run_at_rate

BASELINES = tuple(p for p in POLICY_NAMES if p != "cascade")


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3g}"


@dataclass(frozen=True)
class Comparison:
    rates: list[float]
    summaries: dict[str, list[dict[str, float]]]
    """Per policy, one summary per rate."""
    max_rates: dict[str, float]
    """Per policy, the highest rate within the SLO (empty without an SLO)."""
    path: Path
    """The written table."""

    def ratios(self, k: int) -> tuple[float, float]:
        """Cascade's mean and p99 end-to-end latency at rate `k` over the best baseline's for
        each figure (the lowest mean, the lowest p99: possibly two different baselines)."""
        c = self.summaries["cascade"][k]
        best_mean = min(self.summaries[p][k]["mean_e2e_s"] for p in BASELINES)
        best_p99 = min(self.summaries[p][k]["p99_e2e_s"] for p in BASELINES)
        return c["mean_e2e_s"] / best_mean, c["p99_e2e_s"] / best_p99


def compare(base: SimSetup, rates: list[float], slo: Slo | None, out_dir: str) -> Path:
    """Runs everything, writes `compare.md` and plots into `out_dir`; returns the table's path."""
    return run_comparison(base, rates, slo, out_dir).path


def run_comparison(base: SimSetup, rates: list[float], slo: Slo | None, out_dir: str) -> Comparison:
    """`compare`, returning the figures as well."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, list[dict[str, float]]] = {}
    reports: dict[str, _core.SimReport] = {}
    middle = rates[len(rates) // 2]
    for policy in POLICY_NAMES:
        setup = replace(base, policy=policy)
        summaries[policy] = []
        for rate in rates:
            summary, report = run_at_rate(setup, rate)
            summaries[policy].append(summary)
            if rate == middle:
                reports[policy] = report
    max_rates: dict[str, float] = {}
    if slo is not None:
        for policy in POLICY_NAMES:
            max_rates[policy] = _max_rate(replace(base, policy=policy), slo, middle)
    lines = _table(base, rates, summaries, slo, max_rates)
    lines += _plots(out, rates, summaries, reports, middle)
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return Comparison(rates, summaries, max_rates, path)


def _max_rate(setup: SimSetup, slo: Slo, start: float) -> float:
    def run(rate: float) -> dict[str, float]:
        return run_at_rate(setup, rate)[0]

    return find_max_rate(run, slo, start=start)[0]


def _traffic(base: SimSetup, num_requests: int) -> str:
    """What each run replays (`num_requests` a run): a preset's draws, or a trace file's own
    requests and gaps."""
    if workloads.is_workload(base.workload):
        cv = f" (CV {base.cv})" if base.arrival == "gamma" else ""
        return f"{num_requests} requests a run, {base.arrival} arrivals{cv}"
    return f"The trace's first {num_requests} requests a run, its own arrival gaps rescaled to each rate"


def _table(
    base: SimSetup,
    rates: list[float],
    summaries: dict[str, list[dict[str, float]]],
    slo: Slo | None,
    max_rates: dict[str, float],
) -> list[str]:
    lines = [
        f"## {base.workload} on {base.num_instances} instances of `{base.profile.name}`",
        "",
        _traffic(base, int(summaries[POLICY_NAMES[0]][0]["requests"]))
        + f", seed {base.seed}; simulated. Goodput: requests with TTFT <= "
        f"{base.goodput_slo.ttft_base_s} s + {base.goodput_slo.ttft_per_prompt_token_s} s per "
        f"prompt token and TPOT <= {base.goodput_slo.tpot_s} s.",
        "",
        "| rate (req/s) | policy | mean e2e (s) | p99 e2e (s) | mean TTFT (s) | p99 TTFT (s) "
        "| mean TPOT (s) | p99 TPOT (s) | tokens/s | goodput | completed | migrations "
        "| prefix-cache hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, rate in enumerate(rates):
        for policy in POLICY_NAMES:
            s = summaries[policy][k]
            lines.append(
                f"| {rate:.3g} | {policy} | {_fmt(s['mean_e2e_s'])} | {_fmt(s['p99_e2e_s'])} "
                f"| {_fmt(s['mean_ttft_s'])} | {_fmt(s['p99_ttft_s'])} | {_fmt(s['mean_tpot_s'])} "
                f"| {_fmt(s['p99_tpot_s'])} | {s['throughput_tok_s']:.0f} "
                f"| {s['goodput']:.1%} | {s['completed']:.0f} "
                f"| {s['migrations']:.0f} | {s['prefix_cache_hit_rate']:.1%} |"
            )
    lines += [
        "",
        "Cascade against the strongest baseline at each rate (the baseline with the lowest mean "
        "end-to-end latency there; below 1 is better for cascade):",
        "",
        "| rate (req/s) | strongest baseline | mean e2e ratio | p99 e2e ratio | goodput "
        "(cascade / best baseline) |",
        "|---|---|---|---|---|",
    ]
    for k, rate in enumerate(rates):
        strongest = min(BASELINES, key=lambda p: summaries[p][k]["mean_e2e_s"])
        c, b = summaries["cascade"][k], summaries[strongest][k]
        best_goodput = max(summaries[p][k]["goodput"] for p in BASELINES)
        lines.append(
            f"| {rate:.3g} | {strongest} | {c['mean_e2e_s'] / b['mean_e2e_s']:.2f}x "
            f"| {c['p99_e2e_s'] / b['p99_e2e_s']:.2f}x | {c['goodput']:.1%} / {best_goodput:.1%} |"
        )
    if slo is not None:
        best_baseline = max(BASELINES, key=lambda p: max_rates[p])
        lines += [
            "",
            f"Highest rate within the SLO (p99 TTFT <= {slo.p99_ttft_s} s, p99 TPOT <= "
            f"{slo.p99_tpot_s} s, every request completed), by bisection to 3%:",
            "",
            "| policy | sustainable rate (req/s) |",
            "|---|---|",
            *(f"| {p} | {_rate_cell(max_rates[p])} |" for p in POLICY_NAMES),
            "",
            f"Cascade / strongest baseline ({best_baseline}): "
            + (
                "n/a (the SLO held at 64x the middle rate: the offered load stops growing "
                "with the rate, as with session turns paced by think time)"
                if not all(math.isfinite(r) for r in max_rates.values())
                else f"**{max_rates['cascade'] / max_rates[best_baseline]:.2f}x**"
                if max_rates[best_baseline] > 0
                else "n/a (no baseline met the SLO at any rate tried)"
            ),
        ]
    return lines


def _rate_cell(rate: float) -> str:
    return f"{rate:.3g}" if math.isfinite(rate) else "not bounded (SLO held at every rate tried)"


def _plots(
    out: Path,
    rates: list[float],
    summaries: dict[str, list[dict[str, float]]],
    reports: dict[str, _core.SimReport],
    middle: float,
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["", "(plots skipped: matplotlib is not installed)"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, report in reports.items():
        e2e = sorted(x for x in report.requests()["e2e_s"] if not math.isnan(x))
        ax.plot(e2e, [(i + 1) / len(e2e) for i in range(len(e2e))], label=policy)
    ax.set(xscale="log", xlabel="end-to-end latency (s)", ylabel="fraction of requests")
    ax.set_title(f"Latency CDF at {middle:.3g} req/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for policy in POLICY_NAMES:
        axes[0].plot(rates, [s["mean_e2e_s"] for s in summaries[policy]], "o-", label=policy)
        axes[1].plot(rates, [s["p99_e2e_s"] for s in summaries[policy]], "o-", label=policy)
    for ax, title in zip(axes, ("mean end-to-end (s)", "p99 end-to-end (s)"), strict=True):
        ax.set(xlabel="arrival rate (req/s)", ylabel=title, yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_rate.png", dpi=120)
    plt.close(fig)

    load = reports["cascade"].stage_load()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for stage in sorted(set(load["stage"])):
        points = [
            (t, n)
            for t, s, n in zip(load["time_s"], load["stage"], load["num_running"], strict=True)
            if s == stage
        ]
        ax.plot([t for t, _ in points], [n for _, n in points], label=f"stage {stage}", lw=0.8)
    ax.set(xlabel="simulated time (s)", ylabel="running requests", title="cascade: load by stage")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "stage_load.png", dpi=120)
    plt.close(fig)
    return [
        "",
        f"Plots: `latency_cdf.png` (at {middle:.3g} req/s), `latency_vs_rate.png`, "
        "`stage_load.png` (cascade, running requests per stage over time).",
    ]
