"""Planning: a benchmark's plan is made for the lengths it runs, and a split into stages is
taken only where it simulates clearly better than one stage."""

from __future__ import annotations

import pytest
from cascadeinfer.evaluation.simbench import make_trace
from cascadeinfer.planning import clamp_lengths, load_profile, load_requests, plan_stages
from cascadeinfer.stage_count import (
    MAX_P99_SLACK,
    MIN_GAIN,
    SELECTION_SEEDS,
    gaps_cv,
    selection_trace,
    simulated_e2e,
)


def test_a_live_plan_drops_prompts_no_instance_holds_and_a_benchmark_plan_clamps_them() -> None:
    live = load_requests("long-context-mixed", 32_768)
    bench = load_requests("long-context-mixed", 32_768, clamp_prompts=True)
    assert live.num_dropped > 0 and bench.num_dropped == 0
    assert len(bench.prompt_lens) == len(live.prompt_lens) + live.num_dropped
    # The benchmark's trace and its plan cut the long prompts the same way.
    trace = make_trace("long-context-mixed", num_requests=2000, rate=1.0, max_len=32_768)
    clamped_in_trace = sum(1 for _, p, _ in trace if p == 32_767) / len(trace)
    clamped_in_plan = sum(1 for p in bench.prompt_lens if p == 32_767) / len(bench.prompt_lens)
    assert clamped_in_trace > 0.05 and abs(clamped_in_trace - clamped_in_plan) < 0.03
    assert all(p + o <= 32_768 for p, o in zip(bench.prompt_lens, bench.output_lens, strict=True))


def test_clamp_keeps_at_least_one_output_token() -> None:
    assert clamp_lengths(100_000, 500, 2048) == (2047, 1)
    assert clamp_lengths(1000, 5000, 2048) == (1000, 1048)
    assert clamp_lengths(10, 20, 2048) == (10, 20)


def test_the_layout_is_chosen_by_simulation_against_one_stage() -> None:
    # Agentic on the GPU profile: the analytic objective prefers four stages; in simulation no
    # split beats one stage, so the fleet runs as one stage.
    profile = load_profile("gpu-h100-llama3-8b")
    analytic = plan_stages(
        num_instances=16, workload="agentic", profile=profile, choose_count_by_simulation=False
    )
    chosen = plan_stages(num_instances=16, workload="agentic", profile=profile)
    assert analytic.candidates == [] and len(analytic.plan.stages) > 1
    plain, balanced = chosen.candidates[:2]
    assert (plain.num_stages, balanced.num_stages) == (1, 1)
    assert not plain.config.is_one_stage_balanced and balanced.config.is_one_stage_balanced
    counts = [c.num_stages for c in chosen.candidates[2:]]
    assert counts == sorted(set(counts)) and counts[-1] == len(analytic.plan.stages)
    assert chosen.candidates[-1].plan.objective_s == analytic.plan.objective_s
    assert len(chosen.plan.stages) == 1
    picked = balanced if chosen.config.is_one_stage_balanced else plain
    # Every split lost to one stage by the selection's own rule.
    for c in chosen.candidates[2:]:
        assert not (
            c.simulated_mean_e2e_s <= (1 - MIN_GAIN) * picked.simulated_mean_e2e_s
            and c.simulated_p99_e2e_s <= (1 + MAX_P99_SLACK) * picked.simulated_p99_e2e_s
        )
    # Simulating the chosen layout on the selection traces again gives the same figures.
    traces = [
        selection_trace(chosen.requests.prompt_lens, chosen.requests.output_lens, chosen.rate, k)
        for k in range(SELECTION_SEEDS)
    ]
    again = [
        simulated_e2e(chosen.plan, chosen.workload, profile, 16, t, chosen.config) for t in traces
    ]
    assert sum(m for m, _ in again) / len(again) == picked.simulated_mean_e2e_s


def test_a_split_is_taken_where_it_pays() -> None:
    # Long documents among chat: stages keep long prefills and contexts out of the chat batches.
    profile = load_profile("gpu-h100-llama3-8b")
    chosen = plan_stages(num_instances=16, workload="long-context-mixed", profile=profile)
    assert len(chosen.plan.stages) > 1
    single = min(c.simulated_mean_e2e_s for c in chosen.candidates[:2])
    picked = next(c for c in chosen.candidates if c.plan is chosen.plan)
    assert picked.simulated_mean_e2e_s <= (1 - MIN_GAIN) * single


def test_selection_traces_carry_the_burstiness_asked_for() -> None:
    requests = load_requests("short-chat", 8192, seed=0)
    poisson = selection_trace(requests.prompt_lens, requests.output_lens, 5.0, 0)
    bursty = selection_trace(requests.prompt_lens, requests.output_lens, 5.0, 0, arrival_cv=2.5)
    assert 0.9 < gaps_cv([t for t, _, _ in poisson]) < 1.1
    assert 2.2 < gaps_cv([t for t, _, _ in bursty]) < 2.8
    assert abs(bursty[-1][0] / len(bursty) - 0.2) < 0.05


def test_the_selection_trace_is_not_the_benchmark_trace_of_the_same_seed() -> None:
    requests = load_requests("long-context-mixed", 131_072, seed=0)
    ours = selection_trace(requests.prompt_lens, requests.output_lens, 5.0, 0)
    theirs = make_trace("long-context-mixed", num_requests=len(ours), rate=5.0, max_len=131_072)
    assert len(ours) == 2000
    assert [p for _, p, _ in ours[:50]] != [p for _, p, _ in theirs[:50]]
    assert ours == selection_trace(requests.prompt_lens, requests.output_lens, 5.0, 0)
    mean_gap = ours[-1][0] / len(ours)
    assert 0.18 < mean_gap < 0.22  # Poisson at 5 req/s


def test_the_selection_minimizes_the_objective_asked_for() -> None:
    profile = load_profile("gpu-h100-llama3-8b")
    by = {
        objective: plan_stages(
            num_instances=16, workload="long-context-mixed", profile=profile, objective=objective
        )
        for objective in ("mean", "p99")
    }
    splits = by["mean"].candidates[2:]
    assert [c.simulated_p99_e2e_s for c in splits] == [
        c.simulated_p99_e2e_s for c in by["p99"].candidates[2:]
    ], "the same candidates, judged differently"
    for objective, figure in (("mean", "simulated_mean_e2e_s"), ("p99", "simulated_p99_e2e_s")):
        picked = next(c for c in by[objective].candidates if c.plan is by[objective].plan)
        assert getattr(picked, figure) == min(getattr(c, figure) for c in splits)
    with pytest.raises(ValueError, match="objective"):
        plan_stages(num_instances=16, workload="bimodal", profile=profile, objective="median")
