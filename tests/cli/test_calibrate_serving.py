"""`cascade calibrate --worker`: a worker daemon's per-step overhead, measured over gRPC.

The fitting is checked on made-up feeds with a known overhead; the command end to end against a
real sim worker daemon, whose engine sleeps the profile's time for the batch it holds, so what
the command reads off the feed must agree with what the engine stepped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cascadeinfer.calibrate.serving import (
    FeedStep,
    RoundResult,
    fit_overhead,
    longest_clean_run,
    summarize_round,
)
from cascadeinfer.planning import load_profile

from tests.worker.daemons import workers

CASCADE = str(Path(sys.executable).parent / "cascade")
PROFILE = "gpu-h100-llama3-8b"


def cascade(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASCADE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def decode_steps(
    start_index: int, start_s: float, interval_s: float, contexts: tuple[int, ...], count: int
) -> list[FeedStep]:
    """`count` consecutive decode steps `interval_s` apart, every context growing by one."""
    return [
        FeedStep(
            received_s=start_s + k * interval_s,
            step_index=start_index + k,
            engine_step_s=interval_s,
            num_running=len(contexts),
            num_waiting=0,
            contexts=tuple(c + k for c in contexts),
            is_decode_only=True,
        )
        for k in range(count)
    ]


def test_a_round_is_timed_over_its_longest_clean_run_only() -> None:
    profile = load_profile(PROFILE)
    contexts = (100, 200, 300, 400)
    prefill = FeedStep(0.0, 0, 0.05, 4, 0, (65, 65, 65, 65), is_decode_only=False)
    first = decode_steps(1, 0.05, 0.010, contexts, 20)
    # Step 21 is missing from the feed: the interval over it spans two steps.
    second = decode_steps(22, first[-1].received_s + 0.020, 0.010, contexts, 40)
    steps = [prefill, *first, *second]
    run = longest_clean_run(steps, 4)
    assert [s.step_index for s in run] == list(range(22, 62))
    result = summarize_round(steps, 4, profile)
    assert result is not None
    assert result.num_steps == 39
    assert result.cadence_s == pytest.approx(0.010)
    # A batch of another size is not this round's.
    assert summarize_round(steps, 3, profile) is None


def test_an_update_merging_several_steps_continues_the_run_and_counts_each() -> None:
    profile = load_profile(PROFILE)
    contexts = (100, 200, 300, 400)
    first = decode_steps(1, 0.0, 0.010, contexts, 10)
    # The reader fell behind: steps 11-13 reach it as one update, 3 tokens per request.
    merged = FeedStep(
        received_s=first[-1].received_s + 0.030,
        step_index=13,
        engine_step_s=0.010,
        num_running=4,
        num_waiting=0,
        contexts=tuple(c + 12 for c in contexts),
        is_decode_only=True,
        num_steps=3,
    )
    after = decode_steps(14, merged.received_s + 0.010, 0.010, contexts, 10)
    steps = [*first, merged, *after]
    assert longest_clean_run(steps, 4) == steps
    result = summarize_round(steps, 4, profile)
    assert result is not None
    assert result.num_steps == 22
    assert result.cadence_s == pytest.approx(0.010)
    # An update that covers fewer steps than the index moved by left some out: the run breaks.
    short = replace(merged, num_steps=2)
    assert longest_clean_run([*first, short, *after], 4) == [short, *after]


def test_fit_separates_per_step_from_per_sequence_overhead() -> None:
    rounds = [
        RoundResult(
            n, 100, cadence_s=0.001 + 0.0003 + 0.00002 * n, engine_step_s=0.0, predicted_s=0.001
        )
        for n in (1, 4, 16)
        for _ in range(3)
    ]
    per_step, per_sequence = fit_overhead(rounds)
    assert per_step == pytest.approx(0.0003)
    assert per_sequence == pytest.approx(0.00002)
    assert fit_overhead(rounds[:1]) == pytest.approx((0.00032, 0.0))
    with pytest.raises(RuntimeError, match="no round"):
        fit_overhead([])


def test_calibrating_a_sim_worker_reads_the_batches_it_stepped(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    with workers([["--engine", "sim", "--sim-profile", PROFILE]], tmp_path) as (worker,):
        result = cascade(
            "calibrate", "--worker", worker.address, "--base-profile", PROFILE,
            "--out", str(out), "--json",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert {r["batch_size"] for r in report["rounds"]} == {1, 4, 16}
    for r in report["rounds"]:
        # The sim engine sleeps the profile's time for the batch it holds: the batch read off
        # the feed must be that batch, and the time between steps at least the sleep. A sleep
        # never ends early but overshoots on a loaded machine (8.9 ms for 6.0 ms at load 20),
        # so the bound above is loose.
        assert r["predicted_s"] * 0.95 <= r["engine_step_s"] <= r["predicted_s"] * 3, r
        assert r["cadence_s"] >= r["engine_step_s"] * 0.99, r
        assert r["num_steps"] >= 100, r
    base = json.loads(load_profile(PROFILE).to_json())
    written = json.loads(out.read_text())
    assert written == report["profile"]
    assert written["name"] == f"{PROFILE}-serving"
    for field, value in base.items():
        if field not in ("name", "description", "step_overhead_s", "per_sequence_s"):
            assert written[field] == value, field
    assert written["step_overhead_s"] == pytest.approx(
        max(base["step_overhead_s"] + report["per_step_s"], 0.0)
    )
    assert "Serving overhead added" in written["description"]
    load_profile(str(out))


def test_worker_calibration_needs_a_base_profile_and_a_reachable_worker() -> None:
    result = cascade("calibrate", "--worker", "127.0.0.1:1")
    assert result.returncode == 2
    assert "--worker needs --base-profile" in result.stderr
    result = cascade("calibrate", "--worker", "127.0.0.1:1", "--base-profile", PROFILE)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
