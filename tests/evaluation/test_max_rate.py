"""The sustainable-rate search: bracketing, bisection, and traffic whose load stops growing."""

from __future__ import annotations

import math

import pytest
from cascadeinfer.evaluation.simbench import Slo, find_max_rate

SLO = Slo(p99_ttft_s=1.0, p99_tpot_s=0.1)


def summary_at(rate: float, capacity: float) -> dict[str, float]:
    """A fleet that meets the SLO up to `capacity` req/s and queues past it."""
    ttft = 0.5 if rate <= capacity else 10.0
    return {"completed": 10, "requests": 10, "p99_ttft_s": ttft, "p99_tpot_s": 0.05}


def test_the_search_brackets_and_bisects_to_the_capacity() -> None:
    best, at_best, _ = find_max_rate(lambda r: summary_at(r, 37.0), SLO, start=5.0)
    assert best == pytest.approx(37.0, rel=0.03) and best <= 37.0
    assert at_best is not None and SLO.is_met(at_best)


def test_load_that_stops_growing_with_the_rate_is_reported_unbounded() -> None:
    # Session turns paced by think time: past some rate the trace offers no more load, so the
    # SLO holds at every rate and doubling alone would never end.
    runs: list[float] = []

    def run(rate: float) -> dict[str, float]:
        runs.append(rate)
        return summary_at(rate, math.inf)

    best, at_best, _ = find_max_rate(run, SLO, start=2.0, max_factor=64.0)
    assert best == math.inf
    assert at_best is not None and max(runs) <= 2.0 * 64.0
