"""The plan a benchmark runs is made for the lengths it runs."""

from __future__ import annotations

from cascadeinfer.evaluation.simbench import make_trace
from cascadeinfer.planning import clamp_lengths, load_requests


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
