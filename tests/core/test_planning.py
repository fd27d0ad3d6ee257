"""Planning: a benchmark's plan is made for the lengths it runs, and the stage count is the
one that simulates best."""

from __future__ import annotations

from cascadeinfer.evaluation.simbench import make_trace
from cascadeinfer.planning import clamp_lengths, load_profile, load_requests, plan_stages
from cascadeinfer.stage_count import selection_trace, simulated_mean_e2e


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


def test_the_stage_count_is_the_one_that_simulates_best() -> None:
    # Agentic on the GPU profile: the analytic objective prefers four stages, the simulator
    # one. The plan must be the simulator's pick, and each candidate its count's best plan.
    profile = load_profile("gpu-h100-llama3-8b")
    analytic = plan_stages(
        num_instances=16, workload="agentic", profile=profile, choose_count_by_simulation=False
    )
    chosen = plan_stages(num_instances=16, workload="agentic", profile=profile)
    assert analytic.candidates == []
    counts = [c.num_stages for c in chosen.candidates]
    assert counts == list(range(1, len(analytic.plan.stages) + 1))
    best = min(chosen.candidates, key=lambda c: c.simulated_mean_e2e_s)
    assert len(chosen.plan.stages) == best.num_stages
    assert best.num_stages < len(analytic.plan.stages)
    full = chosen.candidates[-1]
    assert full.plan.objective_s == analytic.plan.objective_s
    # Simulating the chosen plan on its own trace again gives the same figure (deterministic).
    trace = selection_trace(
        chosen.requests.prompt_lens, chosen.requests.output_lens, chosen.rate, 0
    )
    again = simulated_mean_e2e(chosen.plan, chosen.workload, profile, 16, trace)
    assert again == best.simulated_mean_e2e_s


def test_the_selection_trace_is_not_the_benchmark_trace_of_the_same_seed() -> None:
    requests = load_requests("long-context-mixed", 131_072, seed=0)
    ours = selection_trace(requests.prompt_lens, requests.output_lens, 5.0, 0)
    theirs = make_trace("long-context-mixed", num_requests=len(ours), rate=5.0, max_len=131_072)
    assert len(ours) == 2000
    assert [p for _, p, _ in ours[:50]] != [p for _, p, _ in theirs[:50]]
    assert ours == selection_trace(requests.prompt_lens, requests.output_lens, 5.0, 0)
    mean_gap = ours[-1][0] / len(ours)
    assert 0.18 < mean_gap < 0.22  # Poisson at 5 req/s
