"""The headline figures of a run from per-request records, computed exactly as the simulator's
report does (`scheduler_core/src/sim/report.rs`), so live and simulated runs line up key by key.

Over completed requests: mean and nearest-rank p99 of end-to-end latency, TTFT and TPOT, where
TPOT is `(e2e - ttft) / (output_tokens - 1)` for outputs of two tokens or more; throughput is the
output tokens of completed requests over the makespan (first arrival to last completion). A
figure no request qualifies for is NaN, as in the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SUMMARY_KEYS = (
    "mean_e2e_s",
    "p99_e2e_s",
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_tpot_s",
    "p99_tpot_s",
    "throughput_tok_s",
    "completed",
    "migrations",
)
"""What `summarize` returns; the simulator adds `sim_wall_s`, a live run `wall_s`."""


@dataclass(frozen=True)
class RequestRecord:
    """One request's fate. Times in seconds on one clock; None where it never got there."""

    arrival_s: float
    first_token_s: float | None
    finished_s: float | None
    num_output_tokens: int
    num_migrations: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for single-token outputs."""
        e2e, ttft = self.e2e_s, self.ttft_s
        if self.num_output_tokens < 2 or e2e is None or ttft is None:
            return None
        return (e2e - ttft) / (self.num_output_tokens - 1)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest rank: the `ceil(q * n)`-th smallest (1-based, clamped to [1, n]); NaN if empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = min(max(math.ceil(q * len(ordered)), 1), len(ordered)) - 1
    return ordered[rank]


def summarize(records: Sequence[RequestRecord], makespan_s: float) -> dict[str, float]:
    """The keys of SUMMARY_KEYS; `completed` and `migrations` are whole numbers."""
    done = [r for r in records if r.finished_s is not None]
    e2e = [x for r in done if (x := r.e2e_s) is not None]
    ttft = [x for r in done if (x := r.ttft_s) is not None]
    tpot = [x for r in done if (x := r.tpot_s) is not None]
    tokens = sum(r.num_output_tokens for r in done)
    return {
        "mean_e2e_s": mean(e2e),
        "p99_e2e_s": percentile(e2e, 0.99),
        "mean_ttft_s": mean(ttft),
        "p99_ttft_s": percentile(ttft, 0.99),
        "mean_tpot_s": mean(tpot),
        "p99_tpot_s": percentile(tpot, 0.99),
        "throughput_tok_s": tokens / makespan_s if makespan_s > 0 else 0.0,
        "completed": len(done),
        "migrations": sum(r.num_migrations for r in done),
    }
