"""Argparse types for the counts `cascade` subcommands share, bounded where the core and the
machine can follow: past them a value failed deep inside (a seed of 2**80 as a TypeError
traceback from the core's conversion, `--instances 1000000` as an allocation abort after
minutes, `--cv 1e300` as arrivals at NaN)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_SEED = 2**32 - 1
MAX_INSTANCES = 4096
"""Planning and simulating a fleet take time and memory that grow with it: 512 instances plan
in about 10 s on 2 cores (docs/benchmarks.md, "Planning time")."""
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


seed = _integer(0, MAX_SEED)
max_tokens = _integer(1, 2**32 - 1)
"""What the protocol carries (`max_tokens` is a uint32): past it protobuf's "Value out of
range" named no flag."""
num_instances = _integer(1, MAX_INSTANCES)
num_requests = _integer(1, MAX_REQUESTS)


def cv(text: str) -> float:
    """A coefficient of variation: finite, > 0 and at most MAX_CV."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= MAX_CV):
        raise argparse.ArgumentTypeError(f"cv = {text}: must be > 0 and at most {MAX_CV:g}")
    return value
