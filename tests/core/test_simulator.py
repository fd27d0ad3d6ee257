"""The cluster simulator through the bindings: the same Scheduler objects the service builds."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
from cascadeinfer import (
    BucketGrid,
    CascadeConfig,
    CostProfile,
    Scheduler,
    generate_trace,
    simulate,
)

from tests.summary_keys import SIM_SUMMARY_KEYS


def cascade(profile: CostProfile, grid: BucketGrid) -> Scheduler:
    """Short prompts on 0-2, long ones on 3-5; refinement off so the stages stay put."""
    stages = [(0, 1024, [0, 1, 2]), (1024, grid.max_len, [3, 4, 5])]
    return Scheduler.cascade_with_stages(
        profile, stages, grid, CascadeConfig(is_refine_enabled=False)
    )


def round_robin(profile: CostProfile) -> Scheduler:
    return Scheduler.baseline("round-robin", profile, list(range(6)), profile.max_model_len)


def test_same_seed_same_report_and_another_seed_another(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    def run(seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
        trace = generate_trace("bimodal", 300, 4.0, seed=seed)
        report = simulate(cascade(gpu_profile, grid), gpu_profile, trace)
        summary = report.summary()
        assert set(summary) == SIM_SUMMARY_KEYS
        assert summary["sim_wall_s"] > 0
        del summary["sim_wall_s"]
        return summary, report.requests()

    first = run(1)
    assert first == run(1)
    assert first != run(2)


def test_cascade_and_round_robin_both_complete_a_bimodal_trace(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    trace = generate_trace("bimodal", 400, 4.0, seed=3)
    wanted_tokens = sum(output for _, _, output in trace)
    reports = {
        "cascade": simulate(cascade(gpu_profile, grid), gpu_profile, trace),
        "round-robin": simulate(round_robin(gpu_profile), gpu_profile, trace),
    }
    for name, report in reports.items():
        summary = report.summary()
        assert report.policy == name
        assert (summary["completed"], report.num_unfinished) == (len(trace), 0)
        assert report.total_output_tokens == wanted_tokens
        assert 0 < summary["mean_ttft_s"] < summary["mean_e2e_s"] <= summary["p99_e2e_s"]
        assert summary["throughput_tok_s"] > 0
        requests = report.requests()
        assert len(requests["e2e_s"]) == len(trace)
        assert sum(requests["num_migrations"]) == summary["migrations"]
        load = report.stage_load()
        assert len(load["time_s"]) > 0 and max(load["num_running"]) > 0
    moved = reports["cascade"].migrations_by_reason()
    assert moved.get("stage_bound", 0) > 0, "short prompts with long outputs cross 1024"
    assert reports["round-robin"].summary()["migrations"] == 0
    assert reports["round-robin"].migrations_by_reason() == {}


def test_the_scheduler_is_driven_in_place_and_stays_usable(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    scheduler = cascade(gpu_profile, grid)
    simulate(scheduler, gpu_profile, generate_trace("bimodal", 50, 4.0, seed=4))
    # Python still holds the same object, in its final state: it answers and shows its stages.
    assert scheduler.admit(10_000, 100, 1e6) is not None
    assert [lo for lo, _, _ in scheduler.stages()] == [0, 1024]


def test_gamma_arrivals_are_bursty_with_the_asked_mean() -> None:
    times = [t for t, _, _ in generate_trace("short-chat", 20_000, 10.0, "gamma", 3.0, seed=1)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    assert math.isclose(mean, 0.1, rel_tol=0.1)
    assert 2.4 < statistics.stdev(gaps) / mean < 3.6


def test_bad_inputs_raise_value_errors_naming_them(gpu_profile: CostProfile) -> None:
    trace = generate_trace("short-chat", 10, 1.0)
    with pytest.raises(ValueError, match="instances"):
        simulate(round_robin(gpu_profile), gpu_profile, trace, instances=[0, 1])
    with pytest.raises(ValueError, match="tick_interval_s"):
        simulate(round_robin(gpu_profile), gpu_profile, trace, tick_interval_s=0.0)
    with pytest.raises(ValueError, match="cv"):
        generate_trace("short-chat", 10, 1.0, "gamma", -1.0)
    with pytest.raises(ValueError, match="arrival"):
        generate_trace("short-chat", 10, 1.0, "uniform")


def test_a_multi_turn_trace_reuses_cached_prefixes_and_a_plain_one_does_not(
    gpu_profile: CostProfile,
) -> None:
    trace = generate_trace("agentic", 600, 1.0, seed=4)
    assert all(len(e) == 6 for e in trace)
    plain = [e[:3] for e in trace]

    def run(t: list) -> tuple[dict[str, float], dict[str, list[float]]]:
        policy = Scheduler.baseline("least-load", gpu_profile, [0, 1], gpu_profile.max_model_len)
        report = simulate(policy, gpu_profile, t)
        return report.summary(), report.requests()

    (warm, warm_requests), (cold, cold_requests) = run(trace), run(plain)
    assert cold["prefix_cache_hit_rate"] == 0.0
    assert sum(cold_requests["num_cached_prompt_tokens"]) == 0
    cached = warm_requests["num_cached_prompt_tokens"]
    prompts = warm_requests["prompt_len"]
    assert warm["prefix_cache_hit_rate"] == pytest.approx(sum(cached) / sum(prompts))
    assert warm["prefix_cache_hit_rate"] > 0.2
    # Only later turns hit, never past their shared prefix.
    for c, e in zip(cached, trace, strict=True):
        assert c <= e[5]
    assert warm["mean_ttft_s"] < cold["mean_ttft_s"]
