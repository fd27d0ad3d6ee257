"""`cascade plan` run as a user would: the installed console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cascadeinfer import workload_names
from cascadeinfer.traces import TraceRequest, write_trace

CASCADE = str(Path(sys.executable).parent / "cascade")


def cascade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASCADE, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("preset", workload_names())
@pytest.mark.parametrize("profile", ["gpu-h100-llama3-8b", "cpu-vllm-tiny-llama"])
def test_plan_answers_for_every_preset(preset: str, profile: str) -> None:
    out = cascade("plan", "--instances", "16", "--workload", preset, "--profile", profile, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout, parse_constant=_not_json)
    assert set(doc) >= {"stages", "objective", "solve_ms"}
    assert sum(s["instances"] for s in doc["stages"]) == 16
    assert doc["stages"][0]["min_len"] == 0
    assert all(set(s) >= {"min_len", "max_len", "instances"} for s in doc["stages"])
    # None where the model finds the chosen layout infeasible (the simulation chose it).
    assert (doc["objective"] is None or doc["objective"] > 0) and doc["solve_ms"] >= 0
    for c in doc["stage_count_candidates"]:
        assert len(c["instances"]) == c["stages"] and sum(c["instances"]) == 16


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_plan_table_and_stage_limit() -> None:
    out = cascade("plan", "--instances", "8", "--workload", "bimodal", "--max-stages", "2")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert 1 <= len(rows) <= 2
    assert "predicted mean end-to-end latency" in out.stdout


def test_plan_from_a_trace_uses_its_rate(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    write_trace(path, [TraceRequest(i * 0.5, 100 + 37 * i, 200 + 11 * i) for i in range(200)])
    out = cascade("plan", "--instances", "4", "--workload", str(path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rate"] == pytest.approx(2.0)


def test_plan_for_bursty_arrivals_simulates_them() -> None:
    """`--arrival gamma --cv C` plans for bursts, as `cascade bench sim` does for a preset: the
    layout selection simulates Gamma gaps, and every candidate waits longer in them."""
    base = ["plan", "--instances", "8", "--workload", "bimodal", "--rate", "10", "--json"]
    steady, bursty = cascade(*base), cascade(*base, "--arrival", "gamma", "--cv", "4")
    assert steady.returncode == bursty.returncode == 0, steady.stderr + bursty.stderr

    def one_stage_p99(out: subprocess.CompletedProcess[str]) -> float:
        candidates = json.loads(out.stdout)["stage_count_candidates"]
        return float(candidates[0]["simulated_p99_e2e_s"])  # plain one stage, always first

    assert one_stage_p99(bursty) > 1.2 * one_stage_p99(steady)


def test_plan_says_whether_it_planned_for_the_capacity_guard() -> None:
    base = ["plan", "--instances", "8", "--workload", "long-context-mixed", "--json"]
    guarded, plain = cascade(*base), cascade(*base, "--no-capacity-guard")
    assert guarded.returncode == plain.returncode == 0, guarded.stderr + plain.stderr
    assert json.loads(guarded.stdout)["capacity_guarded"] is True
    assert json.loads(plain.stdout)["capacity_guarded"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instances", "0", "--workload", "short-chat"], "--instances"),
        # Past what the core holds or the machine can plan: an allocation abort after minutes.
        (["--instances", "1000000", "--workload", "short-chat"], "--instances"),
        # Past the core's integers: a TypeError traceback from its conversion.
        (["--instances", "4", "--workload", "short-chat", "--seed", "-1"], "--seed"),
        (["--instances", "4", "--workload", "short-chat", "--seed", str(2**80)], "--seed"),
        (
            ["--instances", "4", "--workload", "bimodal", "--arrival", "gamma", "--cv", "1e300"],
            "cv",
        ),
        (["--instances", "4", "--workload", "nope"], "neither a preset"),
        (
            ["--instances", "4", "--workload", "short-chat", "--profile", "nope"],
            "neither a built-in",
        ),
        (["--instances", "1", "--workload", "agentic", "--rate", "1000"], "infeasible"),
        (["--instances", "4", "--workload", "short-chat", "--rate", "-1"], "rate"),
        # Refused deep in the simulator as "invalid arrival_s = 3.5e299 (request 0)".
        (["--instances", "4", "--workload", "short-chat", "--rate", "1e-300"], "--rate"),
        (["--instances", "4", "--workload", "short-chat", "--buckets", "-3"], "--buckets"),
        (["--instances", "4", "--workload", "short-chat", "--max-stages", "0"], "--max-stages"),
        # 0 once read as "no burstiness given" and planned for Poisson arrivals.
        (["--instances", "4", "--workload", "bimodal", "--arrival", "gamma", "--cv", "0"], "cv"),
        (["--instances", "4", "--workload", "bimodal", "--arrival", "gamma", "--cv", "nan"], "cv"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str) -> None:
    out = cascade("plan", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_default_rate_backs_off_until_a_single_instance_can_carry_it() -> None:
    """The capacity estimate ignores queueing; with no rate given, the plan must still exist
    (a scheduler with one worker used to fail to start here)."""
    import cascadeinfer as ci

    profile = ci.load_profile("gpu-h100-llama3-8b")
    result = ci.plan_stages(num_instances=1, workload="short-chat", profile=profile, max_len=8192)
    assert len(result.plan.stages) == 1 and result.rate > 0
    with pytest.raises(ValueError, match="infeasible"):
        ci.plan_stages(
            num_instances=1, workload="short-chat", profile=profile, max_len=8192, rate=1000.0
        )
