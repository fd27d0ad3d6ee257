"""Cost of one core decision called from Python (`make bench-python`).

Times `Scheduler.on_step` with one engine step of 256 requests and `Scheduler.admit`, the two
calls the scheduler service makes on its hot path, including list conversion across pyo3.
Prints the median over repeats of the mean per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from cascadeinfer import BucketGrid, CascadeConfig, CostProfile, Scheduler

REPEATS = 15
CALLS = 2000


def per_call_us(fn: Callable[[], object]) -> float:
    for _ in range(CALLS // 10):
        fn()
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter_ns() - start) / CALLS / 1000.0)
    return statistics.median(samples)


def make_scheduler() -> Scheduler:
    profile = CostProfile.builtin("gpu-h100-llama3-8b")
    grid = BucketGrid.geometric(131_072, 128)
    stages = [
        (0, 2048, list(range(8))),
        (2048, 16_384, list(range(8, 12))),
        (16_384, 131_072, list(range(12, 16))),
    ]
    return Scheduler.cascade_with_stages(
        profile, stages, grid, CascadeConfig(is_refine_enabled=False)
    )


def main() -> None:
    scheduler = make_scheduler()
    request_ids = list(range(256))
    instances = [3] * 256
    # Lengths below the stage bound: the common case, no migration decided.
    lengths = [100 + 7 * k for k in range(256)]
    on_step = per_call_us(lambda: scheduler.on_step(request_ids, instances, lengths, 0.0))
    counter = iter(range(10**9))

    def admit() -> object:
        n = next(counter)
        if n % 1000 == 0:  # keep queued load from filling the instances
            nonlocal scheduler
            scheduler = make_scheduler()
        return scheduler.admit(n, 700, 0.0)

    admit_us = per_call_us(admit)
    print(f"on_step, 256 requests from Python: {on_step:.2f} us per call")
    print(
        f"admit from Python: {admit_us:.2f} us per call (includes a scheduler rebuild every 1000 calls)"
    )


if __name__ == "__main__":
    main()
