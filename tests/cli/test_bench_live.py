"""`cascade bench live` against real daemons: a scheduler and 3 sim workers as subprocesses on
loopback, a preset trace replayed at its arrival times through `run_live`; and the live summary
checked against the simulator's own on the same records."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import cascadeinfer as ci
import grpc
import pytest
from cascadeinfer.evaluation.live import add_live_arguments, replay, run_live, session_prompt
from cascadeinfer.evaluation.summary import SUMMARY_KEYS, RequestRecord, summarize
from cascadeinfer.policies import FixedStage, build_policy

from tests.worker.daemons import Daemon, sim_cluster


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    logs = tmp_path_factory.mktemp("logs")
    with sim_cluster(3, ["--stages", "0-256:1,256-8192:2"], logs) as (daemon, _):
        yield daemon


def live_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_live_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_replayed_preset_completes_with_plausible_figures(scheduler: Daemon) -> None:
    args = live_args(
        *("--address", scheduler.address, "--workload", "short-chat", "--requests", "40"),
        *("--rate", "4", "--seed", "3", "--max-len", "1024", "--timeout-s", "120"),
    )
    summary = run_live(args)
    assert set(SUMMARY_KEYS) | {"wall_s"} <= set(summary)
    assert summary["failed"] == 0, summary["failed_by_code"]
    assert summary["completed"] == summary["requests"] == 40
    figures = [summary[k] for k in SUMMARY_KEYS]
    assert all(math.isfinite(x) for x in figures), summary
    assert 0 < summary["mean_ttft_s"] <= summary["mean_e2e_s"] <= summary["p99_e2e_s"]
    assert summary["mean_ttft_s"] <= summary["p99_ttft_s"] <= summary["p99_e2e_s"]
    assert 0 < summary["mean_tpot_s"] <= summary["p99_tpot_s"] < 1.0
    assert summary["migrations"] >= 1, "some outputs grow past the 256-token bound"
    # 40 arrivals at 4/s span about 10 s; the last request then needs at most ~1,000 steps.
    assert 5 < summary["wall_s"] < 90
    assert summary["throughput_tok_s"] > 0


def test_every_request_is_accounted_for_and_failures_carry_their_code(
    scheduler: Daemon,
) -> None:
    # The workers' max_model_len is 8192: the second request cannot be served.
    trace = [(0.0, 20, 8), (0.05, 9000, 4), (0.1, 30, 1)]
    records, makespan = replay(scheduler.address, trace, timeout_s=60)
    assert [r.error for r in records] == ["", "INVALID_ARGUMENT", ""]
    ok = [records[0], records[2]]
    assert [r.num_output_tokens for r in ok] == [8, 1]
    for r in ok:
        assert r.first_token_s is not None and r.finished_s is not None
        assert r.arrival_s < r.first_token_s <= r.finished_s
    assert records[1].finished_s is None
    assert 0 < makespan < 30
    assert records[2].tpot_s is None, "a single-token output has no TPOT"


def test_turns_of_a_session_replay_with_its_key_and_prompts_extending_each_other(
    scheduler: Daemon,
) -> None:
    trace = [(0.0, 40, 4, 0, 0, 0), (0.1, 30, 2), (0.3, 60, 4, 0, 1, 43)]
    records, _ = replay(scheduler.address, trace, timeout_s=60)
    assert [r.error for r in records] == ["", "", ""]
    assert [r.num_output_tokens for r in records] == [4, 2, 4]
    first, second = session_prompt(0, 40), session_prompt(0, 60)
    assert second[:40] == first and session_prompt(1, 40)[:16] != first[:16]
    assert all(1 <= t <= 250 for t in second)


def test_an_unreachable_scheduler_is_an_error_not_an_empty_run() -> None:
    args = live_args(
        "--address", "127.0.0.1:1", "--workload", "short-chat", "--rate", "1", "--requests", "2"
    )
    with pytest.raises(grpc.RpcError) as info:
        run_live(args)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_live_summary_is_the_simulators_summary_of_the_same_records() -> None:
    """`summarize` over a simulated run's own per-request records gives its report's summary."""
    profile = ci.CostProfile.builtin("gpu-h100-llama3-8b")
    trace = ci.generate_trace("short-chat", 300, 40.0, "gamma", 2.0, 5)
    # Fixed stages, so requests migrate (a plan for short chat on 4 instances is one stage).
    stages = [FixedStage(0, 256, 2), FixedStage(256, 8192, 2)]
    policy = build_policy("cascade", profile, range(4), max_len=8192, stages=stages)
    report = ci.simulate(policy, profile, trace, list(range(4)))
    r = report.requests()
    records = [
        RequestRecord(
            arrival_s=a,
            first_token_s=a + ttft,
            finished_s=a + e2e,
            num_output_tokens=int(o),
            num_migrations=int(m),
        )
        for a, ttft, e2e, o, m in zip(
            r["arrival_s"],
            r["ttft_s"],
            r["e2e_s"],
            r["output_len"],
            r["num_migrations"],
            strict=True,
        )
    ]
    ours = summarize(records, report.makespan_s)
    theirs = report.summary()
    assert theirs["completed"] == 300 and theirs["migrations"] > 0
    for key in SUMMARY_KEYS:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key
    single = RequestRecord(arrival_s=0.0, first_token_s=0.5, finished_s=0.5, num_output_tokens=1)
    assert math.isnan(summarize([single], 0.5)["mean_tpot_s"])
