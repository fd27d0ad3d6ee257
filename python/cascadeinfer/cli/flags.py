"""Argparse types for the counts `cascade` subcommands share, bounded where the core and the
machine can follow: past them a value failed deep inside (a seed of 2**80 as a TypeError
traceback from the core's conversion, `--instances 1000000` as an allocation abort after
minutes, `--cv 1e300` as arrivals at NaN)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from cascadeinfer.planning import MAX_INSTANCES

MAX_SEED = 2**32 - 1
MAX_REQUESTS = 10_000_000
"""A simulated request holds about a hundred bytes of state and a million run in seconds."""
MAX_CV = 100.0
"""Gamma gaps past this coefficient of variation underflow to zero or NaN."""


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: must be in [{low}, {high:,}]"
            )
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


seed = _integer(0, MAX_SEED)
max_tokens = _integer(1, 2**32 - 1)
"""What the protocol carries (`max_tokens` is a uint32): past it protobuf's "Value out of
range" named no flag."""
num_instances = _integer(1, MAX_INSTANCES)
num_requests = _integer(1, MAX_REQUESTS)


def cv(text: str) -> float:
    """A coefficient of variation: finite, > 0 and at most MAX_CV."""
    value = _number(text)
    if not (math.isfinite(value) and 0 < value <= MAX_CV):
        raise argparse.ArgumentTypeError(f"cv = {text}: must be > 0 and at most {MAX_CV:g}")
    return value


MIN_RATE = 1e-5
"""About one request a day. The simulator refuses arrivals past 1e12 s, which MAX_REQUESTS
requests reach at this rate: below it `--rate 1e-300` was refused as "invalid arrival_s =
3.5e299 (request 0)", which named no flag."""
MAX_RATE = 1e9
"""Past any fleet's capacity by orders of magnitude (a trace at this rate arrives as one
burst); above it the planner's infeasibility message printed 300-digit numbers."""


def rate(text: str) -> float:
    """Arrivals per second: finite and in [MIN_RATE, MAX_RATE]."""
    value = _number(text)
    if not (math.isfinite(value) and MIN_RATE <= value <= MAX_RATE):
        raise argparse.ArgumentTypeError(
            f"rate = {text}: must be in [{MIN_RATE:g}, {MAX_RATE:g}] requests/s"
        )
    return value


def rates(text: str) -> list[float]:
    """A comma-separated list of `rate`s."""
    return [rate(part.strip()) for part in text.split(",")]


def seconds(text: str) -> float:
    """A latency target: finite and > 0 (NaN or a negative bound made every rate fail the SLO,
    reported as "highest rate within the SLO: 0 req/s")."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number of seconds > 0")
    return value


MAX_BUCKETS = 4096
"""Length buckets of the partition: the dynamic program's time grows with their square
(256 buckets on 512 instances plan in about 10 s, docs/benchmarks.md)."""
num_buckets = _integer(1, MAX_BUCKETS)
max_stages = _integer(1, MAX_INSTANCES)
