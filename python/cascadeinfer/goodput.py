"""Goodput: the share of requests that meet a per-request latency SLO, as DistServe-style
evaluations count it (Zhong et al., OSDI'24: a request counts only if both its TTFT and its
TPOT meet their targets).

The TTFT target grows with the prompt: `ttft_base_s + ttft_per_prompt_token_s * prompt_len`.
A flat TTFT target would fail every long-document request on any scheduler (a 100K-token
prefill alone takes about 12 s on the GPU profile) and so measure the prompt mix, not the
scheduler. TPOT is `(e2e - ttft) / (output_len - 1)`; single-token outputs have none and meet it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GOODPUT_KEYS = ("goodput", "goodput_req_s")
"""What `goodput` adds to a run's summary: the share of all requests meeting the SLO, and
those requests per second of makespan (first arrival to last completion)."""


@dataclass(frozen=True)
class GoodputSlo:
    ttft_base_s: float = 1.0
    ttft_per_prompt_token_s: float = 2e-4
    """1 s plus 0.2 ms per prompt token: 1.2 s for a 1K prompt, 21 s for a 100K one."""
    tpot_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("ttft_base_s", "ttft_per_prompt_token_s", "tpot_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"goodput SLO {name} must be finite and >= 0, got {value}")

    def is_met(self, prompt_len: int, ttft_s: float, tpot_s: float) -> bool:
        """NaN TTFT (never served) fails; NaN TPOT (one output token) passes."""
        if (
            math.isnan(ttft_s)
            or ttft_s > self.ttft_base_s + self.ttft_per_prompt_token_s * prompt_len
        ):
            return False
        return math.isnan(tpot_s) or tpot_s <= self.tpot_s


def goodput(
    slo: GoodputSlo,
    prompt_lens: Sequence[int],
    ttft_s: Sequence[float],
    tpot_s: Sequence[float],
    e2e_s: Sequence[float],
    arrival_s: Sequence[float],
) -> dict[str, float]:
    """`GOODPUT_KEYS` over per-request lists (NaN where a request never got there); an
    unfinished request never counts."""
    met = sum(
        1
        for p, ttft, tpot, e2e in zip(prompt_lens, ttft_s, tpot_s, e2e_s, strict=True)
        if not math.isnan(e2e) and slo.is_met(p, ttft, tpot)
    )
    ends = [a + e for a, e in zip(arrival_s, e2e_s, strict=True) if not math.isnan(e)]
    makespan = max(ends) - min(arrival_s) if ends else math.nan
    n = len(prompt_lens)
    return {
        "goodput": met / n if n else math.nan,
        "goodput_req_s": met / makespan if makespan and makespan > 0 else math.nan,
    }
