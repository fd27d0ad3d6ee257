"""Goodput: a request counts only when its TTFT (scaled by prompt length) and TPOT both meet
the SLO, and `cascade bench sim` reports it."""

from __future__ import annotations

import json
import math

import pytest
from cascadeinfer.evaluation.simbench import SimSetup, run_at_rate
from cascadeinfer.goodput import GoodputSlo, goodput
from cascadeinfer.planning import load_profile

from tests.cli.test_bench_sim import cascade

NAN = math.nan


def test_the_ttft_target_grows_with_the_prompt_and_both_targets_must_hold() -> None:
    slo = GoodputSlo(ttft_base_s=1.0, ttft_per_prompt_token_s=1e-4, tpot_s=0.05)
    assert slo.is_met(100, 1.0, 0.05)
    assert not slo.is_met(100, 1.2, 0.01), "1.01 s target for 100 tokens"
    assert slo.is_met(100_000, 10.5, 0.01), "11 s target for 100K tokens"
    assert not slo.is_met(100, 0.5, 0.06), "TPOT over target"
    assert slo.is_met(100, 0.5, NAN), "a one-token output has no TPOT"
    assert not slo.is_met(100, NAN, NAN), "never served"


def test_goodput_counts_met_requests_over_all_and_per_second() -> None:
    slo = GoodputSlo(ttft_base_s=1.0, ttft_per_prompt_token_s=0.0, tpot_s=0.1)
    doc = goodput(
        slo,
        prompt_lens=[10, 10, 10, 10],
        ttft_s=[0.5, 2.0, 0.5, NAN],
        tpot_s=[0.05, 0.05, 0.5, NAN],
        e2e_s=[4.0, 5.0, 6.0, NAN],
        arrival_s=[0.0, 1.0, 2.0, 3.0],
    )
    assert doc["goodput"] == 0.25, "one of four: late first token, slow decode, unfinished"
    assert doc["goodput_req_s"] == pytest.approx(1 / 8.0), "makespan 0 s to 8 s"


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="tpot_s"):
        GoodputSlo(tpot_s=-1.0)


def test_bench_sim_reports_goodput_under_the_targets_given() -> None:
    base = ["bench", "sim", "--workload", "bimodal", "--instances", "4", "--requests", "400"]
    base += ["--rate", "3", "--policy", "least-load", "--json"]
    loose = json.loads(cascade(*base))
    strict = json.loads(cascade(*base, "--goodput-tpot-s", "0.001"))
    assert 0.5 < loose["goodput"] <= 1.0 and loose["goodput_req_s"] > 0
    assert strict["goodput"] < 0.05, "no decode step takes under 1 ms on the GPU profile"


def test_cascade_places_for_the_first_token_level_the_run_counts() -> None:
    # The goodput SLO of `cascade bench sim` is the deployment's: cascade's first-token rule
    # aims inside it, so a stricter one changes where cascade starts requests, and nothing
    # about least-load.
    profile = load_profile("gpu-h100-llama3-8b")

    def ttfts(policy: str, slo: GoodputSlo) -> list[float]:
        setup = SimSetup(
            policy=policy,
            profile=profile,
            workload="long-context-mixed",
            num_instances=16,
            num_requests=1000,
            arrival="gamma",
            cv=2.0,
            seed=3,
            goodput_slo=slo,
        )
        _, report = run_at_rate(setup, 12.0)
        return list(report.requests()["ttft_s"])

    strict = GoodputSlo(ttft_base_s=0.2, ttft_per_prompt_token_s=5e-5)
    assert ttfts("cascade", GoodputSlo()) != ttfts("cascade", strict)
    assert ttfts("least-load", GoodputSlo()) == ttfts("least-load", strict)
