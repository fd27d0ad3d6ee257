"""The partitioner's plans for every stage limit: one `partition` call per limit (what the
stage-count selection does) against one `partition_by_stage_count` call.

`python bench/bench_stage_counts.py [N B ...]` (default: 64 128 512 256). Workload: the
`long-context-mixed` preset, 20,000 samples (seed 0), at 60% of the fleet's estimated capacity,
profile `gpu-h100-llama3-8b`; the limits are 1 .. K-1 for the DP's own stage count K. Prints the
wall time of each way (one run) and whether the plans are the same."""

from __future__ import annotations

import sys
import time

from cascadeinfer import _core
from cascadeinfer.planning import load_profile

PRESET = "long-context-mixed"


def main(args: list[str]) -> None:
    sizes = [int(a) for a in args] or [64, 128, 512, 256]
    profile = load_profile("gpu-h100-llama3-8b")
    prompts, outputs = _core.sample_preset(PRESET, 20_000, 0)
    for n, b in zip(sizes[::2], sizes[1::2], strict=True):
        grid = _core.BucketGrid.geometric(_core.preset_max_len(PRESET), b, 16)
        unit = _core.Workload.from_samples(grid, prompts, outputs, 1.0)
        rate = 0.6 * n / unit.work_per_second(profile)
        workload = _core.Workload.from_samples(grid, prompts, outputs, rate)
        k_max = len(_core.partition(workload, profile, n).stages) - 1
        start = time.perf_counter()
        separate: list[_core.StagePlan | None] = []
        for k in range(1, k_max + 1):
            try:
                separate.append(_core.partition(workload, profile, n, k))
            except ValueError:
                separate.append(None)
        separate_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        together = _core.partition_by_stage_count(workload, profile, n, k_max)
        together_ms = (time.perf_counter() - start) * 1e3
        same = [
            (a is None and b is None)
            or (a is not None and b is not None and a.to_json() == b.to_json())
            for a, b in zip(separate, together, strict=True)
        ]
        print(
            f"N={n} B={b} limits 1..{k_max}: {k_max} partition calls {separate_ms:.0f} ms, "
            f"one partition_by_stage_count call {together_ms:.0f} ms, same plans: {all(same)}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
